"""The sphinx engine on the committed espeak-ng clips, through the engine interface (real decoder).

pocketsphinx's en-us model is far less accurate than Whisper on this audio; the bounds below
catch a broken pipeline (silence, wrong sample rate, lost frames), not small regressions.
"""
from __future__ import annotations

import asyncio

import pytest

from relay.engines.base import TRIGGER_END_OF_STREAM, StreamOptions
from relay.engines.offline.sphinx import SphinxEngine
from relay.exceptions import Capacity
from tests.support.speech import check_turn_grammar, finals, manifest, pcm, run_stream, silence, wer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    engine = SphinxEngine("sphinx-test", {"max_streams": 4, "max_queue_wait_s": 600})
    yield engine
    engine.close()


async def test_long_clip_streams_one_turn_per_sentence(engine):
    turns = manifest()["long"]["turns"]
    events = await run_stream(engine.open_stream(StreamOptions()), pcm("long.wav"))
    check_turn_grammar(events)
    ends = finals(events)
    assert [e.trigger for e in ends] == ["model"] * len(turns)
    assert sum(e.event == "Update" for e in events) >= 3 * len(turns)
    assert wer([t["text"] for t in turns], [e.transcript for e in ends]) <= 0.75
    for end, ref in zip(ends, turns):
        assert end.words and all(w.start is not None and w.end is not None and w.start < w.end for w in end.words)
        assert ref["speech_start"] - 0.4 <= end.words[0].start and end.words[-1].end <= ref["speech_end"] + 0.5


async def test_sentence_clips_in_parallel_streams(engine):
    clips = manifest()["clips"][:4]
    results = await asyncio.gather(*(run_stream(engine.open_stream(StreamOptions()), pcm(c["file"]) + silence(0.6)) for c in clips))
    hypotheses = [" ".join(e.transcript for e in finals(events)) for events in results]
    # Short clips with no lead-in are pocketsphinx's worst case (its cepstral mean adapts over
    # the first utterance): about 85 % WER here, against about 60 % on the long clip.
    assert wer([c["text"] for c in clips], hypotheses) <= 0.95
    assert all(hypotheses)


async def test_eight_khz_mulaw_is_decoded(engine):
    from relay.flux.audio import from_int16
    import numpy as np
    import soxr

    turns = manifest()["long"]["turns"]
    samples = np.frombuffer(pcm("long.wav"), dtype="<i2").astype(np.float32) / 32768
    narrow = (np.clip(soxr.resample(samples, 16000, 8000), -1, 1) * 32767).astype("<i2").tobytes()
    events = await run_stream(engine.open_stream(StreamOptions(encoding="mulaw", sample_rate=8000)), from_int16(narrow, "mulaw"), chunk=800)
    assert len(finals(events)) == len(turns)
    # The en-us model is wideband: upsampled telephone audio is nearly all it gets wrong.
    assert wer([t["text"] for t in turns], [e.transcript for e in finals(events)]) <= 0.95


async def test_force_end_turn_then_end_of_stream(engine):
    audio = pcm(manifest()["clips"][1]["file"])
    stream = engine.open_stream(StreamOptions())
    events: list = list(await stream.start())

    async def collect():
        async for item in stream.events():
            events.append(item)

    pump = asyncio.get_running_loop().create_task(collect())
    stream.feed(audio[: len(audio) // 2])
    await stream.force_end_turn()
    stream.feed(audio[len(audio) // 2 : -8000])  # stop in mid speech: the stream end closes the turn
    await stream.finish()
    await pump
    check_turn_grammar(events)
    ends = finals(events)
    assert [e.trigger for e in ends] == ["manual", TRIGGER_END_OF_STREAM]
    assert all(e.transcript for e in ends)


async def test_warns_about_what_it_cannot_honour(engine):
    options = StreamOptions(
        keyterms=["Relay"], eager_eot_threshold=0.4, eot_timeout_ms=1000, explicit={"keyterm", "eager_eot_threshold", "eot_timeout_ms"}
    )
    events = await run_stream(engine.open_stream(options), silence(0.3))
    assert sorted(e.code for e in events) == ["EAGER_EOT_UNSUPPORTED", "EOT_TIMEOUT_IGNORED", "KEYTERMS_IGNORED"]
    multi = StreamOptions(model="flux-general-multi", language_hints=["de"], explicit={"model", "language_hints"})
    events = await run_stream(engine.open_stream(multi), silence(0.3))
    assert sorted(e.code for e in events) == ["LANGUAGE_IGNORED", "MODEL_IGNORED"]


async def test_capacity_past_max_streams(engine):
    streams = [engine.open_stream(StreamOptions()) for _ in range(engine.max_streams - engine.active)]
    with pytest.raises(Capacity):
        engine.open_stream(StreamOptions())
    for stream in streams:
        await stream.start()
        await stream.finish()
    assert engine.active == 0
