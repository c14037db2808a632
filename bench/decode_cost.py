"""Where a whisper final's time goes, and what the turn machine makes of the turn-taking set,
through the runner and the engine interface alone (no relay): the figures behind docs/engines.md,
"Workers and capacity" and the second machine's measurements.

Parts (``--parts``, default all), each printed as a markdown table:

* ``stages``: one beam-5 final per sentence with a pause inside it (tests/fixtures/speech/turns,
  the audio up to the pause, with 0.4 s of lead as a turn gets), timed stage by stage: features,
  encode (a turn under 3 s is encoded in a 20 s window), beam-5 and greedy generation,
  alignment, the completion pass, and ``runner.decode`` whole;
* ``speed``: what the engine measures at load to set its default cap
  (``WhisperModelRunner.encode_seconds``, the fastest of three 8 s encodes), five times over;
* ``threads``: a 20 s encode with ``cpu_threads`` 1 and 2 (two workers each), alone and two at
  once, and a beam-5 search on it (a short turn's final) alone;
* ``completion``: the completion probability of every cut of the set: each pause inside a
  sentence (where the turn must go on) and each turn's end (where it may close);
* ``turns``: both conversations (or ``--recordings``) streamed through one whisper stream at full
  speed: every EndOfTurn's audio window, confidence and transcript, every speculative final the
  turn machine read with its completion probability and the hangover it set, beside where each
  turn's speech ends; ``--tail-ms`` decodes finals with another tail after the speech (the
  engine's ``ANCHOR_TAIL_S``, 50 ms);
* ``spare``: what a final gains from the other worker's idle core: the conversations and the
  pause and short clips streamed in real time through one stream with the spare cores not used,
  with the completion pass beside the alignment (the default), and with the wide encode too,
  in turn (``--rounds`` each): end of speech -> EndOfTurn and the finals' decode time;
* ``cost``: where one real-time stream's decoding goes (the same session as ``spare``, the
  defaults): finals and Updates decoded to their end, those abandoned at a stage boundary (a
  speculative final the speech undid, an Update of a turn that ended), their decode seconds, and
  the process's CPU; with abandoning off and on in turn (``--rounds`` each). Not in the default set;
* ``batch``: whether decoding several streams' windows in one CTranslate2 call buys capacity: the
  wall time of B windows (B = 1, 2, 4, 8) decoded as the engine does it (one window per call, two
  one-thread workers at once) against B/2 per call on each worker and against one call holding
  all B on two threads, for the 8 s and 20 s encodes and for beam-5 and greedy searches on the
  first halves of the sentences with a pause. Not in the default set;
* ``windows``: whether a short turn's final needs its 20 s window: every turn of the fixtures
  (the short clips, each half of the sentences with a pause, spoken apart and whole, the
  conversations' turns, the espeak-ng sentences), each with its lead and tail as a final gets it,
  decoded with the engine's rule and with the 8 s minimum for every final, grouped by the length
  of audio decoded: WER both ways, the decode time, how many finals differ. Not in the default set.

    .venv/bin/python -m bench.decode_cost [--parts speed,stages,threads,completion,turns,spare,cost,batch] [--repeat 3] [--rounds 2] [--no-clips]
        [--recordings conv_b.wav,pause05_kal16.wav] [--tail-ms 50]   (and windows: not in the default set)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time

import numpy as np

RATE = 16000
LEAD_S = 0.4  # audio before a turn's first word that its decode gets (stream.ANCHOR_LEAD_S)
TAIL_S = 0.05  # and after its last (stream.ANCHOR_TAIL_S)


def samples(name: str, folder: str = "turns/") -> np.ndarray:
    """A fixture (tests/fixtures/speech/, by default its turns/ set) as float32 samples."""
    from tests.support.speech import pcm

    return np.frombuffer(pcm(folder + name), dtype="<i2").astype(np.float32) / 32768


def cut(audio: np.ndarray, start: float, end: float) -> np.ndarray:
    return audio[max(0, int((start - LEAD_S) * RATE)) : int((end + TAIL_S) * RATE)]


def first_halves() -> list[tuple[str, np.ndarray]]:
    from tests.support.speech import turns_manifest

    return [(c["file"], cut(samples(c["file"]), c["speech_start"], c["pauses"][0]["start"]))
            for c in turns_manifest()["clips"] if c["kind"] == "pause"]


def windows(runner) -> None:
    """Every fixture turn's final in the engine's window (20 s under SHORT_TURN_S) and in the 8 s
    minimum, grouped by the audio decoded (lead and tail included, as ``window_frames`` sees it)."""
    from relay.engines.offline.whisper import runner as runner_module
    from tests.support.speech import manifest, turns_manifest, wer

    def span(x: np.ndarray, start: float, end: float) -> np.ndarray:
        lead = max(0, -int((start - LEAD_S) * RATE))  # digital silence where the clip had less lead, as a stream's first turn gets
        return np.concatenate((np.zeros(lead, np.float32), cut(x, start, end)))

    turns: list[tuple[str, np.ndarray]] = []
    tm = turns_manifest()
    for c in tm["clips"]:
        x = samples(c["file"])
        parts = [c] if c["kind"] == "short" else c["segments"]
        turns += [(p["text"], span(x, p.get("speech_start", p.get("start")), p.get("speech_end", p.get("end")))) for p in parts]
    for conv in tm["conversations"]:
        x = samples(conv["file"])
        turns += [(t["text"], span(x, t["speech_start"], t["speech_end"])) for t in conv["turns"]]
    for c in manifest()["clips"]:
        turns.append((c["text"], span(samples(c["file"], ""), c["speech_start"], c["speech_end"])))
    short_turn_s = runner_module.SHORT_TURN_S
    results = []
    for i, (text, x) in enumerate(turns):
        row = {"text": text, "seconds": x.size / RATE}
        # SHORT_TURN_S 0: no final is short, so every one gets the 8 s minimum (window_frames reads it per call)
        for arm, threshold in (("engine", short_turn_s), ("8s", 0.0)):
            runner_module.SHORT_TURN_S = threshold
            try:
                started = time.perf_counter()
                row[arm] = runner.decode(x, True, None).text
                row[arm + "_s"] = time.perf_counter() - started
            finally:
                runner_module.SHORT_TURN_S = short_turn_s
        results.append(row)
        print(f"[decode_cost windows] {i + 1}/{len(turns)} {row['seconds']:.2f} s  {row['engine']!r} / {row['8s']!r}", file=sys.stderr, flush=True)
    print(f"\nEach fixture turn's final, decoded in the engine's window (at least {runner_module.SHORT_WINDOW_FRAMES // 100} s for a final "
          f"of under {runner_module.SHORT_TURN_S:g} s of audio) and in the 8 s minimum every other decode gets:\n")
    print("| audio decoded | turns | WER, engine's window | WER, 8 s minimum | finals that differ | decode, engine's / 8 s |\n|---|---|---|---|---|---|")
    for lo, hi in ((0.0, 1.5), (1.5, 2.0), (2.0, 2.5), (2.5, 3.0), (3.0, 30.0)):
        group = [r for r in results if lo <= r["seconds"] < hi]
        if not group:
            continue
        refs = [r["text"] for r in group]
        print(f"| {lo:g}-{hi:g} s | {len(group)} | {100 * wer(refs, [r['engine'] for r in group]):.1f} % | {100 * wer(refs, [r['8s'] for r in group]):.1f} % | "
              f"{sum(r['engine'] != r['8s'] for r in group)} | {1000 * statistics.mean(r['engine_s'] for r in group):.0f} / "
              f"{1000 * statistics.mean(r['8s_s'] for r in group):.0f} ms |")


def timed(fn, *args, repeat: int, **kwargs):
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - started)
    return best, value


def stages(runner, repeat: int) -> None:
    from relay.engines.offline.whisper.runner import window_frames

    tok = runner.tokenizer
    prompt = runner.model.get_prompt(tok, [], without_timestamps=True)
    rows: dict[str, list[float]] = {}
    for name, audio in first_halves():
        seconds = audio.size / RATE
        t, features = timed(runner.model.feature_extractor, audio, repeat=repeat)
        rows.setdefault("features", []).append(t)
        n = features.shape[-1]
        frames = window_frames(n, True, seconds)
        t, encoded = timed(runner._encode, features, frames, repeat=repeat)
        rows.setdefault(f"encode ({frames // 100} s window)", []).append(t)
        options = dict(max_length=len(prompt) + int(10 * seconds) + 10, suppress_blank=True, suppress_tokens=runner.suppress)
        t, result = timed(runner.model.model.generate, encoded, [prompt], beam_size=runner.beam_size, repeat=repeat, **options)
        rows.setdefault(f"generate, beam {runner.beam_size}", []).append(t)
        t, _ = timed(runner.model.model.generate, encoded, [prompt], beam_size=1, repeat=repeat, **options)
        rows.setdefault("generate, greedy (an Update's)", []).append(t)
        tokens = [x for x in result[0].sequences_ids[0] if x < tok.eot]
        t, _ = timed(runner.model.find_alignment, tok, [tokens], encoded, min(n, frames), repeat=repeat)
        rows.setdefault("alignment", []).append(t)
        t, _ = timed(runner.completion, tok, tokens, tok.decode(tokens).strip(), repeat=repeat)
        rows.setdefault("completion pass", []).append(t)
        spare = runner.spare
        runner.spare = lambda: False
        t, _ = timed(runner.decode, audio, True, None, repeat=repeat)
        rows.setdefault("runner.decode (the final, whole)", []).append(t)
        if runner.wide is not None:
            runner.spare = lambda: True
            t, _ = timed(runner.decode, audio, True, None, repeat=repeat)
            rows.setdefault(f"runner.decode on spare cores (encode on {runner.wide_threads} threads, completion beside alignment)", []).append(t)
        runner.spare = spare
        print(f"  {name}: {seconds:.2f} s of audio", file=sys.stderr, flush=True)
    print(f"\nA final of the first half of each sentence with a pause ({len(next(iter(rows.values())))} turns, "
          f"best of {repeat} per turn):\n")
    print("| stage | median | max |")
    print("|---|---|---|")
    for stage, times in rows.items():
        print(f"| {stage} | {1000 * statistics.median(times):.0f} ms | {1000 * max(times):.0f} ms |")


def threads(path: str, repeat: int) -> None:
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

    from relay.engines.offline.whisper.runner import SILENCE_MEL

    window = np.random.default_rng(0).normal(0, 0.1, (80, 2000)).astype(np.float32)
    name, audio = first_halves()[0]
    print(f"\nA 20 s encode (two workers), and a beam-5 search on the encoding of {name}'s first half, best of the repeats:\n")
    print("| threads per decode | encode, one alone | encode, two at once (wall time for the pair) | beam 5, alone |")
    print("|---|---|---|---|")
    for count in (1, 2):
        model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=count, num_workers=2, local_files_only=True)
        model.encode(window)
        alone, _ = timed(model.encode, window, repeat=repeat)
        features = model.feature_extractor(audio)
        turn = np.full((80, 2000), SILENCE_MEL, dtype=np.float32)
        turn[:, : features.shape[-1]] = features[:, :2000]
        encoded = model.encode(turn)
        prompt = model.get_prompt(Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en"), [],
                                  without_timestamps=True)
        beam, _ = timed(model.model.generate, encoded, [prompt], beam_size=5, max_length=len(prompt) + 40, repeat=repeat)

        def pair() -> None:
            workers = [threading.Thread(target=model.encode, args=(window,)) for _ in range(2)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

        both, _ = timed(pair, repeat=repeat)
        print(f"| {count} | {1000 * alone:.0f} ms | {1000 * both:.0f} ms | {1000 * beam:.0f} ms |")
        del model


def batch(path: str, repeat: int) -> None:
    import concurrent.futures

    import ctranslate2
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

    from relay.engines.offline.whisper.runner import MIN_WINDOW_FRAMES, SHORT_WINDOW_FRAMES, SILENCE_MEL

    # The engine's way: one window per call, as many one-thread calls at once as there are workers.
    apart = ctranslate2.models.Whisper(path, device="cpu", compute_type="int8", intra_threads=1, inter_threads=2)
    # One call for the whole batch, on both cores.
    together = ctranslate2.models.Whisper(path, device="cpu", compute_type="int8", intra_threads=2, inter_threads=1)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    features = WhisperModel(path, device="cpu", compute_type="int8", local_files_only=True)
    tok = Tokenizer(features.hf_tokenizer, apart.is_multilingual, task="transcribe", language="en")
    prompt = features.get_prompt(tok, [], without_timestamps=True)
    halves = first_halves()
    sizes = [size for size in (1, 2, 4, 8) if size <= len(halves)]

    def windows(frames: int, count: int) -> np.ndarray:
        out = np.full((count, 80, frames), SILENCE_MEL, dtype=np.float32)
        for i, (_, audio) in enumerate(halves[:count]):
            mel = features.feature_extractor(audio)[:, :frames]
            out[i, :, : mel.shape[-1]] = mel
        return out

    def on_two_workers(call, items) -> None:
        list(pool.map(call, items))

    def split(x: np.ndarray, per_call: int) -> list:
        return [ctranslate2.StorageView.from_array(x[i : i + per_call]) for i in range(0, len(x), per_call)]

    def row(name: str, size: int, x: np.ndarray, call_apart, call_together) -> None:
        alone, _ = timed(on_two_workers, call_apart, split(x, 1), repeat=repeat)
        halves_s, _ = timed(on_two_workers, call_apart, split(x, max(1, size // 2)), repeat=repeat)
        whole_s, _ = timed(call_together, split(x, size)[0], repeat=repeat)
        print(f"| {name} | {size} | {1000 * alone:.0f} ms | {1000 * halves_s:.0f} ms ({halves_s / alone:.2f}x) | "
              f"{1000 * whole_s:.0f} ms ({whole_s / alone:.2f}x) |", flush=True)

    print("\nSeveral streams' decodes in one call: wall time for B windows on the 2 cores. The engine's way is one window "
          "per call, two one-thread workers at once; batched, each worker takes half of them in one call, or one call "
          f"takes all B on both threads; best of {repeat}:\n")
    print("| decode | B | one window per call | B/2 per call, two workers | all B in one call, two threads |")
    print("|---|---|---|---|---|")
    for frames in (MIN_WINDOW_FRAMES, SHORT_WINDOW_FRAMES):
        for size in sizes:
            row(f"encode, {frames // 100} s window", size, windows(frames, size), apart.encode, together.encode)
    encoded = np.array(together.encode(ctranslate2.StorageView.from_array(windows(MIN_WINDOW_FRAMES, sizes[-1])), to_cpu=True))
    for beam in (5, 1):
        options = dict(beam_size=beam, max_length=len(prompt) + 60, suppress_blank=True)
        for size in sizes:
            row(f"{'beam 5 (a final)' if beam == 5 else 'greedy (an Update)'}, 8 s window", size, encoded[:size],
                lambda e: apart.generate(e, [prompt] * e.shape[0], **options),
                lambda e: together.generate(e, [prompt] * e.shape[0], **options))
    pool.shutdown()


def completion(runner) -> None:
    from tests.support.speech import turns_manifest

    m = turns_manifest()
    turns = [(c["file"], c) for c in m["clips"]] + [(c["file"], t) for c in m["conversations"] for t in c["turns"]]
    rows = []
    for name, turn in turns:
        audio = samples(name)
        for i, segment in enumerate(turn["segments"]):
            decoded = runner.decode(cut(audio, turn["speech_start"], segment["end"]), True, None)
            rows.append(("turn's end" if i == len(turn["segments"]) - 1 else "pause inside", decoded.complete or 0.0, decoded.text))
    print("\nCompletion probability at every cut of the turn-taking set (a pause inside a sentence must not end the turn):\n")
    for kind in ("pause inside", "turn's end"):
        values = sorted(p for k, p, _ in rows if k == kind)
        print(f"- {kind}: {len(values)} cuts, {values[0]:.2f} to {values[-1]:.2f}, median {statistics.median(values):.2f}")
    print("\n| cut | completion | final |\n|---|---|---|")
    for kind, p, text in sorted(rows, key=lambda r: (r[0], r[1])):
        print(f"| {kind} | {p:.3f} | {text} |")


async def turns(engine, recordings: list[str] | None = None) -> None:
    """Each recording (default: both conversations) through one whisper stream at full speed:
    every EndOfTurn, and every speculative final the turn machine read with the completion
    probability and the hangover it set (``WhisperStream._hangover``'s inputs and result)."""
    from relay.engines.base import StreamOptions
    from relay.engines.offline.whisper.stream import WhisperStream
    from tests.support.speech import finals, pcm, run_stream, silence, turns_manifest

    m = turns_manifest()
    speech_ends = {c["file"]: [t["speech_end"] for t in c["turns"]] for c in m["conversations"]}
    speech_ends.update({c["file"]: [c["speech_end"]] for c in m["clips"]})
    readings: list[tuple[str, float, float | None, float, str]] = []
    name = ""
    hangover = WhisperStream._hangover

    def reading(stream, decoded):
        pause, finished = hangover(stream, decoded)
        readings.append((name, stream.turn_samples / RATE, getattr(decoded, "complete", None), pause, getattr(decoded, "text", "")))
        return pause, finished

    ends: list[tuple[str, object]] = []
    WhisperStream._hangover = reading
    try:
        for name in recordings or [c["file"] for c in m["conversations"]]:
            events = await run_stream(engine.open_stream(StreamOptions()), pcm("turns/" + name) + silence(1.5))
            ends += [(name, end) for end in finals(events)]
    finally:
        WhisperStream._hangover = hangover
    print("\nThrough one whisper stream at full speed, each recording on a stream of its own:\n")
    print("| recording | EndOfTurn audio window | confidence | transcript |\n|---|---|---|---|")
    for name, end in ends:
        print(f"| {name} | {end.audio_window_start:.2f}-{end.audio_window_end:.2f} s | {end.end_of_turn_confidence:.2f} | {end.transcript} |")
    print("\nThe speculative finals the turn machine read (turn audio: how much of the turn it had heard then):\n")
    print("| recording | turn audio | completion | hangover | speculative final |\n|---|---|---|---|---|")
    for name, heard, complete, pause, text in readings:
        print(f"| {name} | {heard:.2f} s | {'-' if complete is None else f'{complete:.3f}'} | {pause:.2f} s | {text} |")
    for name in dict.fromkeys(n for n, _ in ends):
        print(f"\n{name}: the turns' speech ends at {', '.join(f'{t:.2f}' for t in speech_ends.get(name, []))} s")


def real_time_session(clips: bool = True) -> tuple[bytes, list[float]]:
    """The conversations, then (``clips``) the pause and short clips, 1.5 s apart: the audio and
    where each turn's speech ends (seconds into it)."""
    from tests.support.speech import pcm, silence, turns_manifest

    m = turns_manifest()
    audio, ends = b"", []
    for name, turns in [(c["file"], c["turns"]) for c in m["conversations"]] + [(c["file"], [c]) for c in m["clips"] if clips]:
        at = len(audio) / 2 / RATE
        ends += [at + t["speech_end"] for t in turns]
        audio += pcm("turns/" + name) + silence(1.5)
    return audio, ends


async def stream_in_real_time(engine, audio: bytes, ends: list[float]) -> tuple[list[float], list[float]]:
    """(end of speech -> the EndOfTurn whose audio window holds it, per turn; the finals' decode
    seconds). A turn's speech end counts from when the 80 ms frame holding it was sent."""
    from relay.engines.base import StreamOptions

    stream = engine.open_stream(StreamOptions())
    await stream.start()
    arrivals: list[tuple[float, object]] = []

    async def collect() -> None:
        async for item in stream.events():
            if getattr(item, "event", None) == "EndOfTurn":
                arrivals.append((time.monotonic(), item))

    engine.runner.timings[True].clear()
    pump = asyncio.get_running_loop().create_task(collect())
    chunk = int(0.08 * RATE) * 2
    start = time.monotonic()
    for i in range(0, len(audio), chunk):
        stream.feed(audio[i : i + chunk])
        await asyncio.sleep(max(0.0, start + (i + chunk) / 2 / RATE - time.monotonic()))
    await stream.finish()
    await pump
    latencies = []
    for end in ends:
        sent = start + (int(end / 0.08) + 1) * 0.08
        match = [t for t, e in arrivals if e.audio_window_start <= end <= e.audio_window_end + 0.2]
        if match:
            latencies.append(match[0] - sent)
    return latencies, list(engine.runner.timings[True])


COST_ARMS = ("every decode runs to its end", "dropped decodes stop at their next stage")


async def stream_cost(engine, rounds: int = 1, clips: bool = True) -> None:
    """One real-time stream's decoding, in two arms taken in turn ``rounds`` times: a decode whose
    result is no longer wanted (a speculative final the speech undid, an Update of a turn that
    ended) runs to its end, as before, or stops at its next stage (the default)."""
    audio, ends = real_time_session(clips)
    runner = engine.runner
    decode = runner.decode
    seconds = len(audio) / 2 / RATE
    print(f"\nOne real-time stream, {seconds:.0f} s of audio ({'the conversations, the pause and short clips' if clips else 'the conversations'}; "
          f"{len(ends)} turns), the two arms in turn, {rounds} round(s). *Finals* and *Updates* ran to their end (used or not); "
          "*abandoned* ones stopped early. Cores: decode seconds over the session's audio seconds.\n")
    print("| round | arm | EndOfTurn p50 / p95 | finals: count, cores | abandoned finals: count, cores | Updates: count, cores "
          "| abandoned Updates: count, cores | process cores |\n|---|---|---|---|---|---|---|---|")
    totals: dict[str, list[float]] = {arm: [] for arm in COST_ARMS}
    try:
        for round_ in range(1, rounds + 1):
            for arm in COST_ARMS:
                if arm == COST_ARMS[0]:
                    runner.decode = lambda *args, abandoned=None, **kwargs: decode(*args, **kwargs)
                else:
                    runner.decode = decode
                for kind in (True, False):
                    runner.timings[kind].clear()
                    runner.abandoned[kind].clear()
                cpu, started = time.process_time(), time.monotonic()
                latencies, _ = await stream_in_real_time(engine, audio, ends)
                cpu, wall = time.process_time() - cpu, time.monotonic() - started
                totals[arm].append(cpu / wall)
                cells = [f"{len(v)}, {sum(v) / seconds:.3f}" for v in
                         (runner.timings[True], runner.abandoned[True], runner.timings[False], runner.abandoned[False])]
                print(f"| {round_} | {arm} | {statistics.median(latencies):.3f} / {np.percentile(latencies, 95):.3f} s "
                      f"({len(latencies)} of {len(ends)} matched) | " + " | ".join(cells) + f" | {cpu / wall:.3f} |", flush=True)
    finally:
        runner.decode = decode
    for arm, cores in totals.items():
        print(f"\n{arm}: the process at {statistics.mean(cores):.3f} cores on average ({', '.join(f'{c:.3f}' for c in cores)}).")


SPARE_ARMS = ("not used", "completion beside alignment", "and wide encode")


async def spare_cores(engine, rounds: int, clips: bool = True) -> None:
    audio, ends = real_time_session(clips)
    runner = engine.runner
    used, wide_model = runner.spare, runner.wide
    print("\nWide encode: " + (f"on {runner.wide_threads} threads" if wide_model is not None else
                               "refused on this box (the copy's encodings differ from the one-thread model's), so its arm encodes narrow"))
    print(f"\nSpare cores, one real-time stream ({len(audio) / 2 / RATE:.0f} s: the conversations"
          f"{', the pause and short clips' if clips else ''}; {len(ends)} turns), each use in turn, {rounds} rounds:\n")
    print("| round | spare cores | EndOfTurn p50 / mean / p95 | final decode p50 / mean | finals encoded wide |")
    print("|---|---|---|---|---|")
    totals: dict[str, list[float]] = {arm: [] for arm in SPARE_ARMS}
    try:
        for round_ in range(1, rounds + 1):
            for arm in SPARE_ARMS:
                runner.spare = (lambda: False) if arm == "not used" else used
                runner.wide = wide_model if arm == "and wide encode" else None
                wide = runner.wide_encodes
                latencies, decodes = await stream_in_real_time(engine, audio, ends)
                totals[arm] += latencies
                print(f"| {round_} | {arm} | {statistics.median(latencies):.3f} / {statistics.mean(latencies):.3f} / "
                      f"{np.percentile(latencies, 95):.3f} s | {statistics.median(decodes):.3f} / {statistics.mean(decodes):.3f} s | "
                      f"{runner.wide_encodes - wide} of {len(decodes)} |", flush=True)
    finally:
        runner.spare, runner.wide = used, wide_model
    for arm, v in totals.items():
        print(f"\nAll rounds, spare cores {arm}: EndOfTurn p50 {statistics.median(v):.3f} s, "
              f"mean {statistics.mean(v):.3f} s, p95 {np.percentile(v, 95):.3f} s ({len(v)} turns)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="speed,stages,threads,completion,turns,spare")
    parser.add_argument("--repeat", type=int, default=3, help="timings: best of this many runs")
    parser.add_argument("--rounds", type=int, default=2, help="spare, cost: real-time runs of each arm")
    parser.add_argument("--no-clips", action="store_true", help="spare: stream the conversations only (a shorter run)")
    parser.add_argument("--recordings", help="turns: comma-separated files of tests/fixtures/speech/turns (default: the conversations)")
    parser.add_argument("--tail-ms", type=float, help="the audio a final decodes after the speech's last loud 10 ms (default: the engine's)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "transcription_site.settings")
    import django

    django.setup()
    from relay.engines.offline.whisper import WhisperEngine, bundled_model_dir

    if args.tail_ms is not None:
        from relay.engines.offline.whisper import stream

        stream.ANCHOR_TAIL_S = args.tail_ms / 1000
    engine = WhisperEngine("bench-decode-cost", {"max_streams": 2, "max_queue_wait_s": 600, "wide_encode": 1})
    engine.wait_loaded_sync(120)
    try:
        if "speed" in parts:
            measured = [1000 * engine.runner.encode_seconds() for _ in range(5)]
            print("The cap's speed measurement (encode_seconds), five times: " + ", ".join(f"{m:.1f} ms" for m in measured))
        if "stages" in parts:
            stages(engine.runner, args.repeat)
        if "completion" in parts:
            completion(engine.runner)
        if "windows" in parts:
            windows(engine.runner)
        if "turns" in parts:
            await turns(engine, args.recordings.split(",") if args.recordings else None)
        if "spare" in parts:
            await spare_cores(engine, args.rounds, not args.no_clips)
        if "cost" in parts:
            await stream_cost(engine, args.rounds, not args.no_clips)
    finally:
        engine.close()
    if "threads" in parts:
        threads(str(bundled_model_dir()), args.repeat)
    if "batch" in parts:
        batch(str(bundled_model_dir()), args.repeat)


if __name__ == "__main__":
    asyncio.run(main())
