"""The whisper engine on the committed espeak-ng clips, through the engine interface (real model).

Accuracy thresholds only; latency and throughput are measured by `make bench-engines`.
"""
from __future__ import annotations

import asyncio
import hashlib
import os

import numpy as np
import pytest
import soxr

from relay.flux.audio import from_int16
from relay.engines.base import TRIGGER_END_OF_STREAM, StreamOptions
from relay.engines.offline.whisper import BUNDLED_MODEL_SHA256, WhisperEngine, bundled_model_dir, check_model_dir
from relay.engines.offline.whisper.engine import REFERENCE_ENCODE_S, default_capacity
from relay.exceptions import Capacity, EngineUnavailable
from tests.support.speech import check_turn_grammar, finals, manifest, pcm, run_stream, silence, turns_manifest, wer

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    # Tests feed audio faster than real time, which queues decodes on purpose: no saturation refusals.
    engine = WhisperEngine("whisper-test", {"max_streams": 3, "max_queue_wait_s": 600})
    engine.wait_loaded_sync(120)
    yield engine
    engine.close()


@slow
async def test_sentences_are_transcribed_within_the_wer_budget(engine):
    clips = manifest()["clips"]
    results = await asyncio.gather(*(run_stream(engine.open_stream(StreamOptions()), pcm(c["file"]) + silence(0.3)) for c in clips[:3]))
    for clip in clips[3:]:
        results.append(await run_stream(engine.open_stream(StreamOptions()), pcm(clip["file"]) + silence(0.3)))
    hypotheses = [" ".join(e.transcript for e in finals(events)) for events in results]
    error = wer([c["text"] for c in clips], hypotheses)
    assert error <= 0.10, list(zip(hypotheses, [c["text"] for c in clips]))
    for events in results:
        check_turn_grammar(events)


@slow
async def test_long_clip_makes_one_turn_per_sentence_with_word_timings(engine):
    turns = manifest()["long"]["turns"]
    events = await run_stream(engine.open_stream(StreamOptions()), pcm("long.wav"))
    check_turn_grammar(events)
    ends = finals(events)
    assert [e.trigger for e in ends] == ["model"] * len(turns)
    assert [e.turn for e in ends] == list(range(len(turns)))
    assert wer([t["text"] for t in turns], [e.transcript for e in ends]) <= 0.12
    for end, ref in zip(ends, turns):
        assert end.audio_window_start <= ref["speech_start"] + 0.15 and end.audio_window_end >= ref["speech_end"]
        assert end.words and all(0.0 <= w.confidence <= 1.0 for w in end.words)
        assert abs(end.words[0].start - ref["speech_start"]) < 0.6 and abs(end.words[-1].end - ref["speech_end"]) < 0.6
        assert all(a.start <= b.start for a, b in zip(end.words, end.words[1:]))


@slow
@pytest.mark.parametrize("encoding,rate", [("linear16", 8000), ("linear16", 44100), ("mulaw", 8000), ("alaw", 16000)])
async def test_other_encodings_and_rates_are_resampled(engine, encoding, rate):
    clip = manifest()["clips"][10]
    samples = np.frombuffer(pcm(clip["file"]) + silence(0.3), dtype="<i2").astype(np.float32) / 32768
    if rate != 16000:
        samples = soxr.resample(samples, 16000, rate)
    linear = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    audio = from_int16(linear, encoding)
    options = StreamOptions(encoding=encoding, sample_rate=rate)
    events = await run_stream(engine.open_stream(options), audio, chunk=options.bytes_per_second // 10)
    # Telephone-band audio (8 kHz) loses what tells "brown" from "round": a looser bound there.
    assert wer([clip["text"]], [" ".join(e.transcript for e in finals(events))]) <= (0.35 if rate == 8000 else 0.2)


@slow
async def test_eager_end_of_turn_then_resumed_then_the_same_transcript_at_end_of_turn(engine):
    # "Well, I think [600 ms] we should leave now.": the words before the pause read unfinished,
    # so the turn waits (eot_threshold 0.9: up to ~1.3 s); eager 0.3 sends EagerEndOfTurn at a
    # third of that wait, inside the pause, and TurnResumed when the speech comes back.
    clip = next(c for c in turns_manifest()["clips"] if c["file"] == "pause04_slt.wav")
    options = StreamOptions(eot_threshold=0.9, eager_eot_threshold=0.3, explicit={"eot_threshold", "eager_eot_threshold"})
    events = await run_stream(engine.open_stream(options), pcm(f"turns/{clip['file']}") + silence(2.0))
    check_turn_grammar(events)
    names = [e.event for e in events]
    assert names.count("EndOfTurn") == 1 and "TurnResumed" in names
    assert names.index("EagerEndOfTurn") < names.index("TurnResumed")
    end = finals(events)[0]
    assert end.trigger == "model"
    assert wer([clip["text"]], [end.transcript]) <= 0.2


async def _collect(stream, events):
    async for item in stream.events():
        events.append(item)


@slow
async def test_force_end_turn_and_end_of_stream_triggers(engine):
    clip = manifest()["clips"][4]
    audio = pcm(clip["file"])
    stream = engine.open_stream(StreamOptions())
    events: list = list(await stream.start())
    pump = asyncio.get_running_loop().create_task(_collect(stream, events))
    stream.feed(audio[: len(audio) // 2])
    await stream.force_end_turn()
    stream.feed(audio[len(audio) // 2 :])
    await stream.finish()
    await pump
    check_turn_grammar(events)
    ends = finals(events)
    assert [e.trigger for e in ends] == ["manual", TRIGGER_END_OF_STREAM]
    assert ends[0].transcript and ends[1].transcript
    assert wer([clip["text"]], [ends[0].transcript + " " + ends[1].transcript]) <= 0.35


@slow
async def test_warnings_for_options_it_cannot_honour_and_keyterms_accepted(engine):
    stream = engine.open_stream(StreamOptions(model="nova-3", keyterms=["Relay"], explicit={"model", "keyterm"}))
    events = await run_stream(stream, silence(0.5))
    assert [e.code for e in events if hasattr(e, "code")] == ["MODEL_IGNORED"]
    assert finals(events) == []
    assert stream._hotwords() == "Relay"


@slow
async def test_capacity_is_refused_past_max_streams_and_freed_on_finish(engine):
    streams = [engine.open_stream(StreamOptions()) for _ in range(engine.max_streams - engine.active)]
    with pytest.raises(Capacity):
        engine.open_stream(StreamOptions())
    for stream in streams:
        await stream.start()
    await streams[0].finish()
    await asyncio.gather(*(s.abort() for s in streams[1:]))
    assert engine.active == 0
    again = engine.open_stream(StreamOptions())
    await again.abort()


def test_the_default_cap_scales_with_the_speed_of_the_box():
    assert default_capacity(2, REFERENCE_ENCODE_S) == 2  # the box it was measured on
    assert default_capacity(2, REFERENCE_ENCODE_S / 3) == 6  # three times as fast
    assert default_capacity(4, REFERENCE_ENCODE_S / 2.5) == 10
    assert default_capacity(2, REFERENCE_ENCODE_S * 3) == 2  # never below one stream per core
    assert default_capacity(2, REFERENCE_ENCODE_S / 100) == 16  # nor above eight per core


@slow
async def test_without_max_streams_the_cap_is_measured_when_the_model_loads(engine):
    assert engine.encode_seconds is None and engine.max_streams == 3  # set by the operator: not measured
    measured = WhisperEngine("whisper-cap-test", {"workers": 2})
    try:
        await measured.wait_loaded()
        assert measured.encode_seconds is not None and 0 < measured.encode_seconds < 5
        assert measured.cores == min(2, os.cpu_count() or 2)
        assert measured.max_streams == default_capacity(measured.cores, measured.encode_seconds) >= measured.cores
        streams = [measured.open_stream(StreamOptions()) for _ in range(measured.max_streams)]
        with pytest.raises(Capacity, match=f"maximum of {measured.max_streams} streams"):
            measured.open_stream(StreamOptions())
        await asyncio.gather(*(s.start() for s in streams))
        await asyncio.gather(*(s.abort() for s in streams))
        assert measured.active == 0
    finally:
        measured.close()


def test_model_directory_checks(tmp_path):
    with pytest.raises(EngineUnavailable, match="model.bin"):
        check_model_dir(tmp_path, None)
    (tmp_path / "model.bin").write_bytes(b"not a model")
    with pytest.raises(EngineUnavailable, match="tokenizer.json"):
        check_model_dir(tmp_path, None)
    (tmp_path / "tokenizer.json").write_text("{}")
    check_model_dir(tmp_path, hashlib.sha256(b"not a model").hexdigest())
    with pytest.raises(EngineUnavailable, match="sha256"):
        check_model_dir(tmp_path, BUNDLED_MODEL_SHA256)


@slow
def test_bundled_model_is_assembled_once_and_hash_checked(tmp_path):
    path = bundled_model_dir(tmp_path)
    assert {p.name for p in path.iterdir()} >= {"model.bin", "tokenizer.json", "config.json", "vocabulary.txt"}
    mtime = (path / "model.bin").stat().st_mtime_ns
    assert bundled_model_dir(tmp_path) == path and (path / "model.bin").stat().st_mtime_ns == mtime
    check_model_dir(path, BUNDLED_MODEL_SHA256)


@slow
def test_a_corrupt_cached_model_is_assembled_again_from_the_wheels(tmp_path):
    path = bundled_model_dir(tmp_path)
    with open(path / "model.bin", "r+b") as fh:  # a truncated copy, as a full disk leaves one
        fh.truncate(1 << 20)
    (path / "tokenizer.json").write_text("{}")
    assert bundled_model_dir(tmp_path) == path
    check_model_dir(path, BUNDLED_MODEL_SHA256)
    assert (path / "tokenizer.json").stat().st_size > 2


def test_worker_pool_runs_finals_first_and_reports_saturation():
    import threading

    from relay.engines.offline.pool import PRIORITY_FINAL, PRIORITY_UPDATE, WorkerPool

    pool = WorkerPool(1, "test", max_wait=0.0)
    gate, started = threading.Event(), threading.Event()
    order: list[str] = []

    def block() -> None:
        started.set()
        gate.wait(10)

    try:
        blocker = pool.submit(PRIORITY_UPDATE, block)
        assert started.wait(10)
        update = pool.submit(PRIORITY_UPDATE, order.append, "update")
        final = pool.submit(PRIORITY_FINAL, order.append, "final")
        assert pool.queued == 2 and pool.saturated()
        update.cancel()
        assert pool.queued == 1
        gate.set()
        blocker.result(10)
        final.result(10)
        assert order == ["final"] and not pool.saturated()
    finally:
        gate.set()
        pool.shutdown()


@slow
def test_saturated_pool_refuses_new_streams(engine, monkeypatch):
    monkeypatch.setattr(engine.pool, "saturated", lambda: True)
    with pytest.raises(Capacity, match="saturated"):
        engine.open_stream(StreamOptions())
    assert engine.readiness() == (False, "decoders saturated")


def test_worker_pool_runs_a_turns_first_update_before_later_ones():
    import threading

    from relay.engines.offline.pool import PRIORITY_FINAL, PRIORITY_LATER_UPDATE, PRIORITY_UPDATE, WorkerPool

    pool = WorkerPool(1, "test-updates")
    gate, started = threading.Event(), threading.Event()
    order: list[str] = []

    def block() -> None:
        started.set()
        gate.wait(10)

    try:
        blocker = pool.submit(PRIORITY_FINAL, block)
        assert started.wait(10)
        later = pool.submit(PRIORITY_LATER_UPDATE, order.append, "later")
        first = pool.submit(PRIORITY_UPDATE, order.append, "first")
        gate.set()
        blocker.result(10)
        first.result(10)
        later.result(10)
        assert order == ["first", "later"]
    finally:
        gate.set()
        pool.shutdown()


def test_worker_pool_tells_a_job_whether_it_runs_alone():
    import threading
    import time

    from relay.engines.offline.pool import PRIORITY_FINAL, PRIORITY_UPDATE, WorkerPool

    pool = WorkerPool(2, "test-alone")
    gate, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        gate.wait(10)

    try:
        assert pool.submit(PRIORITY_FINAL, pool.alone).result(10) is True
        blocker = pool.submit(PRIORITY_UPDATE, block)
        assert started.wait(10)
        assert pool.submit(PRIORITY_FINAL, pool.alone).result(10) is False  # the other worker is busy
        gate.set()
        blocker.result(10)
        deadline = time.monotonic() + 10
        while pool.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.submit(PRIORITY_FINAL, pool.alone).result(10) is True
    finally:
        gate.set()
        pool.shutdown()


@slow
def test_a_final_on_spare_cores_is_encoded_wide_and_comes_out_the_same(engine):
    """A final that finds the other workers idle is encoded on two threads by the model's second
    copy, and its completion pass runs beside the alignment: the result is the same to the bit.
    (A copy that encodes otherwise is refused: the next test.)"""
    from relay.engines.offline.whisper.runner import WhisperModelRunner

    assert engine.runner.spare == engine.pool.alone
    if engine.cores > 1:  # on by default wherever there is a second core
        assert engine.runner.wide is not None and engine.runner.wide_threads == engine.cores, "two-thread encodes differ from one-thread ones on this box"
    runner = WhisperModelRunner(bundled_model_dir(), compute_type="int8", cpu_threads=1, workers=2, beam_size=5, wide_threads=2)
    assert runner.wide is not None and runner.wide_threads == 2, "two-thread encodes differ from one-thread ones on this box"
    clips = turns_manifest()["clips"]
    short = next(c for c in clips if c["kind"] == "short")
    paused = next(c for c in clips if c["kind"] == "pause")
    for count, (clip, end) in enumerate(((short, short["speech_end"]), (paused, paused["pauses"][0]["start"]))):
        audio = _floats(pcm("turns/" + clip["file"]))[: int((end + 0.05) * 16000)]
        runner.spare = lambda: False
        narrow = runner.decode(audio, True, None)
        assert runner.wide_encodes == count
        runner.spare = lambda: True
        spread = runner.decode(audio, True, None)
        assert runner.wide_encodes == count + 1
        assert spread.text and spread == narrow  # text, words and their times, confidence, completion
    runner.decode(_floats(pcm("turns/" + short["file"])), False, None)  # an Update never goes wide
    assert runner.wide_encodes == 2


def _floats(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768


@slow
def test_wide_encodes_stay_off_when_they_would_change_the_numbers(monkeypatch):
    import ctranslate2

    from relay.engines.offline.whisper.runner import WhisperModelRunner

    real = ctranslate2.models.Whisper

    class Skewed:
        """The two-thread copy, summing a hair otherwise."""

        def __init__(self, model):
            self.model = model

        def encode(self, features, **kwargs):
            return ctranslate2.StorageView.from_array(np.asarray(self.model.encode(features, **kwargs)) + 1e-6)

    def whisper(*args, **kwargs):
        model = real(*args, **kwargs)
        return Skewed(model) if kwargs.get("intra_threads") == 2 else model

    monkeypatch.setattr(ctranslate2.models, "Whisper", whisper)
    runner = WhisperModelRunner(bundled_model_dir(), compute_type="int8", cpu_threads=1, workers=2, beam_size=5, wide_threads=2)
    assert runner.wide is None
