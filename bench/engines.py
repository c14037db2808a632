"""The embedded engine as users meet it: `make bench-engines`.

A real relay (daphne, PostgreSQL, Redis, ``RELAY_ENGINE=whisper`` unless ``--engine`` says
otherwise) and WebSocket clients on ``/v2/listen`` that send 80 ms linear16 frames when they
would have been recorded (real time), read every message, and time it. Speech comes from the
committed sets (tests/fixtures/speech: espeak-ng ``long.wav``; tests/fixtures/speech/turns:
flite and festival conversations and sentences with pauses inside them, made by
scripts/make_turn_audio.py). Phases:

1. **short turns**: each one- or two-word clip at the very start of a stream, then again after
   4 s of room noise, three streams at a time (one the relay refuses with CAPACITY tries again a
   second later); right or wrong after normalizing, next to what
   faster-whisper says offline on the same clip with the same model (beam 5, no VAD);
2. **streams**: 1, 4, 8 and 12 concurrent speakers (starts 0.37 s apart), each over the same
   ~2 minute session (both conversations, the ten sentences with pauses, ``long.wav``; pieces
   rotated per stream), with the engine's own capacity limit: end of speech -> EndOfTurn p50/p95,
   start of speech -> first Update p50, WER (whole session, jiwer, lower-cased, no punctuation),
   early closes (a sentence with a pause inside it ended as two turns or more), refusals
   (``CAPACITY``), CPU of the relay process per served stream, peak RSS;
3. **determinism**: one connection streams ``conv_b.wav`` five times in a row in real time
   (distinct transcripts among the five), and one connection streams it at full speed (same
   transcript as the first real-time loop?).

Writes bench/results/engines.json, engines.md (the tables) and engines.png; progress goes to
stderr. ``--quick`` is a smoke run (1 and 2 streams, a short session, two loops); ``--at REV``
runs the relay of a commit (so a "before" can be measured while the checkout is being edited);
``--compare OLD.json`` sets the figures against an earlier run in the table and the chart.

    .venv/bin/python -m bench.engines [--quick] [--streams 1,4,8,12] [--phases short,streams,determinism]
        [--env RELAY_WHISPER_MAX_STREAMS=16] [--at REV | --tree DIR] [--compare OLD.json] [--out DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.servers import MachineCPU, Server, machine_load  # noqa: E402
from tests.support.speech import SPEECH, manifest, pcm, turns_manifest, wer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RATE = 16000
FRAME_S = 0.08
FRAME = int(RATE * 2 * FRAME_S)
STAGGER_S = 0.37
#: Quiet before each load level. The relay's admission signals average the last 2 s
#: (relay/live/admission.py, WINDOW), so without it the tail of one phase (its last finals and
#: flushes) could refuse the next level's streams with CAPACITY.
SETTLE_S = 3.0
GAP_S = 1.5  # room noise after each piece of a session
NOISE_RMS = 16.0  # the fixtures' noise floor (about -66 dBFS)
LONG_SILENCE_S = 4.0
SHORT_AT_ONCE = 3  # short-turn streams at once
CAPACITY_RETRIES = 60
STREAM_COUNTS = [1, 4, 8, 12]
QUICK_COUNTS = [1, 2]
LOOPS = 5
QUERY = "/v2/listen?encoding=linear16&sample_rate=16000"
LIVE = {"open": 0, "eot": 0, "refused": 0}  # running counts for the progress lines


def progress(message: str) -> None:
    print(f"[bench-engines {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def room(seconds: float, seed: int) -> bytes:
    """Room noise at the fixtures' level: pauses between pieces are never digital silence."""
    noise = np.random.default_rng(seed).normal(0.0, NOISE_RMS, int(round(seconds * RATE)))
    return np.clip(noise, -32768, 32767).astype("<i2").tobytes()


# --- what each stream says -------------------------------------------------------------------


#: ``--pauses``: which rendering of the sentences with a pause inside the session streams
PAUSE_KINDS = {"split": "pause", "whole": "pause_whole"}


def pieces(quick: bool, pauses: str = "split") -> list[dict[str, Any]]:
    """The session's pieces: audio and reference turns (times relative to the piece).

    ``pauses``: ``split`` streams the sentences whose halves were synthesized apart (the first half
    ends with a finished sentence's pitch), ``whole`` the same sentences spoken as one utterance
    (tests/fixtures/speech/turns, kinds ``pause`` and ``pause_whole``)."""
    tm = turns_manifest()
    out = []
    for conv in tm["conversations"][: 1 if quick else None]:
        out.append({"name": conv["file"], "audio": pcm("turns/" + conv["file"]), "turns": [dict(t, kind="conversation", split=conv["split"]) for t in conv["turns"]]})
    for clip in [c for c in tm["clips"] if c["kind"] == PAUSE_KINDS[pauses]][: 2 if quick else None]:
        out.append({"name": clip["file"], "audio": pcm("turns/" + clip["file"]), "turns": [dict(clip, kind="pause")]})
    if not quick:
        m = manifest()
        out.append({"name": "long.wav", "audio": pcm("long.wav"), "turns": [dict(t, kind="espeak", split="espeak") for t in m["long"]["turns"]]})
    return out


def session(parts: list[dict[str, Any]], rotate: int, seed: int) -> tuple[bytes, list[dict[str, Any]]]:
    """The pieces rotated by ``rotate``, each followed by GAP_S of room noise; turns in stream time."""
    k = rotate % len(parts)
    audio, turns = bytearray(room(0.3, seed)), []
    for i, part in enumerate(parts[k:] + parts[:k]):
        offset = len(audio) / (2 * RATE)
        for t in part["turns"]:
            turns.append({**t, "piece": part["name"], "speech_start": offset + t["speech_start"], "speech_end": offset + t["speech_end"],
                          "pauses": [{**p, "start": offset + p["start"], "end": offset + p["end"]} for p in t.get("pauses", [])]})
        audio += part["audio"] + room(GAP_S, seed * 1000 + i)
    return bytes(audio), turns


# --- one WebSocket speaker -------------------------------------------------------------------


async def speak(url: str, audio: bytes, start_delay: float, *, realtime: bool = True) -> dict[str, Any]:
    """Connect, send ``audio`` in 80 ms frames (paced from a clock that starts ``start_delay`` after
    the connection opens, or as fast as the relay takes them), CloseStream, read until the close.
    Every message is kept with its arrival time in audio seconds (time since the first frame's
    recording began)."""
    import websockets

    loop = asyncio.get_running_loop()
    messages: list[tuple[float, dict]] = []
    refused = reason = None
    try:
        ws = await websockets.connect(url, max_size=None, open_timeout=60)
    except Exception as exc:  # noqa: BLE001 - an HTTP-level refusal is a refusal too
        return {"refused": f"connect: {exc}", "reason": str(exc), "messages": [], "close_code": None}
    t0 = loop.time() + start_delay
    LIVE["open"] += 1
    async with ws:

        async def read() -> None:
            nonlocal refused, reason
            try:
                async for raw in ws:
                    if isinstance(raw, bytes):
                        continue
                    msg = json.loads(raw)
                    messages.append((loop.time() - t0, msg))
                    if msg.get("type") == "Error":
                        refused, reason = msg.get("code"), msg.get("description")
                        LIVE["refused"] += 1
                    elif msg.get("event") == "EndOfTurn":
                        LIVE["eot"] += 1
            except websockets.ConnectionClosed:  # a refusal closes with 4013: the close code says it
                pass

        reader = loop.create_task(read())
        n = -(-len(audio) // FRAME)
        try:
            for i in range(n):
                if realtime:
                    delay = t0 + (i + 1) * FRAME_S - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if reader.done():
                    break
                await ws.send(audio[i * FRAME : (i + 1) * FRAME])
            if not reader.done():
                await ws.send(json.dumps({"type": "CloseStream"}))
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(reader, 120)
    LIVE["open"] -= 1
    if refused is None and ws.close_code not in (1000, None):
        refused, reason = f"close {ws.close_code}", ws.close_reason
    return {"refused": refused, "reason": reason, "messages": messages, "close_code": ws.close_code, "sent_s": len(audio) / (2 * RATE)}


def score(result: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Match EndOfTurns to reference turns by audio window overlap; latency, early closes, WER."""
    infos = [(t, m) for t, m in result["messages"] if m.get("type") == "TurnInfo"]
    ends = [(t, m) for t, m in infos if m["event"] == "EndOfTurn"]
    assigned: dict[int, list[tuple[float, dict]]] = {i: [] for i in range(len(turns))}
    spurious = merged = 0
    for t, m in ends:
        ws, we = m["audio_window_start"], m["audio_window_end"]
        overlaps = [max(0.0, min(we, r["speech_end"]) - max(ws, r["speech_start"])) for r in turns]
        best = int(np.argmax(overlaps)) if overlaps else -1
        if best < 0 or overlaps[best] <= 0:
            spurious += 1
            continue
        if sum(1 for o in overlaps if o > 0.15) > 1:
            merged += 1
        assigned[best].append((t, m))
    eot, first_update, eot_conf, early, paused, per_turn = [], [], [], 0, 0, []
    by_kind: dict[str, list[float]] = {}
    for i, ref in enumerate(turns):
        got = assigned[i]
        has_pause = bool(ref.get("pauses"))
        paused += has_pause
        early += has_pause and len(got) > 1
        if not got:
            per_turn.append({"text": ref["text"], "kind": ref["kind"], "latency": None, "paused": has_pause, "finals": []})
            continue
        t_end, last = got[-1]
        latency = t_end - ref["speech_end"]
        per_turn.append({"text": ref["text"], "kind": ref["kind"], "latency": round(latency, 3), "paused": has_pause,
                         "confidence": last.get("end_of_turn_confidence"), "finals": [m["transcript"] for _, m in got]})
        eot.append(latency)
        by_kind.setdefault(ref["kind"], []).append(latency)
        eot_conf.append(last.get("end_of_turn_confidence"))
        first_turn = got[0][1]["turn_index"]
        updates = [t for t, m in infos if m["turn_index"] == first_turn and m["event"] == "Update"]
        if updates:
            first_update.append(updates[0] - ref["speech_start"])
    hyp = " ".join(m["transcript"] for _, m in ends)
    ref_text = " ".join(r["text"] for r in turns)
    return {
        "eot": eot, "first_update": first_update, "eot_by_kind": by_kind, "eot_confidence": eot_conf,
        "turns": len(turns), "turns_ended": sum(1 for g in assigned.values() if g), "paused_turns": paused, "early_closes": early,
        "spurious": spurious, "merged": merged, "reference": ref_text, "hypothesis": hyp,
        "per_turn": per_turn, "finals": [m["transcript"] for _, m in ends], "turn_hyps": [" ".join(m["transcript"] for _, m in assigned[i]) for i in range(len(turns))],
        "wer": wer([ref_text], [hyp]) if hyp or ref_text else 0.0,
    }


# --- the relay process -----------------------------------------------------------------------


class Sampler:
    """The relay process's CPU and peak RSS (all its threads: the engine's workers included)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak_rss = 0
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self.server.rss())
            await asyncio.sleep(0.5)

    def __enter__(self) -> "Sampler":
        self.peak_rss = self.server.rss()
        self.cpu0, self.wall0, self.machine = self.server.cpu(), time.monotonic(), MachineCPU()
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        self.cpu = self.server.cpu() - self.cpu0
        self.wall = time.monotonic() - self.wall0
        self.machine_cores = self.machine.busy_cores()


async def ticker(label: str, total_s: float) -> None:
    started, seen = time.monotonic(), dict(LIVE)
    while True:
        await asyncio.sleep(10)
        progress(f"{label}: {time.monotonic() - started:4.0f} s of ~{total_s:.0f} s, {LIVE['open'] - seen['open']} streams open, "
                 f"{LIVE['eot'] - seen['eot']} EndOfTurns, {LIVE['refused'] - seen['refused']} refused, load {os.getloadavg()[0]:.1f}")


# --- phases ----------------------------------------------------------------------------------


def offline_short(clips: list[dict[str, Any]]) -> dict[str, str]:
    """What faster-whisper says offline on each short clip (same bundled model, beam 5, English)."""
    from faster_whisper import WhisperModel

    from relay.engines.offline.whisper.model import bundled_model_dir

    model = WhisperModel(str(bundled_model_dir()), device="cpu", compute_type="int8", cpu_threads=1)
    out = {}
    for clip in clips:
        audio = np.frombuffer(pcm("turns/" + clip["file"]), dtype="<i2").astype(np.float32) / 32768
        segments, _ = model.transcribe(audio, language="en", beam_size=5)
        out[clip["file"]] = " ".join(s.text.strip() for s in segments)
    return out


def same_words(a: str, b: str) -> bool:
    return wer([a], [b]) == 0.0 if a.strip() else not b.strip()


async def short_turns(url: str, quick: bool, offline: dict[str, str]) -> dict[str, Any]:
    clips = [c for c in turns_manifest()["clips"] if c["kind"] == "short"][: 2 if quick else None]
    progress(f"short turns: {len(clips)} clips at the start of a stream and after {LONG_SILENCE_S:.0f} s of silence")
    rows, sem = [], asyncio.Semaphore(SHORT_AT_ONCE)

    async def one(i: int, clip: dict) -> None:
        audio = pcm("turns/" + clip["file"])
        gap = room(LONG_SILENCE_S, 500 + i)
        second = len(audio) / (2 * RATE) + LONG_SILENCE_S
        turns = [
            {**clip, "kind": "short-start"},
            {**clip, "kind": "short-after-silence", "speech_start": second + clip["speech_start"], "speech_end": second + clip["speech_end"]},
        ]
        async with sem:
            for _ in range(CAPACITY_RETRIES):  # a box with a lower cap than SHORT_AT_ONCE: try again later, as 4013 says
                res = await speak(url, audio + gap + audio + room(GAP_S, 600 + i), 0.05)
                if res["refused"] != "CAPACITY":
                    break
                await asyncio.sleep(1.0)
        if res["refused"]:
            rows.append({"file": clip["file"], "refused": res["refused"]})
            return
        s = score(res, turns)
        first, later = s["turn_hyps"]
        rows.append({
            "file": clip["file"], "split": clip["split"], "reference": clip["text"], "offline": offline.get(clip["file"], ""),
            "at_start": first, "after_silence": later, "spurious": s["spurious"],
            "start_ok": same_words(clip["text"], first), "after_silence_ok": same_words(clip["text"], later),
            "offline_ok": same_words(clip["text"], offline.get(clip["file"], "")), "eot": s["eot"],
        })

    await asyncio.gather(*(one(i, c) for i, c in enumerate(clips)))
    rows.sort(key=lambda r: r["file"])
    ok = [r for r in rows if "refused" not in r]
    eot = [x for r in ok for x in r["eot"]]
    return {
        "clips": rows,
        "start_right": sum(r["start_ok"] for r in ok), "after_silence_right": sum(r["after_silence_ok"] for r in ok),
        "offline_right": sum(r["offline_ok"] for r in ok), "count": len(ok),
        "eot_p50": pct(eot, 50), "eot_p95": pct(eot, 95),
    }


async def streams_level(server: Server, url: str, n: int, parts: list[dict[str, Any]]) -> dict[str, Any]:
    sessions = [session(parts, i * 3, 7 + i) for i in range(n)]
    total = max(len(a) for a, _ in sessions) / (2 * RATE) + n * STAGGER_S
    progress(f"{n} concurrent real-time streams, ~{total:.0f} s")
    load0 = machine_load()["load1"]
    with Sampler(server) as sampler:
        tick = asyncio.get_running_loop().create_task(ticker(f"{n} streams", total))
        try:
            results = await asyncio.gather(*(speak(url, audio, 0.3 + i * STAGGER_S) for i, (audio, _) in enumerate(sessions)))
        finally:
            tick.cancel()
    served = [(r, turns) for r, (_, turns) in zip(results, sessions) if not r["refused"]]
    refused = [r["refused"] for r in results if r["refused"]]
    scores = [score(r, turns) for r, turns in served]
    eot = [x for s in scores for x in s["eot"]]
    by_kind: dict[str, list[float]] = {}
    for s in scores:
        for kind, values in s["eot_by_kind"].items():
            by_kind.setdefault(kind, []).extend(values)
    refs = [s["reference"] for s in scores]
    hyps = [s["hypothesis"] for s in scores]
    split_wer = {}
    for split in ("tune", "held_out", "espeak"):
        pairs = [(ref["text"], hyp) for (_, turns), s in zip(served, scores) for ref, hyp in zip(turns, s["turn_hyps"]) if ref["split"] == split]
        split_wer[split] = round(wer([p[0] for p in pairs], [p[1] for p in pairs]), 4) if pairs else None
    paused = sum(s["paused_turns"] for s in scores)
    early = sum(s["early_closes"] for s in scores)
    row = {
        "streams": n,
        "served": len(served),
        "refused": len(refused),
        # "code: description" -> count: which limit refused (the engine's cap, its queue, the process's load)
        "refusals": dict(collections.Counter(f"{r['refused']}: {r.get('reason')}" for r in results if r["refused"])),
        "eot_p50": pct(eot, 50),
        "eot_p95": pct(eot, 95),
        "eot_p50_by_kind": {k: pct(v, 50) for k, v in sorted(by_kind.items())},
        "eot_p95_by_kind": {k: pct(v, 95) for k, v in sorted(by_kind.items())},
        "first_update_p50": pct([x for s in scores for x in s["first_update"]], 50),
        "first_update_p95": pct([x for s in scores for x in s["first_update"]], 95),
        "wer": round(wer(refs, hyps), 4) if served else None,
        "wer_per_stream": [round(s["wer"], 4) for s in scores],
        "wer_by_split": split_wer,  # per turn, EndOfTurns matched to turns by audio window
        "turns": sum(s["turns"] for s in scores),
        "turns_ended": sum(s["turns_ended"] for s in scores),
        "paused_turns": paused,
        "early_closes": early,
        "early_close_rate": round(early / paused, 3) if paused else None,
        "spurious_turns": sum(s["spurious"] for s in scores),
        "merged_turns": sum(s["merged"] for s in scores),
        "eot_confidence_p50": pct([c for s in scores for c in s["eot_confidence"] if c is not None], 50),
        "relay_cores": round(sampler.cpu / sampler.wall, 3),
        "cpu_per_stream": round(sampler.cpu / sampler.wall / len(served), 3) if served else None,
        "machine_busy_cores": round(sampler.machine_cores, 2),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "load_average_1m": [load0, machine_load()["load1"]],
        "audio_seconds": round(total, 1),
        "examples": [{"reference": s["reference"], "hypothesis": s["hypothesis"]} for s in scores[:1]],
        # The first stream's turns in order: EndOfTurn latency, confidence and finals, to read the tail by.
        "first_stream_turns": scores[0]["per_turn"] if scores else [],
    }
    progress(f"{n} streams: " + ", ".join(f"{k}={row[k]}" for k in ("served", "refused", "eot_p50", "eot_p95", "first_update_p50", "wer", "early_close_rate", "cpu_per_stream", "peak_rss_mb")))
    return row


#: How many of the first stream's slowest turns the report lists.
SLOWEST = 5

VAD_WINDOW = 512  # samples: the whisper engine's 32 ms Silero window


async def loops_on_one_connection(url: str, audio: bytes, loops: int, ref: str) -> dict[str, Any]:
    """``audio`` ``loops`` times in a row on one real-time connection: each loop's transcript."""
    seconds = len(audio) / (2 * RATE)
    res = await speak(url, audio * loops, 0.3)
    ends = [m for _, m in res["messages"] if m.get("event") == "EndOfTurn"]
    per_loop = []
    for k in range(loops):
        lo, hi = k * seconds, (k + 1) * seconds
        per_loop.append(" ".join(m["transcript"] for m in ends if lo <= (m["audio_window_start"] + m["audio_window_end"]) / 2 < hi))
    return {
        "loop_samples": len(audio) // 2, "refused": res["refused"],
        "distinct_transcripts": len(set(per_loop)),
        "distinct_after_normalizing": len({" ".join(w for ws in wer_words(t) for w in ws) for t in per_loop}),
        "transcripts": per_loop, "wer_per_loop": [round(wer([ref], [t]), 4) for t in per_loop],
    }


async def determinism(url: str, quick: bool) -> dict[str, Any]:
    """The issue's check (a recording of any length looped), the same with each loop a whole
    number of VAD windows (so every loop meets the same window boundaries), and full speed."""
    clip = turns_manifest()["conversations"][-1] if not quick else [c for c in turns_manifest()["clips"] if c["kind"] == "pause"][0]
    audio = pcm("turns/" + clip["file"]) + room(GAP_S, 77)
    ref = " ".join(t["text"] for t in (clip.get("turns") or [clip]))
    loops = 2 if quick else LOOPS
    seconds = len(audio) / (2 * RATE)
    progress(f"determinism: {clip['file']} {loops} times on one connection in real time (~{seconds * loops:.0f} s)")
    out: dict[str, Any] = {"file": clip["file"], "loops": loops, **await loops_on_one_connection(url, audio, loops, ref)}
    if not quick:
        pad = (-(len(audio) // 2)) % VAD_WINDOW
        progress(f"determinism: again with each loop padded by {pad} samples to a whole number of {VAD_WINDOW}-sample VAD windows")
        out["aligned"] = await loops_on_one_connection(url, audio + room(pad / RATE, 78), loops, ref)
    t0 = time.monotonic()
    fast = await speak(url, audio, 0.0, realtime=False)
    fast_text = " ".join(m["transcript"] for _, m in fast["messages"] if m.get("event") == "EndOfTurn")
    out.update({
        "refused": out["refused"] or fast["refused"],
        "full_speed": fast_text, "full_speed_wer": round(wer([ref], [fast_text]), 4), "full_speed_seconds": round(time.monotonic() - t0, 2),
        "full_speed_equals_realtime": fast_text == out["transcripts"][0],
    })
    return out


def wer_words(text: str) -> list[list[str]]:
    from tests.support.speech import _NORMALIZE

    return _NORMALIZE(text) if text.strip() else [[]]


async def warm_up(url: str) -> None:
    """One short stream at full speed: the model is loaded and every worker has decoded once."""
    res = await speak(url, pcm("s01.wav") + room(1.0, 1), 0.0, realtime=False)
    if res["refused"] or not any(m.get("event") == "EndOfTurn" for _, m in res["messages"]):
        raise SystemExit(f"the relay did not transcribe the warm-up clip: {res['refused'] or res['messages'][-3:]}")


async def run_all(args: argparse.Namespace, server: Server, offline: dict[str, str]) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{server.port}{QUERY}"
    progress("warming up (model load)")
    await warm_up(url)
    out: dict[str, Any] = {}
    if "short" in args.phases:
        with Sampler(server) as sampler:
            out["short_turns"] = await short_turns(url, args.quick, offline)
        out["short_turns"]["peak_rss_mb"] = round(sampler.peak_rss / 2**20, 1)
        progress(f"short turns: right at start {out['short_turns']['start_right']}/{out['short_turns']['count']}, "
                 f"after silence {out['short_turns']['after_silence_right']}, offline {out['short_turns']['offline_right']}")
    if "streams" in args.phases:
        parts = pieces(args.quick, args.pauses)
        out["streams"] = []
        for n in args.streams:
            await asyncio.sleep(SETTLE_S)
            out["streams"].append(await streams_level(server, url, n, parts))
            args.out.mkdir(parents=True, exist_ok=True)  # what is measured so far survives a crash
            (args.out / "engines.partial.json").write_text(json.dumps(out, indent=1) + "\n")
    if "determinism" in args.phases:
        out["determinism"] = d = await determinism(url, args.quick)
        progress(f"determinism: {d['distinct_transcripts']} distinct of {d['loops']}; full speed equals real time: {d['full_speed_equals_realtime']}")
    return out


# --- report ----------------------------------------------------------------------------------


def fmt(v: Any, unit: str = " s") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def percent(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v * 100:.{digits}f} %"


PAUSE_WORDING = {"split": "each half synthesized apart", "whole": "each spoken as one utterance"}


def markdown(report: dict[str, Any]) -> str:
    r = report
    lines = [
        f"# Embedded engine through the relay ({r['engine']})",
        "",
        f"{r['generated']}, `{r['command']}`, {r['machine']['cpus']} cores, relay env {r['env'] or 'defaults'}; "
        f"1-minute load average {r['load_before']['load1']} before, {r['load_after']['load1']} after; "
        f"sentences with a pause inside: {PAUSE_WORDING[r.get('pauses', 'split')]}. "
        "Real-time WebSocket speakers on `/v2/listen`; see bench/engines.py for the method.",
        "",
    ]
    if "streams" in r:
        lines += streams_markdown(r)
    if "short_turns" in r:
        lines += short_markdown(r["short_turns"])
    if "determinism" in r:
        lines += determinism_markdown(r["determinism"])
    if r.get("compare"):
        lines += compare_markdown(r, r["compare"])
    return "\n".join(lines)


def compare_markdown(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """Now against an earlier run (``--compare``), stream count by stream count."""
    lines = ["", f"Against {before['tree']} ({before['generated']}, env {before['env'] or 'defaults'}): before -> now", "",
             "| streams | served / refused | EndOfTurn p50 | EndOfTurn p95 | first Update p50 | WER all | WER first stream | early closes |", "|---|---|---|---|---|---|---|---|"]
    old = {row["streams"]: row for row in before.get("streams", [])}
    for row in now.get("streams", []):
        b = old.get(row["streams"])
        if not b:
            continue
        lines.append(
            f"| {row['streams']} | {b['served']}/{b['refused']} -> {row['served']}/{row['refused']} | {fmt(b['eot_p50'])} -> {fmt(row['eot_p50'])} | "
            f"{fmt(b['eot_p95'])} -> {fmt(row['eot_p95'])} | {fmt(b['first_update_p50'])} -> {fmt(row['first_update_p50'])} | "
            f"{percent(b['wer'])} -> {percent(row['wer'])} | {percent(b['wer_per_stream'][0])} -> {percent(row['wer_per_stream'][0])} | "
            f"{percent(b['early_close_rate'], 0)} -> {percent(row['early_close_rate'], 0)} |"
        )
    for key, label in (("short_turns", "short turns right at start / after silence"),):
        if key in before and key in now:
            b, n = before[key], now[key]
            lines.append(f"\n{label}: {b['start_right']}/{b['count']}, {b['after_silence_right']}/{b['count']} -> "
                         f"{n['start_right']}/{n['count']}, {n['after_silence_right']}/{n['count']}")
    if "determinism" in before and "determinism" in now:
        b, n = before["determinism"], now["determinism"]
        lines.append(f"\ndistinct transcripts in {n['loops']} loops: {b['distinct_transcripts']} -> {n['distinct_transcripts']}; "
                     f"full speed equals real time: {b['full_speed_equals_realtime']} -> {n['full_speed_equals_realtime']}")
    return lines + [""]


def streams_markdown(r: dict[str, Any]) -> list[str]:
    lines = [
        "| streams | served / refused | EndOfTurn p50 / p95 | first Update p50 | WER all / first stream | early closes | relay CPU per stream | peak RSS | machine busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["streams"]:
        lines.append(
            f"| {row['streams']} | {row['served']} / {row['refused']} | {fmt(row['eot_p50'])} / {fmt(row['eot_p95'])} | "
            f"{fmt(row['first_update_p50'])} | {percent(row['wer'])} / {percent((row['wer_per_stream'] or [None])[0])} | "
            f"{row['early_closes']}/{row['paused_turns']} ({percent(row['early_close_rate'], 0)}) | "
            f"{fmt(row['cpu_per_stream'], ' cores')} | {row['peak_rss_mb']:.0f} MB | {row['machine_busy_cores']:.2f} cores |"
        )
    lines += ["", "EndOfTurn p50 / p95 by kind of turn (conversation: flite/festival turns; pause: sentences with a pause inside; espeak: long.wav):", ""]
    kinds = sorted({k for row in r["streams"] for k in row["eot_p50_by_kind"]})
    lines += ["| streams | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for row in r["streams"]:
        lines.append(f"| {row['streams']} | " + " | ".join(f"{fmt(row['eot_p50_by_kind'].get(k))} / {fmt(row['eot_p95_by_kind'].get(k))}" for k in kinds) + " |")
    lines += ["", "Refusals: " + ("; ".join(f"{row['streams']} streams: " + ", ".join(f"{count} x {why}" for why, count in row.get("refusals", {}).items())
                                         for row in r["streams"] if row["refused"]) or "none")]
    lines += ["", "The first stream's session is the one-stream session (same audio, same order); the others hold the same pieces "
              "in other orders, so *WER all* at N streams also differs from one stream by the order, and *first stream* by load only."]
    lines += ["", "Turns: " + "; ".join(f"{row['streams']} streams: {row['turns_ended']} of {row['turns']} ended, {row['spurious_turns']} EndOfTurns over no speech, "
                                       f"{row['merged_turns']} spanning two turns" for row in r["streams"])]
    lines += ["", "WER by split (per turn, EndOfTurns matched to turns by audio window): "
              + "; ".join(f"{row['streams']} streams: " + ", ".join(f"{k} {percent(v)}" for k, v in row["wer_by_split"].items()) for row in r["streams"]), ""]
    first = r["streams"][0] if r["streams"] else None
    slow = sorted((t for t in (first or {}).get("first_stream_turns", []) if t["latency"] is not None), key=lambda t: -t["latency"])[:SLOWEST]
    if slow:
        lines += [f"The {len(slow)} slowest EndOfTurns of the first stream at {first['streams']} streams (the tail of the p95):", "",
                  "| turn | kind | EndOfTurn after the speech | confidence | finals |", "|---|---|---|---|---|"]
        lines += [f"| {t['text']} | {t['kind']} | {fmt(t['latency'])} | {t['confidence']} | {' / '.join(t['finals'])} |" for t in slow]
        lines.append("")
    early = [t for t in (first or {}).get("first_stream_turns", []) if t.get("paused") and len(t["finals"]) > 1]
    if first:
        lines += [f"Early closes of the first stream at {first['streams']} streams ({len(early)} of the turns with a pause inside; "
                  "each EndOfTurn's transcript, in order):", ""]
        lines += [f"- {t['text']} -> {' | '.join(t['finals'])}" for t in early] or ["- none"]
        lines.append("")
    return lines


def short_markdown(s: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Short turns ({s['count']} clips; right = same words after normalizing): at the start of a stream {s['start_right']}/{s['count']}, "
        f"after {LONG_SILENCE_S:.0f} s of silence {s['after_silence_right']}/{s['count']}, offline faster-whisper {s['offline_right']}/{s['count']}; "
        f"EndOfTurn p50 / p95 {fmt(s['eot_p50'])} / {fmt(s['eot_p95'])}.",
        "",
        "| clip | split | reference | at start | after silence | offline faster-whisper |",
        "|---|---|---|---|---|---|",
    ]
    for c in s["clips"]:
        if "refused" in c:
            lines.append(f"| {c['file']} | | refused {c['refused']} | | | |")
        else:
            lines.append(f"| {c['file']} | {c['split']} | {c['reference']} | {c['at_start']!r} | {c['after_silence']!r} | {c['offline']!r} |")
    return lines


def determinism_markdown(d: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Determinism: `{d['file']}` {d['loops']} times on one connection in real time: {d['distinct_transcripts']} distinct transcripts "
        f"({d['distinct_after_normalizing']} after normalizing), WER per loop {', '.join(f'{w * 100:.1f} %' for w in d['wer_per_loop'])}; "
        f"at full speed ({d['full_speed_seconds']} s): WER {d['full_speed_wer'] * 100:.1f} %, same transcript as the first real-time loop: "
        f"{'yes' if d['full_speed_equals_realtime'] else 'no'}.",
        "",
    ]
    for i, t in enumerate(d["transcripts"], 1):
        lines.append(f"{i}. {t}")
    if "aligned" in d:
        a = d["aligned"]
        lines += ["", f"With each loop padded to a whole number of {VAD_WINDOW}-sample VAD windows ({a['loop_samples']} samples): "
                  f"{a['distinct_transcripts']} distinct transcripts ({a['distinct_after_normalizing']} after normalizing), "
                  f"WER per loop {', '.join(f'{w * 100:.1f} %' for w in a['wer_per_loop'])}.", ""]
        lines += [f"{i}. {t}" for i, t in enumerate(a["transcripts"], 1)]
    lines += ["", f"full speed: {d['full_speed']}", ""]
    return lines


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["streams"]
    x = [r["streams"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    axes[0].plot(x, [r["eot_p50"] or 0 for r in rows], marker="o", label="EndOfTurn p50")
    axes[0].plot(x, [r["eot_p95"] or 0 for r in rows], marker="o", label="EndOfTurn p95")
    axes[0].plot(x, [r["first_update_p50"] or 0 for r in rows], marker="s", label="first Update p50")
    before = [r for r in (report.get("compare") or {}).get("streams", [])]
    if before:
        bx = [r["streams"] for r in before]
        axes[0].plot(bx, [r["eot_p50"] or 0 for r in before], linestyle="--", color="C0", alpha=0.6, label="before: EndOfTurn p50")
        axes[0].plot(bx, [r["eot_p95"] or 0 for r in before], linestyle="--", color="C1", alpha=0.6, label="before: EndOfTurn p95")
        axes[1].plot(bx, [(r["wer"] or 0) * 100 for r in before], linestyle="--", color="C0", alpha=0.6, label="before: WER %")
        axes[1].plot(bx, [(r["early_close_rate"] or 0) * 100 for r in before], linestyle="--", color="C1", alpha=0.6, label="before: early closes %")
    axes[0].set_title("latency after end / start of speech (s)")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [(r["wer"] or 0) * 100 for r in rows], marker="o", label="WER %")
    axes[1].plot(x, [(r["early_close_rate"] or 0) * 100 for r in rows], marker="o", label="early closes %")
    axes[1].set_title("accuracy (%)")
    axes[1].legend(fontsize=8)
    axes[2].bar([str(v) for v in x], [r["served"] for r in rows], label="served")
    axes[2].bar([str(v) for v in x], [r["refused"] for r in rows], bottom=[r["served"] for r in rows], label="refused (CAPACITY)")
    axes[2].set_title("streams")
    axes[2].legend(fontsize=8)
    axes[3].plot(x, [r["cpu_per_stream"] or 0 for r in rows], marker="o", label="relay cores per served stream")
    axes[3].plot(x, [r["relay_cores"] for r in rows], marker="o", label="relay cores")
    ax = axes[3].twinx()
    ax.plot(x, [r["peak_rss_mb"] for r in rows], marker="x", color="grey", label="peak RSS (MB)")
    ax.set_ylabel("MB")
    axes[3].set_title("CPU (cores) and memory")
    axes[3].legend(fontsize=8, loc="upper left")
    for a in axes:
        a.set_xlabel("concurrent real-time streams")
    fig.suptitle(f"{report['engine']} through the relay, {report['machine']['cpus']} cores, {report['generated']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@contextlib.contextmanager
def source_tree(rev: str | None, tree: Path | None = None) -> Iterator[Path]:
    """The tree the relay runs from: this checkout, another directory, or ``rev`` exported to a
    temporary directory (read-only for the repository: ``git archive``), to measure a commit
    while others edit the checkout."""
    if tree or not rev:
        yield (tree or ROOT).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="relay-bench-engines-") as tmp:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def database(tree: Path) -> contextlib.AbstractContextManager[str]:
    """A fresh PostgreSQL database migrated by ``tree``'s own migrations; dropped afterwards."""
    from tests.support.services import postgres_database

    return postgres_database(root=tree)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The embedded engine through a real relay.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 and 2 streams, a short session")
    parser.add_argument("--streams", help="comma-separated stream counts (default 1,4,8,12)")
    parser.add_argument("--engine", default="whisper")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra relay environment, e.g. RELAY_WHISPER_MAX_STREAMS=16")
    parser.add_argument("--phases", default="short,streams,determinism", help="which phases to run (comma-separated)")
    parser.add_argument("--at", metavar="REV", help="run the relay from this commit (exported with git archive) instead of the working tree")
    parser.add_argument("--compare", type=Path, help="an earlier engines.json to set the figures against (table and chart)")
    parser.add_argument("--tree", type=Path, help="run the relay from this source directory instead of the working tree")
    parser.add_argument("--pauses", choices=sorted(PAUSE_KINDS), default="split",
                        help="the sentences with a pause inside: halves synthesized apart (split) or spoken as one utterance (whole)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.streams = [int(v) for v in args.streams.split(",")] if args.streams else (QUICK_COUNTS if args.quick else STREAM_COUNTS)
    args.phases = set(args.phases.split(","))
    extra = dict(e.split("=", 1) for e in args.env)
    os.chdir(ROOT)
    from tests.support.services import REDIS_URL

    shorts = [c for c in turns_manifest()["clips"] if c["kind"] == "short"][: 2 if args.quick else None]
    offline = {}
    if args.engine == "whisper" and "short" in args.phases:
        progress(f"offline faster-whisper over {len(shorts)} short clips")
        offline = offline_short(shorts)
    commit = subprocess.run(["git", "rev-parse", "--short", args.at or "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = not args.at and subprocess.run(["git", "status", "--porcelain", "relay"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if args.tree:
        commit = f"the tree at {args.tree}"
    elif args.at:
        args.at = commit  # one commit for the whole run, even if HEAD moves meanwhile
    load_before = machine_load()
    with source_tree(args.at, args.tree) as tree, database(tree) as db_url:
        env = {"DATABASE_URL": db_url, "DATABASE_CONN_MAX_AGE": "60", "REDIS_URL": REDIS_URL,
               "RELAY_CHANNEL_LAYER_BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
               "RELAY_ENGINE": args.engine, "RELAY_PRELOAD_ENGINE": "1", **extra}
        server = Server("daphne", env=env, name="engines", root=tree)
        progress(f"starting the relay ({args.engine}, {extra or 'default settings'})")
        server.start(timeout=180)
        try:
            measured = asyncio.run(run_all(args, server, offline))
        finally:
            server.stop()
            if server.errors.get("count"):
                progress(f"relay log errors: {server.errors}")
    report = {
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench-engines" + (f" BENCH_ENGINES_ARGS='{' '.join(argv if argv is not None else sys.argv[1:])}'" if (argv or sys.argv[1:]) else ""),
        "engine": args.engine,
        "env": extra,
        "tree": commit + (" + uncommitted changes under relay/" if dirty else ""),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "load_before": load_before,
        "load_after": machine_load(),
        "relay_log_errors": server.errors,
        "fixtures": str((SPEECH / "turns" / "manifest.json").relative_to(ROOT)),
        "pauses": args.pauses,
        **measured,
    }
    if args.compare:
        before = json.loads(args.compare.read_text())
        before.pop("compare", None)
        report["compare"] = {k: before[k] for k in ("tree", "generated", "env", "streams", "short_turns", "determinism") if k in before}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "engines.partial.json").unlink(missing_ok=True)
    md = markdown(report)
    (args.out / "engines.md").write_text(md)
    if "streams" in report:
        chart(report, args.out / "engines.png")
    print(md)
    print(f"wrote {args.out / 'engines.json'}, engines.md and engines.png")


if __name__ == "__main__":
    main()
