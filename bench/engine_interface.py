"""The embedded engines through the engine interface alone (no WebSocket, consumer or database):
``python -m bench.engine_interface``. ``make bench-engines`` (bench/engines.py) measures the engine
as users meet it, through a real relay; this one isolates the engine for both ``whisper`` and
``sphinx`` on the committed espeak-ng set.

Each engine runs in its own process (so peak RSS is its own), through the engine interface
(no WebSocket or Django in the way), in three phases:

1. accuracy: every clip fed as fast as the engine takes it; WER over sentences and long-clip turns;
2. latency: one stream paced in real time (each 80 ms frame sent when it would have been
   recorded) over the long clip and every sentence with 1 s pauses: end of speech -> EndOfTurn,
   start of speech -> first Update, CPU seconds per audio second;
3. concurrency: N real-time streams at once over the long clip; N is sustained when every stream
   keeps its backlog under 1 s and EndOfTurn p95 stays under 1.5 s with every turn ended.

Writes bench/results/engine-interface.json and engine-interface.png and prints a table.

    .venv/bin/python -m bench.engine_interface [--engines whisper,sphinx] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.speech import manifest, pcm, silence, wer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CHUNK_S = 0.08
CHUNK = int(16000 * 2 * CHUNK_S)
GAP_S = 1.0
SUSTAIN_BACKLOG_S = 1.0
SUSTAIN_EOT_P95_S = 1.5
STREAM_COUNTS = {"whisper": [1, 2, 3, 4, 5, 6], "sphinx": [2, 3, 4, 5, 6, 8]}
QUICK_COUNTS = {"whisper": [1, 3], "sphinx": [2, 4]}


def progress(message: str) -> None:
    print(f"[bench-engines {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(name: str, max_streams: int):
    if name == "whisper":
        from relay.engines.offline.whisper import WhisperEngine

        engine = WhisperEngine("bench-whisper", {"max_streams": max_streams, "max_queue_wait_s": 600})
        engine.wait_loaded_sync(300)
        return engine
    if name == "sphinx":
        from relay.engines.offline.sphinx import SphinxEngine

        return SphinxEngine("bench-sphinx", {"max_streams": max_streams, "max_queue_wait_s": 600})
    raise SystemExit(f"unknown engine {name}")


def conversation() -> tuple[bytes, list[dict]]:
    """The long clip then every sentence, 1 s apart, with where each turn's speech is."""
    m = manifest()
    audio = bytearray(pcm("long.wav"))
    turns = [dict(t) for t in m["long"]["turns"]]
    for clip in m["clips"]:
        offset = len(audio) / 32000
        audio += pcm(clip["file"]) + silence(GAP_S)
        turns.append({"text": clip["text"], "speech_start": offset + clip["speech_start"], "speech_end": offset + clip["speech_end"]})
    return bytes(audio), turns


async def accuracy(engine) -> dict[str, Any]:
    from relay.engines.base import StreamOptions
    from tests.support.speech import finals, run_stream

    m = manifest()
    refs, hyps = [], []
    for clip in m["clips"]:
        events = await run_stream(engine.open_stream(StreamOptions()), pcm(clip["file"]) + silence(0.3))
        refs.append(clip["text"])
        hyps.append(" ".join(e.transcript for e in finals(events)))
    events = await run_stream(engine.open_stream(StreamOptions()), pcm("long.wav"))
    long_hyp = " ".join(e.transcript for e in finals(events))
    long_ref = " ".join(t["text"] for t in m["long"]["turns"])
    return {
        "wer": wer(refs + [long_ref], hyps + [long_hyp]),
        "wer_sentences": wer(refs, hyps),
        "wer_long": wer([long_ref], [long_hyp]),
        "words": sum(len(r.split()) for r in refs + [long_ref]),
        "examples": [{"reference": r, "hypothesis": h} for r, h in zip(refs, hyps)],
    }


async def realtime_stream(engine, audio: bytes, turns: list[dict], start_at: float, options=None) -> dict[str, Any]:
    """Send ``audio`` paced in real time from ``start_at`` (loop time); time every event."""
    from relay.engines.base import StreamOptions, TurnEvent

    loop = asyncio.get_running_loop()
    stream = engine.open_stream(options or StreamOptions())
    await stream.start()
    events: list[tuple[float, Any]] = []

    async def collect() -> None:
        async for item in stream.events():
            if isinstance(item, TurnEvent):
                events.append((loop.time() - start_at, item))

    pump = loop.create_task(collect())
    max_backlog = 0.0
    n = -(-len(audio) // CHUNK)
    for i in range(n):
        delay = start_at + (i + 1) * CHUNK_S - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        stream.feed(audio[i * CHUNK : (i + 1) * CHUNK])
        max_backlog = max(max_backlog, stream.backlog_seconds)
    await stream.finish()
    await pump

    eot, first_update, update_gaps = [], [], []
    ends = [(t, e) for t, e in events if e.event == "EndOfTurn"]
    for turn in turns:
        # The EndOfTurn whose window covers this speech; the first Update of that engine turn.
        match = [(t, e) for t, e in ends if e.audio_window_start <= turn["speech_start"] + 0.3 and e.audio_window_end >= turn["speech_end"]]
        if not match:
            continue
        t_end, end = match[0]
        eot.append(t_end - turn["speech_end"])
        updates = [t for t, e in events if e.turn == end.turn and e.event == "Update"]
        if updates:
            first_update.append(updates[0] - turn["speech_start"])
            update_gaps += list(np.diff(updates))
    return {
        "turns_expected": len(turns),
        "turns_ended": len(eot),
        "eot": eot,
        "first_update": first_update,
        "update_gaps": update_gaps,
        "max_backlog": max_backlog,
        "transcripts": [e.transcript for _, e in ends],
    }


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


async def latency(engine) -> dict[str, Any]:
    audio, turns = conversation()
    loop = asyncio.get_running_loop()
    timings = getattr(getattr(engine, "runner", None), "timings", None)
    if timings:
        timings[True].clear()
        timings[False].clear()
    load_before = os.getloadavg()[0]
    cpu0, wall0 = time.process_time(), time.monotonic()
    result = await realtime_stream(engine, audio, turns, loop.time() + 0.2)
    cpu = time.process_time() - cpu0
    seconds = len(audio) / 32000
    extra = {}
    if timings:
        extra = {"final_decode_p50": pct(timings[True], 50), "update_decode_p50": pct(timings[False], 50)}
    return {
        **extra,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "audio_seconds": round(seconds, 2),
        "cpu_per_audio_second": round(cpu / seconds, 4),
        "eot_p50": pct(result["eot"], 50),
        "eot_p95": pct(result["eot"], 95),
        "first_update_p50": pct(result["first_update"], 50),
        "first_update_p95": pct(result["first_update"], 95),
        "update_interval_p50": pct(result["update_gaps"], 50),
        "turns_ended": result["turns_ended"],
        "turns_expected": result["turns_expected"],
        "max_backlog": round(result["max_backlog"], 3),
        "wall_seconds": round(time.monotonic() - wall0, 1),
    }


async def concurrency(engine, counts: list[int]) -> list[dict[str, Any]]:
    audio = pcm("long.wav") + silence(1.0)
    turns = manifest()["long"]["turns"]
    rows = []
    for n in counts:
        progress(f"{engine.name}: {n} concurrent real-time streams ({len(audio) / 32000:.0f} s)")
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.3
        cpu0 = time.process_time()
        # Staggered starts so the streams' turns do not all end at the same instant.
        results = await asyncio.gather(*(realtime_stream(engine, audio, turns, start + i * 0.37) for i in range(n)))
        cpu = time.process_time() - cpu0
        eot = [x for r in results for x in r["eot"]]
        first = [x for r in results for x in r["first_update"]]
        gaps = [x for r in results for x in r["update_gaps"]]
        ended = all(r["turns_ended"] == len(turns) for r in results)
        backlog = max(r["max_backlog"] for r in results)
        row = {
            "streams": n,
            "eot_p50": pct(eot, 50),
            "eot_p95": pct(eot, 95),
            "first_update_p95": pct(first, 95),
            "update_interval_p50": pct(gaps, 50),
            "max_backlog": round(backlog, 3),
            "all_turns_ended": ended,
            "cpu_cores_used": round(cpu / (len(audio) / 32000 + n * 0.37), 2),
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
        row["keeps_up"] = bool(ended and backlog <= SUSTAIN_BACKLOG_S)
        row["sustained"] = bool(row["keeps_up"] and (row["eot_p95"] or 99) <= SUSTAIN_EOT_P95_S)
        progress(f"{engine.name}: {row}")
        rows.append(row)
        if not row["keeps_up"] or (row["eot_p95"] or 99) > 2 * SUSTAIN_EOT_P95_S:
            break
    return rows


async def bench_one(name: str, quick: bool) -> dict[str, Any]:
    counts = (QUICK_COUNTS if quick else STREAM_COUNTS)[name]
    started = time.monotonic()
    progress(f"{name}: loading")
    engine = build(name, max_streams=max(counts) + 2)
    load_seconds = round(time.monotonic() - started, 2)
    progress(f"{name}: accuracy over {len(manifest()['clips'])} sentences and the long clip")
    acc = await accuracy(engine)
    progress(f"{name}: WER {acc['wer']:.3f}; one real-time stream over the conversation")
    lat = await latency(engine)
    progress(f"{name}: {lat}")
    conc = await concurrency(engine, counts)
    # The largest N such that every count up to it passed (a lucky pass after a failure does not count).
    passed = [r["streams"] for r in conc if r["sustained"]]
    failed = [r["streams"] for r in conc if not r["sustained"]]
    sustained = max([n for n in passed if not failed or n < min(failed)], default=0)
    up_failed = [r["streams"] for r in conc if not r["keeps_up"]]
    keeps_up = max([r["streams"] for r in conc if r["keeps_up"] and (not up_failed or r["streams"] < min(up_failed))], default=0)
    engine.close()
    return {
        "engine": name,
        "load_seconds": load_seconds,
        **{k: v for k, v in acc.items() if k != "examples"},
        **lat,
        "concurrency": conc,
        "sustained_streams": sustained,
        "keeps_up_streams": keeps_up,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "examples": acc["examples"],
    }


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["engine"] for r in results]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].bar(names, [r["wer"] * 100 for r in results], color=["#4477aa", "#cc6677"][: len(names)])
    axes[0].set_title("WER (%)")
    axes[1].bar(names, [r["cpu_per_audio_second"] for r in results], color=["#4477aa", "#cc6677"][: len(names)])
    axes[1].set_title("CPU s per audio s (1 stream)")
    x = np.arange(len(names))
    for i, (key, label) in enumerate([("eot_p50", "EndOfTurn p50"), ("eot_p95", "EndOfTurn p95"), ("first_update_p50", "first Update p50")]):
        axes[2].bar(x + (i - 1) * 0.25, [r[key] or 0 for r in results], 0.25, label=label)
    axes[2].set_xticks(x, names)
    axes[2].set_title("latency (s)")
    axes[2].legend(fontsize=8)
    for r in results:
        rows = r["concurrency"]
        axes[3].plot([c["streams"] for c in rows], [c["eot_p95"] or 0 for c in rows], marker="o", label=f"{r['engine']} (sustains {r['sustained_streams']})")
    axes[3].axhline(SUSTAIN_EOT_P95_S, color="grey", linestyle="--", linewidth=1)
    axes[3].set_title("EndOfTurn p95 (s) vs concurrent streams")
    axes[3].set_xlabel("real-time streams")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"Relay embedded engines on {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | WER | CPU s / audio s | EndOfTurn p50 / p95 | first Update p50 / p95 | peak RSS | streams sustained (EndOfTurn p95 <= 1.5 s) | streams kept up (backlog < 1 s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['engine']} | {r['wer'] * 100:.1f} % | {r['cpu_per_audio_second']:.3f} | {r['eot_p50']} s / {r['eot_p95']} s | "
            f"{r['first_update_p50']} s / {r['first_update_p95']} s | {r['peak_rss_mb']:.0f} MB | {r['sustained_streams']} | {r['keeps_up_streams']} (of {r['concurrency'][-1]['streams']} tried) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the embedded engines.")
    parser.add_argument("--engines", default="whisper,sphinx")
    parser.add_argument("--quick", action="store_true", help="fewer concurrency steps")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one engine, JSON on stdout
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(bench_one(args.one, args.quick))))
        return
    names = args.engines.split(",")
    fresh = {}
    for name in names:
        cmd = [sys.executable, "-m", "bench.engine_interface", "--one", name] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
        fresh[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        fresh[name]["generated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # Engines not run this time keep their previous figures (each result carries its own date).
    previous = []
    if (args.out / "engine-interface.json").is_file():
        previous = [r for r in json.loads((args.out / "engine-interface.json").read_text()).get("results", []) if r["engine"] not in fresh]
    results = sorted(previous + list(fresh.values()), key=lambda r: ["whisper", "sphinx"].index(r["engine"]) if r["engine"] in ("whisper", "sphinx") else 9)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m bench.engine_interface " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "criteria": {"sustained_backlog_s": SUSTAIN_BACKLOG_S, "sustained_eot_p95_s": SUSTAIN_EOT_P95_S},
        "results": results,
    }
    (args.out / "engine-interface.json").write_text(json.dumps(report, indent=1) + "\n")
    chart(results, args.out / "engine-interface.png")
    print(table(results))
    for r in results:
        print(f"\n{r['engine']} concurrency:")
        for row in r["concurrency"]:
            print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    print(f"\nwrote {args.out / 'engine-interface.json'} and {args.out / 'engine-interface.png'}")


if __name__ == "__main__":
    main()
