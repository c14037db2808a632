"""A turn-detection model against the whisper engine's own end-of-turn signal:
``python -m bench.turn_model`` (``make bench-turn-model``).

Issue #16 allows a small turn-detection model for the end of turn if its weights come from a
package the project can install, and asks for it to be measured against the heuristic. The one
found that qualifies is Smart Turn v3.2 (``smart-turn-v3.2-cpu.onnx``, 8.7 MB, BSD-2-Clause), which
pipecat-ai ships inside its wheel. Its dependencies (openai, numba, aiohttp, ...) are not needed
for the file, so ``make install-dev`` installs it without them (requirements-turn-model.txt);
nothing is downloaded at run time.
Smart Turn hears the audio (prosody and words) and answers P(turn finished).

LiveKit's on-device detector (livekit-local-inference) also bundles its weights, but its model
licence allows use only with the LiveKit Agents framework, so it is not measured here.

The labelled points are the turn-taking session of ``make bench-engines`` (bench/engines.py,
stream 1; ``--quick``: its short version, one conversation and two sentences): each pause inside a
sentence is *unfinished*, each turn's end *finished*. At each point:

* ``heuristic``: the completion probability the engine's speculative final computes
  (``WhisperModelRunner.decode(final=True).complete``), decoded from 400 ms before the turn's
  speech to 50 ms after the point, and the hangover the engine makes of it (defaults);
* ``smart-turn``: the model's probability on the turn's audio from 500 ms before its speech
  (pipecat's pre-speech default) to 64 ms after the point (when the engine's speculative final
  starts) and to 200 ms after it (pipecat's default VAD stop), the last 8 s at most, features from
  faster-whisper's extractor (80 log-mel bins, the waveform normalised first, as Smart Turn's
  training did).

Printed and written (``--out``, default bench/results/turn-model.md and .json): per point, and for
each scorer the AUC (the chance that a finished point scores above an unfinished one) and how
the scorer's own decision would end the unfinished points early or hold the finished ones.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engines import PAUSE_KINDS, PAUSE_WORDING, pieces, session  # noqa: E402

RATE = 16000
MODEL_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
PIPECAT = "pipecat-ai==1.14.0"
SMART_WINDOW_S = 8
SMART_PRE_SPEECH_S = 0.5
SPECULATE_S = 0.064
PIPECAT_STOP_S = 0.2
LEAD_S, TAIL_S = 0.4, 0.05


def progress(message: str) -> None:
    print(f"[bench-turn-model {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def model_path() -> Path:
    try:
        path = Path(str(importlib.metadata.distribution("pipecat-ai").locate_file(MODEL_FILE)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        sys.exit(f"Smart Turn's weights are not installed: .venv/bin/pip install --no-deps -r requirements-turn-model.txt ({PIPECAT})")
    return path


class SmartTurn:
    def __init__(self, path: Path) -> None:
        import onnxruntime as ort
        from faster_whisper.feature_extractor import FeatureExtractor

        options = ort.SessionOptions()
        options.inter_op_num_threads = options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=options)
        self.features = FeatureExtractor(feature_size=80, chunk_length=SMART_WINDOW_S)

    def __call__(self, pcm: np.ndarray) -> float:
        n = SMART_WINDOW_S * RATE
        x = pcm[-n:] if pcm.size > n else np.pad(pcm, (n - pcm.size, 0))  # the last 8 s, silence before
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        mel = self.features(x, padding=0)[:, : SMART_WINDOW_S * 100]
        return float(np.asarray(self.session.run(None, {"input_features": mel[None].astype(np.float32)})[0]).reshape(-1)[0])


def points(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in turns:
        for p in t.get("pauses", []):
            out.append({"label": "unfinished", "kind": t["kind"], "text": p["after"], "turn_start": t["speech_start"], "at": p["start"],
                        "pause_s": p["ms"] / 1000})
        out.append({"label": "finished", "kind": t["kind"], "text": t["text"], "turn_start": t["speech_start"], "at": t["speech_end"]})
    return out


def auc(finished: list[float], unfinished: list[float]) -> float:
    pairs = [(f > u) + 0.5 * (f == u) for f in finished for u in unfinished]
    return round(float(np.mean(pairs)), 3) if pairs else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "turn-model"))
    parser.add_argument("--quick", action="store_true", help="the short session: one conversation and two sentences (a smoke run)")
    parser.add_argument("--pauses", choices=sorted(PAUSE_KINDS), default="split",
                        help="the session's sentences with a pause inside: halves synthesized apart, or spoken as one utterance")
    args = parser.parse_args(argv)
    smart = SmartTurn(model_path())
    progress("loading the whisper engine")
    from relay.engines.offline.whisper import WhisperEngine
    from relay.engines.offline.whisper.stream import COMPLETE_HIGH, COMPLETE_LOW

    engine = WhisperEngine("bench-turn-model", {"max_queue_wait_s": 600})
    engine.wait_loaded_sync(300)
    audio, turns = session(pieces(args.quick, args.pauses), 0, 1)
    pcm = np.frombuffer(audio, "<i2").astype(np.float32) / 32768
    rows = points(turns)
    short, long = engine.eot_complete_s, engine.eot_incomplete_s
    for i, row in enumerate(rows):
        at, start = row["at"], row["turn_start"]
        piece = pcm[int((start - LEAD_S) * RATE) : int((at + TAIL_S) * RATE)]
        decoded = engine.runner.decode(piece, True, None)
        p = decoded.complete if decoded.complete is not None else 0.0
        q = min(1.0, max(0.0, (p - COMPLETE_LOW) / (COMPLETE_HIGH - COMPLETE_LOW)))
        row.update(words=decoded.text, heuristic=round(p, 3), hangover_s=round(long - q * (long - short), 3))
        for key, after in (("smart_64ms", SPECULATE_S), ("smart_200ms", PIPECAT_STOP_S)):
            row[key] = round(smart(pcm[int((start - SMART_PRE_SPEECH_S) * RATE) : int((at + after) * RATE)]), 3)
        progress(f"{i + 1}/{len(rows)} {row['label']:10} heuristic {row['heuristic']:.2f}  smart {row['smart_64ms']:.2f} / {row['smart_200ms']:.2f}  {row['words']}")
    summary = {}
    for key in ("heuristic", "smart_64ms", "smart_200ms"):
        fin = [r[key] for r in rows if r["label"] == "finished"]
        unf = [r[key] for r in rows if r["label"] == "unfinished"]
        summary[key] = {"auc": auc(fin, unf), "finished_median": round(float(np.median(fin)), 3), "unfinished_median": round(float(np.median(unf)), 3)}
        if key == "heuristic":  # the engine's decision: the turn ends when the pause reaches the hangover
            summary[key]["early"] = sum(r["hangover_s"] < r["pause_s"] for r in rows if r["label"] == "unfinished")
            summary[key]["finished_waiting_over_0.5_s"] = sum(r["hangover_s"] > 0.5 for r in rows if r["label"] == "finished")
        else:  # Smart Turn's own decision: finished above 0.5
            summary[key]["early"] = sum(v > 0.5 for v in unf)
            summary[key]["finished_waiting_over_0.5_s"] = sum(v <= 0.5 for v in fin)
    report = {
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"Smart Turn v3.2 ({MODEL_FILE} from {PIPECAT})", "quick": args.quick, "pauses": args.pauses,
        "points": rows, "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)


def markdown(report: dict[str, Any]) -> str:
    rows, s = report["points"], report["summary"]
    n_unf = sum(r["label"] == "unfinished" for r in rows)
    n_fin = len(rows) - n_unf
    whole = report.get("pauses") == "whole"
    lines = [
        "# A turn-detection model against the whisper engine's completion probability", "",
        f"{report['generated']}, `python -m bench.turn_model{' --quick' if report['quick'] else ''}{' --pauses whole' if whole else ''}`; {report['model']}. "
        f"Points: the turn-taking session of `make bench-engines` (stream 1): {n_unf} pauses inside a sentence (*unfinished*), {n_fin} turn ends "
        f"(*finished*); sentences with a pause inside: {PAUSE_WORDING[report.get('pauses', 'split')]}.", "",
        "| scorer | AUC (finished above unfinished) | median finished / unfinished | unfinished ended early | finished held |",
        "|---|---|---|---|---|",
    ]
    names = {"heuristic": "engine's completion probability (hangover rule)", "smart_64ms": "Smart Turn, 64 ms into the pause (> 0.5 = finished)",
             "smart_200ms": "Smart Turn, 200 ms into the pause (> 0.5 = finished)"}
    held = {"heuristic": "hangover over 0.5 s", "smart_64ms": "scored <= 0.5", "smart_200ms": "scored <= 0.5"}
    for key, name in names.items():
        v = s[key]
        lines.append(f"| {name} | {v['auc']} | {v['finished_median']} / {v['unfinished_median']} | {v['early']} of {n_unf} | "
                     f"{v['finished_waiting_over_0.5_s']} of {n_fin} ({held[key]}) |")
    lines += ["", "| point | kind | words decoded | heuristic p | hangover | Smart Turn 64 / 200 ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        pause = f" (pause {r['pause_s']:.1f} s)" if r["label"] == "unfinished" else ""
        lines.append(f"| {r['label']}{pause} | {r['kind']} | {r['words']} | {r['heuristic']} | {r['hangover_s']} s | {r['smart_64ms']} / {r['smart_200ms']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
