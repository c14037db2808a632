"""Roles in the sans-I/O stream core: a viewer never changes the transcript (no server, no database)."""
from __future__ import annotations

import json

from relay.engines.base import StreamOptions
from relay.live import session as core
from relay.live.session import StreamSession
from tests.support.clock import FakeClock
from tests.unit.test_stream_session import ALL_EVENTS, ME, event, finish, sent


def viewer_session(*, role: str = "viewer", speaker_name: str = "Bob") -> tuple[StreamSession, dict]:
    s = StreamSession(options=StreamOptions(), max_frame_bytes=1000, max_backlog_seconds=30, listener_update_seconds=0.5,
                      configures_per_minute=3, channel_name=ME, clock=FakeClock())
    s.use_options(s.options, ALL_EVENTS)
    connected = sent(s.opened(session_id="room", connection_id="c2", others=["c1"], resumed=True, engine="fake", role=role, speaker_name=speaker_name))[0]
    s.joined(sharing=True)
    s.ready([])
    return s, connected


def test_connected_says_the_role_and_the_label():
    _, connected = viewer_session()
    assert connected["role"] == "viewer" and connected["speaker_name"] == "Bob"


def test_a_viewers_audio_gets_one_forbidden_error_then_is_ignored_and_the_stream_stays_open():
    s, _ = viewer_session()
    first = s.receive_bytes(b"\x00\x01" * 100)
    errors = sent(first)
    assert [(m["type"], m["code"]) for m in errors] == [("Error", "FORBIDDEN")]
    assert not any(isinstance(a, (core.FeedAudio, core.Fail)) for a in first)
    for _ in range(5):
        assert list(s.receive_bytes(b"\x00\x01" * 100)) == []
    assert not s.closing and s.audio_bytes == 0 and s.errors == 1 and s.last_error_code == "FORBIDDEN"


def test_a_viewers_configure_and_force_end_turn_are_refused_once_and_never_reach_the_engine():
    s, _ = viewer_session()
    out = list(s.receive_text(json.dumps({"type": "ForceEndTurn"})))
    assert [m["code"] for m in sent(out)] == ["FORBIDDEN"] and not any(isinstance(a, core.ForceEndTurn) for a in out)
    for message in ({"type": "Configure", "thresholds": {"eot_threshold": 0.8}}, {"type": "ForceEndTurn"}):
        assert list(s.receive_text(json.dumps(message))) == []
    # The audio refusal is its own: a viewer that tried a control message still hears about audio once.
    assert [m["code"] for m in sent(s.receive_bytes(b"\x00\x00"))] == ["FORBIDDEN"]


def test_a_viewer_may_keep_alive_and_close_and_still_hears_the_session():
    s, _ = viewer_session()
    assert list(s.receive_text(json.dumps({"type": "KeepAlive"}))) == []
    body = json.dumps({"type": "TurnInfo", "event": "EndOfTurn", "turn_index": 0, "transcript": "hello", "speaker": "c1", "speaker_name": "Alice"})
    heard = sent(s.layer_event({"origin": "other.channel", "turn_index": 0, "final": True, "body": body}))
    assert heard[0]["transcript"] == "hello" and heard[0]["speaker_name"] == "Alice"
    assert s.receive_text(json.dumps({"type": "CloseStream"})) == [core.CloseStream()]


def test_the_owner_and_speakers_feed_the_engine_and_their_turns_carry_their_label():
    for role in ("owner", "speaker"):
        s, connected = viewer_session(role=role, speaker_name="Alice Liddell")
        assert connected["role"] == role
        assert any(isinstance(a, core.FeedAudio) for a in s.receive_bytes(b"\x00\x01" * 100))
        assert s.receive_text(json.dumps({"type": "ForceEndTurn"})) == [core.ForceEndTurn()]
        s.engine_event(event("StartOfTurn"))
        start = sent(s.turn_index_allocated(3))[0]
        _, after = finish(s, event("EndOfTurn"))
        end = sent(after)[0]
        assert start["speaker"] == end["speaker"] == "c2"
        assert start["speaker_name"] == end["speaker_name"] == "Alice Liddell"
