"""The sans-I/O stream core, driven directly: no server, database, channel layer or event loop."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.engines.base import EngineWarning, StreamOptions, TurnEvent, Word
from relay.exceptions import BacklogExceeded, EngineError, FrameTooLarge, RateLimited, ServerRestarting
from relay.live import session as core
from relay.live.session import StreamSession
from relay.store.turns import turn_record
from tests.support.clock import FakeClock

ME = "me.channel"


ALL_EVENTS = frozenset({"presence", "history"})


def new_session(*, peers: list[str] | None = None, clock: FakeClock | None = None, listener_update_seconds: float = 0.5,
                relay_events: frozenset[str] = ALL_EVENTS, **options) -> StreamSession:
    s = StreamSession(
        options=StreamOptions(**options),
        max_frame_bytes=1000,
        max_backlog_seconds=30,
        listener_update_seconds=listener_update_seconds,
        configures_per_minute=3,
        channel_name=ME,
        clock=clock or FakeClock(),
    )
    s.use_options(s.options, relay_events)
    s.opened(session_id="room", connection_id="c1", others=peers or [], resumed=False, engine="fake")
    s.joined(sharing=True)
    s.ready([])
    return s


def event(kind: str, *, turn: int = 0, end: float = 1.0, text: str = "one") -> TurnEvent:
    return TurnEvent(
        event=kind, turn=turn, transcript=text, words=[Word(word=w, start=0.0, end=end, confidence=0.9) for w in text.split()],
        audio_window_start=0.0, audio_window_end=end, end_of_turn_confidence=0.9, trigger="model" if kind == "EndOfTurn" else None,
    )


def sent(actions) -> list[dict]:
    return [json.loads(a.text) for a in actions if isinstance(a, core.SendClient)]


def group(actions) -> list[dict]:
    return [a.message for a in actions if isinstance(a, core.SendGroup)]


def through_index(s: StreamSession, ev: TurnEvent, index: int):
    actions = s.engine_event(ev)
    assert actions == [core.AllocateTurnIndex()]
    return s.turn_index_allocated(index)


def finish(s: StreamSession, ev: TurnEvent, *, others: int | frozenset[str] = 0, index: int | None = None):
    """Feed an EndOfTurn through store; returns (actions before the store result, after it)."""
    before = s.engine_event(ev) if index is None else through_index(s, ev, index)
    assert isinstance(before[-1], core.StoreTurn)
    if isinstance(others, int):
        others = frozenset(f"peer{i}" for i in range(others))
    finished, after = s.turn_stored(others)
    assert finished.index == before[-1].index
    return before, after


# -- sequence ids and Connected -----------------------------------------------------------------
def test_connected_is_first_and_every_message_takes_the_next_sequence_id():
    s = StreamSession(options=StreamOptions(), max_frame_bytes=1000, max_backlog_seconds=30, listener_update_seconds=0.5, configures_per_minute=3, channel_name=ME)
    s.use_options(StreamOptions(), ALL_EVENTS)
    first = sent(s.opened(session_id="room", connection_id="c1", others=["c0"], resumed=True, engine="fake"))
    join = s.joined(sharing=False)
    rest = sent(join) + sent(s.ready([EngineWarning("W", "w")]))
    assert first[0]["type"] == "Connected" and first[0]["sequence_id"] == 0 and first[0]["request_id"] == "c1"
    assert [m["type"] for m in rest] == ["Warning", "Presence", "Warning"]
    assert [m["sequence_id"] for m in rest] == [1, 2, 3]
    assert rest[1]["connections"] == 2
    assert group(join)[0]["type"] == "relay.presence" and group(join)[0]["event"] == "join"


def test_nothing_is_taken_before_set_up_is_done():
    s = StreamSession(options=StreamOptions(), max_frame_bytes=1000, max_backlog_seconds=30, listener_update_seconds=0.5, configures_per_minute=3)
    assert s.receive_bytes(b"\0\0") == () and s.receive_text('{"type":"KeepAlive"}') == ()


# -- turn indexes -------------------------------------------------------------------------------
def test_a_turn_gets_its_index_before_its_first_event_and_keeps_it():
    s = new_session()
    start = through_index(s, event("StartOfTurn"), 7)
    assert sent(start)[0]["turn_index"] == 7
    assert sent(s.engine_event(event("Update")))[0]["turn_index"] == 7  # no second allocation
    _, after = finish(s, event("EndOfTurn"))
    assert sent(after)[0]["turn_index"] == 7
    assert s.engine_event(event("StartOfTurn", turn=1)) == [core.AllocateTurnIndex()]  # the next turn: a new index


# -- store before send --------------------------------------------------------------------------
def test_end_of_turn_is_stored_before_anyone_hears_of_it():
    s = new_session(peers=["c2"])
    through_index(s, event("StartOfTurn"), 0)
    before, after = finish(s, event("EndOfTurn"))
    assert not [a for a in before if isinstance(a, (core.SendClient, core.SendGroup))]
    assert before[-1].timed is True
    assert [type(a) for a in after] == [core.SendClient, core.SendGroup]
    assert group(after)[0]["final"] is True and group(after)[0]["origin"] == ME


def test_a_joiner_counted_by_the_store_gets_the_turn_live():
    """No peer when the turn ended; a tab committed its row before the turn's commit: fan out."""
    s = new_session()
    through_index(s, event("StartOfTurn"), 0)
    _, after = finish(s, event("EndOfTurn"), others=1)
    assert group(after) and group(after)[0]["turn_index"] == 0


def test_a_lone_tab_uses_no_channel_layer():
    s = new_session()
    start = through_index(s, event("StartOfTurn"), 0)
    update = s.engine_event(event("Update"))
    _, after = finish(s, event("EndOfTurn"), others=0)
    assert not group(start + update + after)


def test_a_closing_streams_flush_is_not_timed():
    s = new_session()
    through_index(s, event("StartOfTurn"), 0)
    assert s.engine_event(event("EndOfTurn"))[-1].timed is True
    s.turn_stored(frozenset())
    through_index(s, event("StartOfTurn", turn=1), 1)
    s.fail(ServerRestarting())
    s.flush_started()
    assert s.engine_event(event("EndOfTurn", turn=1))[-1].timed is False


# -- listener Updates ---------------------------------------------------------------------------
def test_listener_updates_are_coalesced_and_the_latest_released_by_the_timer():
    s = new_session(peers=["c2"])
    through_index(s, event("StartOfTurn"), 0)
    first = s.engine_event(event("Update", end=1.0))
    assert len(group(first)) == 1  # the first goes out
    held = s.engine_event(event("Update", end=1.2, text="one two"))
    assert not group(held) and core.StartTimer(core.LISTENER_UPDATE, 0.5) in held
    newer = s.engine_event(event("Update", end=1.4, text="one two three"))
    assert not group(newer) and not [a for a in newer if isinstance(a, core.StartTimer)]  # one timer
    assert len(sent(held + newer)) == 2  # the speaker gets every Update
    released = group(s.timer_fired(core.LISTENER_UPDATE))
    assert len(released) == 1 and json.loads(released[0]["body"])["transcript"] == "one two three"
    assert s.timer_fired(core.LISTENER_UPDATE) == []


def test_an_update_superseded_by_the_end_of_its_turn_is_never_released():
    s = new_session(peers=["c2"])
    through_index(s, event("StartOfTurn"), 0)
    s.engine_event(event("Update", end=1.0))
    s.engine_event(event("Update", end=1.1))  # held
    _, after = finish(s, event("EndOfTurn", end=1.2))
    assert group(after)[0]["final"] is True
    assert s.timer_fired(core.LISTENER_UPDATE) == []  # the timer fires after the final: nothing stale


def test_an_update_past_the_interval_goes_out_at_once():
    s = new_session(peers=["c2"])
    through_index(s, event("StartOfTurn"), 0)
    s.engine_event(event("Update", end=1.0))
    assert group(s.engine_event(event("Update", end=1.6)))


def test_every_update_goes_out_when_the_interval_is_zero():
    s = new_session(peers=["c2"], listener_update_seconds=0)
    through_index(s, event("StartOfTurn"), 0)
    assert all(group(s.engine_event(event("Update", end=1.0 + i / 100))) for i in range(3))


# -- other tabs -> this one ---------------------------------------------------------------------
def layer_final(index: int, origin: str = "other") -> dict:
    return {"type": "relay.event", "origin": origin, "body": '{"type":"TurnInfo","event":"EndOfTurn"}', "turn_index": index, "final": True}


def stored(index: int) -> dict:
    row = {"index": index, "audio_window_start": 0.0, "audio_window_end": 1.0, "transcript": f"t{index}", "words": [], "end_of_turn_confidence": 0.9,
           "trigger": "model", "languages": [], "connection_id": "c0", "created_at": None}
    return turn_record(row)


def layer_update(index: int, origin: str = "other") -> dict:
    return {**layer_final(index, origin), "final": False, "body": '{"type":"TurnInfo","event":"StartOfTurn"}'}


def test_a_final_that_arrives_after_its_replay_is_not_sent_twice():
    s = new_session()
    replayed = sent(s.replay_page([stored(i) for i in range(4)]))
    assert [m["turn_index"] for m in replayed] == [0, 1, 2, 3] and all(m["replayed"] for m in replayed)
    assert s.layer_event(layer_final(3)) == ()
    assert sent(s.layer_event(layer_final(4)))[0]["type"] == "TurnInfo"
    assert sent(s.layer_event({**layer_final(3), "final": False}))  # interim events are not deduped


# -- gap repair ---------------------------------------------------------------------------------
def test_a_turn_missed_live_is_read_from_the_store_and_sent_before_the_next():
    s = new_session()
    s.layer_event(layer_final(0))
    (read,) = s.layer_event(layer_final(2))  # turn 1 never arrived (the layer dropped it)
    assert read == core.ReadTurns(after=0, before=2, then=layer_final(2)["body"], then_index=2)
    out = sent(s.turns_read(read, [stored(1)]))
    assert [(m["turn_index"] if "turn_index" in m else None, m.get("replayed")) for m in out] == [(1, True), (None, None)]
    assert s.layer_event(layer_final(1)) == () and s.layer_event(layer_final(2)) == ()  # each once
    assert sent(s.layer_event(layer_final(3)))  # no gap now: straight through


def test_a_turn_still_in_progress_is_not_a_gap():
    s = new_session()
    s.layer_event(layer_update(0, origin="alice"))  # alice's turn 0 is open
    assert sent(s.layer_event(layer_final(1, origin="bob")))  # bob's turn 1 finished first: sent, nothing read
    assert sent(s.layer_event(layer_final(0, origin="alice")))  # and 0 when it ends


def test_an_open_turn_whose_speaker_finished_a_later_one_was_missed():
    s = new_session()
    s.layer_event(layer_update(0, origin="alice"))  # its StartOfTurn arrived, its EndOfTurn will not
    (read,) = s.layer_event(layer_final(1, origin="alice"))  # one speaker's turns end in order
    assert (read.after, read.before) == (-1, 1)
    assert [m.get("turn_index", "live") for m in sent(s.turns_read(read, [stored(0)]))] == [0, "live"]


def test_a_hole_is_read_once_and_not_waited_for():
    s = new_session()
    (read,) = s.layer_event(layer_final(1))  # 0 unheard
    assert len(sent(s.turns_read(read, []))) == 1  # not in the store (died with its process): 1 goes out
    assert sent(s.layer_event(layer_final(2)))  # no second read for the same hole
    assert sent(s.layer_event(layer_final(0)))  # it was a turn in progress after all: still sent once


def test_the_speakers_own_receipt_never_waits_for_a_repair():
    s = new_session()
    through_index(s, event("StartOfTurn"), 2)  # 0 and 1 were other tabs' turns it never heard of
    _, after = finish(s, event("EndOfTurn"))
    assert isinstance(after[0], core.SendClient) and after[-1] == core.ReadTurns(after=-1, before=2)
    assert [m["turn_index"] for m in sent(s.turns_read(after[-1], [stored(0), stored(1)]))] == [0, 1]


def test_a_channel_layer_outage_warns_once_then_resyncs_and_rejoins():
    s = new_session()
    s.layer_event(layer_final(0))
    s.layer_event(layer_update(1))
    warned = sent(s.layer_down())
    assert warned[0]["code"] == "SHARING_INTERRUPTED" and s.layer_down() == []
    assert s.layer_up() == [core.ReadTurns(after=0, before=None)]  # from the open turn 1 on
    s.rejoined(False)
    assert s.layer_up()[0] == core.JoinGroup()


def test_peers_that_died_stop_counting_after_the_next_store_but_joiners_stay():
    s = new_session(peers=["dead"])
    through_index(s, event("StartOfTurn"), 0)
    s.engine_event(event("EndOfTurn"))
    s.layer_presence({"type": "relay.presence", "event": "join", "connection_id": "new", "origin": "x"})  # joined meanwhile
    s.turn_stored(frozenset())  # the store sees neither (dead's process stopped beating; new committed later)
    assert s.peers == {"new"}


def test_own_events_echoed_by_the_group_are_ignored():
    s = new_session()
    assert s.layer_event(layer_final(1, origin=ME)) == ()
    assert s.layer_presence({"type": "relay.presence", "event": "join", "connection_id": "c1", "origin": ME}) == ()


def test_presence_tracks_peers_and_counts():
    s = new_session()
    join = s.layer_presence({"type": "relay.presence", "event": "join", "connection_id": "c2", "origin": "x"})
    assert join == [core.CountPresence("join", "c2")] and s.peers == {"c2"}
    assert sent(s.presence_counted("join", "c2", None))[0]["connections"] == 2  # store unavailable: our own count
    s.layer_presence({"type": "relay.presence", "event": "leave", "connection_id": "c2", "origin": "x"})
    assert s.peers == set()


def test_leaving_tells_peers_only_when_there_are_some():
    assert new_session().leave() == []
    assert group(new_session(peers=["c2"]).leave())[0]["event"] == "leave"


# -- client frames ------------------------------------------------------------------------------
def test_audio_is_aligned_to_whole_samples_and_empty_frames_ignored():
    s = new_session()
    assert s.receive_bytes(b"") == ()
    assert s.receive_bytes(b"\x01") == ()  # half a sample waits
    assert s.receive_bytes(b"\x02\x03\x04") == [core.FeedAudio(b"\x01\x02\x03\x04")]
    assert s.messages_received == 2 and s.audio_bytes == 4


def test_oversized_frames_and_backlog_end_the_stream():
    s = new_session()
    (fail,) = s.receive_bytes(b"\0" * 1002)
    assert isinstance(fail.error, FrameTooLarge)
    assert isinstance(s.backlog(31).error, BacklogExceeded) and s.backlog(29) is None


def test_bad_text_frames_warn_and_known_ones_map_to_actions():
    s = new_session()
    assert sent(s.receive_text("not json"))[0]["code"] == "INVALID_JSON"
    assert s.receive_text('{"type":"KeepAlive"}') == ()
    assert s.receive_text('{"type":"Finalize"}') == [core.ForceEndTurn()]
    (configure,) = s.receive_text('{"type":"Configure","thresholds":{"eot_threshold":0.8}}')
    assert configure == core.Configure({"eot_threshold": 0.8}, None)
    assert sent(s.receive_text('{"type":"Configure","thresholds":{"eot_threshold":3}}'))[0]["type"] == "ConfigureFailure"


def test_configure_language_hints_reach_the_engine_only_on_the_multilingual_model():
    s = new_session(model="flux-general-multi")
    (configure,) = s.receive_text('{"type":"Configure","language_hints":["de"]}')
    assert configure == core.Configure({}, None, ["de"])
    (configure,) = s.receive_text('{"type":"Configure","language_hints":[],"keyterms":["x"]}')
    assert configure == core.Configure({}, ["x"], [])  # [] clears the hints: detect again
    (failure,) = sent(s.receive_text('{"type":"Configure","language_hints":["xx"]}'))
    assert failure["type"] == "ConfigureFailure" and failure["code"] == "INVALID_CONFIGURE"
    english = new_session()
    (failure,) = sent(english.receive_text('{"type":"Configure","language_hints":["de"]}'))
    assert failure["type"] == "ConfigureFailure" and "flux-general-multi" in failure["description"]
    (success,) = sent(s.configured(StreamOptions(model="flux-general-multi", language_hints=["de"]), []))
    assert success["type"] == "ConfigureSuccess" and success["language_hints"] == ["de"]


def test_configure_is_rate_limited_per_minute_of_the_clock():
    clock = FakeClock()
    s = new_session(clock=clock)
    msg = '{"type":"Configure","keyterms":["x"]}'
    for _ in range(3):
        assert isinstance(s.receive_text(msg)[0], core.Configure)
    assert isinstance(s.receive_text(msg)[0].error, RateLimited)
    clock.advance(61)
    s2 = new_session(clock=clock)
    for _ in range(3):
        s2.receive_text(msg)
    clock.advance(61)  # a minute later the window is empty again
    assert isinstance(s2.receive_text(msg)[0], core.Configure)


def test_close_stream_closes_normally_and_ignores_what_follows():
    s = new_session()
    assert s.receive_text('{"type":"CloseStream"}') == [core.CloseStream()]
    assert (s.close_code, s.close_reason) == (1000, "CloseStream")
    assert s.receive_bytes(b"\0\0") == () and s.fail(EngineError()) is False


# -- ending -------------------------------------------------------------------------------------
def test_an_error_is_recorded_once_and_reported_after_the_flush():
    s = new_session()
    assert s.fail(BacklogExceeded()) is True and s.fail(EngineError()) is False
    error, actions = s.final_error(BacklogExceeded())
    assert sent(actions)[0]["code"] == "BACKLOG_EXCEEDED" and s.close_code == 4008
    assert s.counters()["errors"] == 1 and s.counters()["last_error_code"] == "BACKLOG_EXCEEDED"


def test_an_engine_failure_during_a_flush_becomes_the_close_reason():
    s = new_session()
    s.receive_text('{"type":"CloseStream"}')
    s.engine_failed(EngineError())
    error, actions = s.final_error(None)
    assert isinstance(error, EngineError) and sent(actions)[0]["code"] == "ENGINE_ERROR"
    assert s.close_reason == "ENGINE_ERROR"


def test_nothing_is_sent_to_a_client_that_is_gone_and_its_close_is_recorded():
    s = new_session(peers=["c2"])
    s.client_disconnected(1006)
    assert (s.close_code, s.close_reason) == (1006, "connection lost")
    through_index(s, event("StartOfTurn"), 0)
    before = s.sequence_id
    _, after = finish(s, event("EndOfTurn"))
    assert not sent(after) and group(after) and s.sequence_id == before  # other tabs still get it


# -- relay extensions are opt-in ----------------------------------------------------------------
def test_a_plain_flux_client_gets_only_flux_message_types():
    s = StreamSession(options=StreamOptions(), max_frame_bytes=1000, max_backlog_seconds=30, listener_update_seconds=0.5, configures_per_minute=3, channel_name=ME)
    out = s.opened(session_id="room", connection_id="c1", others=["c0"], resumed=True, engine="fake")
    join = s.joined(sharing=True)
    out += join + s.replay_done(turns=0, last_turn_index=None, since=None) + s.ready([])
    assert [m["type"] for m in sent(out)] == ["Connected"]
    assert group(join)  # other tabs still learn of this one
    assert s.layer_presence({"type": "relay.presence", "event": "join", "connection_id": "c2", "origin": "x"}) == ()
    assert s.peers == {"c0", "c2"}  # tracked for fan-out all the same
    assert [m["sequence_id"] for m in sent(s.engine_warning(EngineWarning("W", "w")))] == [1]


def test_replayed_turns_reach_a_plain_flux_client_as_ordinary_end_of_turn():
    s = new_session(relay_events=frozenset())
    row = {"index": 0, "audio_window_start": 0.0, "audio_window_end": 1.0, "transcript": "x", "words": [], "end_of_turn_confidence": 0.9,
           "trigger": "model", "languages": [], "connection_id": "c0", "created_at": None}
    (turn,) = sent(s.replay_page([turn_record(row)]))
    assert (turn["type"], turn["event"]) == ("TurnInfo", "EndOfTurn")
    assert s.replay_done(turns=1, last_turn_index=0, since=None) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_every_finished_turn_reaches_a_listener_exactly_once_whatever_the_layer_drops(turns, rnd):
    """Other tabs' turns finish in any order; the layer drops any event; then it is back."""
    s = new_session()
    store: dict[int, dict] = {}
    got: list[int] = []

    def run(actions):
        for a in actions:
            if isinstance(a, core.SendClient):
                m = json.loads(a.text)
                if m.get("event") == "EndOfTurn" or m.get("replayed"):
                    got.append(m["turn_index"])
            elif isinstance(a, core.ReadTurns):
                hi = a.before if a.before is not None else 10**9
                run(s.turns_read(a, [store[i] for i in sorted(store) if a.after < i < hi]))

    order = list(range(len(turns)))
    rnd.shuffle(order)  # the order turns finish in
    for i in range(len(turns)):
        if not turns[i][0]:  # StartOfTurn delivered (else dropped)
            run(s.layer_event(layer_update(i)))
    for i in order:
        store[i] = stored(i)
        if not turns[i][1]:  # the final delivered live (else dropped)
            body = {**layer_final(i), "body": json.dumps({"type": "TurnInfo", "event": "EndOfTurn", "turn_index": i})}
            run(s.layer_event(body))
    run(s.layer_up())
    assert sorted(got) == list(range(len(turns))), got


def test_a_frame_holding_more_audio_than_the_backlog_allows_is_too_large_not_a_backlog():
    """1 MiB (the default RELAY_MAX_FRAME_BYTES) of 16 kHz Int16 is 32.8 s, past the 30 s backlog."""
    def session(**options) -> StreamSession:
        s = StreamSession(options=StreamOptions(**options), max_frame_bytes=1024 * 1024, max_backlog_seconds=30,
                          listener_update_seconds=0.5, configures_per_minute=3, channel_name=ME)
        s.use_options(s.options)
        s.opened(session_id="room", connection_id="c1", others=[], resumed=False, engine="fake")
        s.ready([])
        return s

    [fail] = session().receive_bytes(b"\0" * 1024 * 1024)
    assert isinstance(fail, core.Fail) and isinstance(fail.error, FrameTooLarge)
    assert "960000 bytes" in str(fail.error)  # 30 s at 32,000 bytes a second
    [feed] = session().receive_bytes(b"\0" * 960_000)
    assert isinstance(feed, core.FeedAudio)
    [feed] = session(sample_rate=48000).receive_bytes(b"\0" * 1024 * 1024)  # 10.9 s at 48 kHz: fine
    assert isinstance(feed, core.FeedAudio)
