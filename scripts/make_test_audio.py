#!/usr/bin/env python3
"""Make the speech test set under tests/fixtures/speech/ with espeak-ng and sox.

Writes short single-sentence clips (several voices and speeds) and one long multi-turn clip,
all 16 kHz mono Int16 WAV, plus ``manifest.json`` with each clip's reference text, voice, speed
and where its speech starts and ends (found from the samples, so latency can be measured from
the real end of speech). The WAVs are committed: tests and benchmarks read them and never run
espeak-ng, whose output changes between versions. Re-run only to change the set:

    .venv/bin/python scripts/make_test_audio.py            # rewrite tests/fixtures/speech/
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "speech"
RATE = 16000
PAD_SECONDS = 0.25  # silence kept around each sentence; tests and benches append their own

# (voice, words per minute, text). No digits or abbreviations, and compounds in their dictionary
# spelling ("riverbank"), so a reference text has one spelling.
SENTENCES: list[tuple[str, int, str]] = [
    ("en-us", 165, "The quick brown fox jumps over the lazy dog near the riverbank."),
    ("en-gb", 150, "Please send the quarterly report to the finance team before Friday afternoon."),
    ("en-us+f3", 175, "Our meeting has been moved to the large conference room on the third floor."),
    ("en-gb-x-rp", 185, "The weather today will be cloudy with a chance of light rain in the evening."),
    ("en-us", 200, "Turn left at the next intersection and continue straight for about a mile."),
    ("en-gb+f2", 160, "I would like to order a cup of coffee and a slice of chocolate cake."),
    ("en-us+m3", 145, "The library closes early on Sundays so please return your books on time."),
    ("en-gb-x-rp", 170, "Scientists have discovered a new species of frog in the tropical forest."),
    ("en-us+f3", 190, "Can you remind me to call the dentist tomorrow morning?"),
    ("en-gb", 175, "The train to London is running late because of a signal failure."),
    ("en-us", 155, "She opened the window to let some fresh air into the small kitchen."),
    ("en-gb+f2", 195, "Remember to save your work before you shut down the computer."),
    ("en-us+m3", 180, "The children played football in the park until the sun went down."),
    ("en-gb-x-rp", 150, "Our customer support team is available every day of the week."),
    ("en-us", 185, "He forgot his umbrella at the office and walked home in the rain."),
    ("en-gb", 165, "The museum offers free guided tours for students and teachers."),
]

# The long clip: turns separated by pauses of different lengths (seconds after each turn).
LONG_TURNS: list[tuple[str, int, str, float]] = [
    ("en-us", 170, "Good morning everyone and welcome to the weekly planning call.", 1.2),
    ("en-gb", 160, "First we will review the open issues from last week.", 1.5),
    ("en-us+f3", 180, "The new release is almost ready and the tests are passing.", 1.0),
    ("en-gb-x-rp", 165, "We still need to update the documentation for the install steps.", 1.8),
    ("en-us+m3", 175, "Does anyone have questions before we move on to the next topic?", 1.2),
    ("en-us", 160, "Thank you all for joining and have a great rest of the day.", 1.0),
]


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def synthesize(voice: str, wpm: int, text: str, tmp: Path) -> np.ndarray:
    """espeak-ng -> sox (16 kHz mono Int16, high-quality resampling) -> trimmed samples."""
    raw = tmp / "raw.wav"
    run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text])
    return converted_speech(raw, tmp)


def converted_speech(raw: Path, tmp: Path) -> np.ndarray:
    """A synthesizer's WAV through sox (16 kHz mono Int16, high-quality resampling), trimmed to its speech.

    -D: no dither, so the same synthesizer output always gives the same samples.
    """
    out = tmp / "out.wav"
    run(["sox", "-D", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", "-e", "signed-integer", str(out), "rate", "-v"])
    with wave.open(str(out)) as w:
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    start, end = speech_bounds(samples)
    return samples[start:end]


def speech_bounds(samples: np.ndarray, threshold: float = 300.0) -> tuple[int, int]:
    """First and last 10 ms window whose RMS exceeds ``threshold`` (synthesizers pad with silence)."""
    win = RATE // 100
    n = samples.size // win
    rms = np.sqrt((samples[: n * win].astype(np.float64).reshape(n, win) ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > threshold)
    if not loud.size:
        raise RuntimeError("the synthesizer produced silence")
    return int(loud[0] * win), int((loud[-1] + 1) * win)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * RATE)), dtype="<i2")


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.astype("<i2").tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install espeak-ng sox)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
    manifest: dict = {"generator": "scripts/make_test_audio.py", "espeak_ng": version, "sample_rate": RATE, "clips": [], "long": None}
    pad = silence(PAD_SECONDS)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for i, (voice, wpm, text) in enumerate(SENTENCES, 1):
            speech = synthesize(voice, wpm, text, tmp)
            name = f"s{i:02d}.wav"
            write_wav(out / name, np.concatenate((pad, speech, pad)))
            manifest["clips"].append(
                {
                    "file": name,
                    "text": text,
                    "voice": voice,
                    "wpm": wpm,
                    "speech_start": PAD_SECONDS,
                    "speech_end": round(PAD_SECONDS + speech.size / RATE, 3),
                }
            )
            print(f"{name} {voice:11s} {wpm} wpm {speech.size / RATE:4.1f}s  {text}")

        parts, turns, t = [silence(0.5)], [], 0.5
        for voice, wpm, text, gap in LONG_TURNS:
            speech = synthesize(voice, wpm, text, tmp)
            turns.append({"text": text, "voice": voice, "wpm": wpm, "speech_start": round(t, 3), "speech_end": round(t + speech.size / RATE, 3)})
            parts += [speech, silence(gap)]
            t += speech.size / RATE + gap
        long = np.concatenate(parts)
        # A faint noise floor (about -66 dBFS) so the pauses are not digital silence, as from a mic.
        noise = np.random.default_rng(3).normal(0.0, 16.0, long.size)
        long = np.clip(long.astype(np.float64) + noise, -32768, 32767).astype("<i2")
        write_wav(out / "long.wav", long)
        manifest["long"] = {"file": "long.wav", "turns": turns, "duration": round(long.size / RATE, 3)}
        print(f"long.wav {len(turns)} turns {long.size / RATE:.1f}s")

    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.glob("*.wav"))
    print(f"wrote {out} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
