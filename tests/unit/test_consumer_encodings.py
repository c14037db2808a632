"""Every Flux encoding through the consumer in-process (fake engine, in-memory layer)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import soxr
from asgiref.sync import sync_to_async

from relay.flux.audio import from_int16
from relay.models import Connection, Turn
from tests.support.audio import silence, tone
from tests.support.opus import ogg_opus, opus_packets
from tests.support.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)

# 1.1 s of tone: four 250 ms words even when a codec smears the edges by a few milliseconds.
SPEECH = tone(1.1) + silence(0.8)
WORDS = "one two three four"


def _at(pcm: bytes, rate: int) -> bytes:
    if rate == 16000:
        return pcm
    return soxr.resample(np.frombuffer(pcm, dtype="<i2"), 16000, rate).astype("<i2").tobytes()


def _random_frames(data: bytes, seed: int) -> list[bytes]:
    """Frames cut at random byte offsets, some a single byte long."""
    rng, frames, i = random.Random(seed), [], 0
    while i < len(data):
        n = rng.choice([1, 1, 3, 17, 640, 2560, 4000])
        frames.append(data[i : i + n])
        i += n
    return frames


async def _frames_make_one_turn(query: str, frames: list[bytes]) -> None:
    c = Client(f"/v2/listen?{query}")
    hello = await c.connect()
    assert hello["type"] == "Connected"
    for frame in frames:
        await c.comm.send_to(bytes_data=frame)
    end = await c.recv_turn_end()
    assert end["transcript"] == WORDS and end["trigger"] == "model"
    assert 1.0 <= end["audio_window_end"] - end["audio_window_start"] <= 1.7
    await c.send_json({"type": "CloseStream"})
    code, seen = await c.expect_close()
    assert code == 1000 and not [m for m in seen if m["type"] in ("Warning", "Error")]


@pytest.mark.parametrize(
    "encoding,rate",
    [("linear16", 44100), ("linear32", 16000), ("linear32", 48000), ("mulaw", 8000), ("alaw", 8000), ("alaw", 24000)],
)
async def test_sample_encodings_make_turns(encoding, rate):
    wire = from_int16(_at(SPEECH, rate), encoding)
    await _frames_make_one_turn(f"encoding={encoding}&sample_rate={rate}", _random_frames(wire, seed=rate))


async def test_raw_opus_one_packet_per_frame_makes_turns():
    await _frames_make_one_turn("encoding=opus&sample_rate=48000", opus_packets(SPEECH, frame_ms=20))


async def test_ogg_opus_split_at_random_bytes_makes_turns():
    await _frames_make_one_turn("encoding=ogg-opus&sample_rate=16000", _random_frames(ogg_opus(SPEECH), seed=3))


async def test_bad_opus_packets_warn_then_end_the_stream_after_storing_the_turn():
    c = Client("/v2/listen?session=bad-opus&encoding=opus&sample_rate=16000")
    await c.connect()
    bad = b"\xff\xff\xff" + bytes(3000)  # cannot be parsed as an Opus packet
    packets = opus_packets(tone(0.8), frame_ms=20)
    for packet in packets[:20]:
        await c.comm.send_to(bytes_data=packet)
    await c.comm.send_to(bytes_data=bad)
    warning = await c.recv_until(lambda m: m["type"] == "Warning")
    assert warning["code"] == "INVALID_AUDIO_PACKET" and "1 of 5" in warning["description"]
    for packet in packets[20:]:
        await c.comm.send_to(bytes_data=packet)
    await c.recv_until(lambda m: m.get("event") == "Update")
    for _ in range(5):
        await c.comm.send_to(bytes_data=bad)
    code, seen = await c.expect_close()
    assert code == 4007
    assert [m["code"] for m in seen if m["type"] == "Warning"] == ["INVALID_AUDIO_PACKET"] * 4
    assert seen[-1]["type"] == "Error" and seen[-1]["code"] == "INVALID_AUDIO" and seen[-1]["description"]
    ends = [m for m in seen if m.get("event") == "EndOfTurn"]
    assert len(ends) == 1 and ends[0]["trigger"] == "end_of_stream" and ends[0]["transcript"].startswith("one two")
    turn = await sync_to_async(Turn.objects.get)(session_id="bad-opus")
    assert turn.trigger == "end_of_stream"
    conn = await sync_to_async(Connection.objects.get)(session_id="bad-opus")
    assert conn.close_code == 4007 and conn.last_error_code == "INVALID_AUDIO"


async def test_garbage_instead_of_ogg_is_an_error_and_a_close():
    c = Client("/v2/listen?encoding=ogg-opus&sample_rate=48000")
    await c.connect()
    await c.comm.send_to(bytes_data=tone(0.1))  # PCM where Ogg pages must be
    code, seen = await c.expect_close()
    assert code == 4007 and seen[-1]["type"] == "Error" and seen[-1]["code"] == "INVALID_AUDIO"
    assert "not an Ogg stream" in seen[-1]["description"]
