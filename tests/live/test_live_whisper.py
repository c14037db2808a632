"""The whisper engine behind a real daphne process, driven by the `websockets` client library."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soxr

from relay.flux.audio import from_int16
from tests.support.live import LiveServer, sqlite_env, stream_audio
from tests.support.speech import manifest, pcm, silence, wer

pytestmark = [pytest.mark.slow, pytest.mark.live]



def test_daphne_transcribes_the_long_clip_with_whisper(tmp_path):
    turns = manifest()["long"]["turns"]
    clip = manifest()["clips"][10]
    with LiveServer({**sqlite_env(tmp_path), "RELAY_ENGINE": "whisper"}, log_name="daphne-whisper") as server:
        messages = asyncio.run(stream_audio(server.ws_url + "/v2/listen?session=whisper-live", pcm("long.wav"), chunk=2560, pace=2560 / 32000 / 5))
        narrow = from_int16(soxr.resample(np.frombuffer(pcm(clip["file"]) + silence(0.8), dtype="<i2"), 16000, 8000), "mulaw")
        phone = asyncio.run(
            stream_audio(server.ws_url + "/v2/listen?encoding=mulaw&sample_rate=8000", narrow, chunk=800, pace=800 / 8000 / 5)
        )
    assert messages[0]["type"] == "Connected"
    infos = [m for m in messages if m.get("type") == "TurnInfo"]
    ends = [m for m in infos if m["event"] == "EndOfTurn"]
    assert [e["turn_index"] for e in ends] == list(range(len(turns)))
    assert [e["trigger"] for e in ends] == ["model"] * len(turns)
    assert wer([t["text"] for t in turns], [e["transcript"] for e in ends]) <= 0.12
    assert {m["event"] for m in infos} >= {"StartOfTurn", "Update", "EndOfTurn"}
    for end in ends:
        assert end["words"] and all({"word", "confidence", "start", "end"} <= set(w) for w in end["words"])
    assert not [m for m in messages if m.get("type") in {"Error", "Warning"}], messages
    phone_ends = [m for m in phone if m.get("event") == "EndOfTurn"]
    assert phone_ends and wer([clip["text"]], [" ".join(e["transcript"] for e in phone_ends)]) <= 0.35


def test_a_recording_sent_at_full_speed_gets_every_turn_before_the_close(tmp_path):
    # At full speed the engine is many seconds behind when CloseStream arrives: its flush takes
    # longer than RELAY_FLUSH_TIMEOUT_SECONDS (3 s here), and goes on because it keeps delivering.
    turns = manifest()["long"]["turns"]
    env = {**sqlite_env(tmp_path), "RELAY_ENGINE": "whisper", "RELAY_FLUSH_TIMEOUT_SECONDS": "3"}
    with LiveServer(env, log_name="daphne-whisper-flush") as server:
        messages = asyncio.run(stream_audio(server.ws_url + "/v2/listen?session=full-speed", pcm("long.wav")))
    ends = [m for m in messages if m.get("event") == "EndOfTurn"]
    assert [e["turn_index"] for e in ends] == list(range(len(turns)))
    assert wer([t["text"] for t in turns], [e["transcript"] for e in ends]) <= 0.12
    assert not [m for m in messages if m.get("type") == "Error"], messages
