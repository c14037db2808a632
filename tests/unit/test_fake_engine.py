"""The fake engine decides window by window (10 ms); whole frames of silence outside a turn or of
speech inside one take a shortcut. Its events must not depend on how the audio is cut."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from relay.engines.base import StreamOptions
from relay.engines.fake import FakeEngine

RATE = 16000


def audio(seed: int) -> bytes:
    """Tone and silence in runs of 2.5 ms to 1.5 s (pauses too short to end a turn among them), most
    runs starting mid-window."""
    rng = random.Random(seed)
    parts = []
    for _ in range(40):
        n = rng.randint(40, RATE * 3 // 2)
        if rng.random() < 0.55:
            t = np.arange(n) / RATE
            parts.append((np.sin(2 * np.pi * 330 * t) * rng.choice([3000, 9000])).astype("<i2"))
        else:
            pause = rng.randint(RATE * 27 // 100, RATE * 47 // 100)  # past eager end of turn, short of the end
            parts.append(np.zeros(rng.choice([n, pause]), dtype="<i2"))
    return np.concatenate(parts).tobytes()


def events(data: bytes, cuts: list[int], **options: object) -> list[tuple]:
    async def run() -> list[tuple]:
        stream = FakeEngine("fake").open_stream(StreamOptions(**options))
        await stream.start()
        at = 0
        for size in cuts:
            stream.feed(data[at : at + size])
            at += size
        stream.feed(data[at:])
        await stream.finish()
        out = []
        async for ev in stream.events():
            out.append((ev.event, ev.turn, ev.transcript, ev.audio_window_start, ev.audio_window_end, ev.trigger,
                        ev.end_of_turn_confidence))
        return out

    return asyncio.run(run())


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("options", [{}, {"eager_eot_threshold": 0.5}, {"eot_timeout_ms": 300}])
def test_events_do_not_depend_on_how_the_audio_is_cut(seed: int, options: dict) -> None:
    data = audio(seed)
    window = RATE // 100 * 2  # bytes in 10 ms
    one_window_at_a_time = events(data, [window] * (len(data) // window), **options)
    assert [e[0] for e in one_window_at_a_time].count("EndOfTurn") >= 5
    if "eager_eot_threshold" in options:
        assert "TurnResumed" in [e[0] for e in one_window_at_a_time]
    if "eot_timeout_ms" in options:
        assert "timeout" in [e[5] for e in one_window_at_a_time]
    for frame_ms in (20, 80, 250):
        size = RATE * frame_ms // 1000 * 2
        assert events(data, [size] * (len(data) // size), **options) == one_window_at_a_time, frame_ms
    rng = random.Random(seed)
    ragged = []
    while sum(ragged) < len(data):
        ragged.append(2 * rng.randint(1, 6000))
    assert events(data, ragged, **options) == one_window_at_a_time
