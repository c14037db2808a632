#!/usr/bin/env python3
"""Make the turn-taking speech set under tests/fixtures/speech/turns/ with flite, festival and sox.

The espeak-ng set (scripts/make_test_audio.py) is one synthesizer and whole sentences. This set is
made with other synthesizers (Debian's ``flite``: voices kal16, slt, rms, awb; ``festival`` with
festvox-kallpc16k) and holds what end-of-turn detection is judged on:

* ``pause``: one sentence with a silent pause inside it ("I went to the store [700 ms] and bought
  some milk"); a turn closed in that pause is a turn closed too early;
* ``short``: one- and two-word turns ("Hello world.", "Yes.", "Okay, thanks."), to be streamed at
  the very start of a stream and after a long silence (a lost first word shows there); four of
  them are spoken by espeak-ng too, the project's other synthesizer;
* ``pause_whole``: the same sentences, voices and pauses as ``pause``, each spoken as one
  utterance with a phrase break (a comma) where the pause goes, that break's silence then
  stretched to the pause. ``pause`` speaks each half on its own, so its first half ends with a
  finished sentence's falling pitch; here it ends as a clause does inside a sentence, which is
  how a person who stops mid-sentence usually sounds. The two kinds are paired clip by clip;
* ``conversation``: several turns with known boundaries and ends of speech, two speakers, one turn
  with a pause inside it, as one WAV to stream as is.

Every clip is 16 kHz mono Int16 over a faint noise floor (about -66 dBFS, seeded, as from a
microphone, so pauses are not digital silence). ``manifest.json`` holds each clip's text, where
its speech starts and ends, where the pauses inside it are, the synthesizer and voice, and its
split: ``tune`` clips may be used while tuning an engine, ``held_out`` clips (other voices, other
texts) only to measure it. The WAVs are committed: tests and benchmarks never run the
synthesizers, whose output can change between versions. Re-run only to change the set:

    .venv/bin/python scripts/make_turn_audio.py        # rewrite tests/fixtures/speech/turns/
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
# scripts/ is on sys.path when this runs as a script: one conversion, trim and WAV writer for both sets
from make_test_audio import RATE, converted_speech, run, silence, write_wav

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "speech" / "turns"
PAD_SECONDS = 0.25  # room noise kept around each clip; streams add their own silence
NOISE_RMS = 16.0  # about -66 dBFS
HELD_OUT_VOICES = {"rms", "awb", "festival"}  # flite rms/awb and festival: never used to tune
ESPEAK_WPM = 160

# Texts avoid digits, numbers spoken as words (Whisper writes numerals) and compounds with two
# spellings, so each reference has one spelling. A "|" marks a pause: (text, pause ms, text...).
PAUSES: list[tuple[str, tuple]] = [
    ("kal16", ("I went to the store", 700, "and bought some milk.")),
    ("slt", ("Could you send me", 600, "the report from yesterday?")),
    ("kal16", ("The meeting is on Tuesday and", 800, "we will meet at the office.")),
    ("slt", ("Well, I think", 600, "we should leave now.")),
    ("kal16", ("If it rains tomorrow", 900, "we will stay at home.")),
    ("slt", ("Let me check my calendar", 1000, "and get back to you.")),
    ("rms", ("Please put the boxes", 700, "next to the front door.")),
    ("awb", ("She said that", 700, "the package arrived this morning.")),
    ("festival", ("We need to buy eggs, bread", 900, "and a bag of apples.")),
    ("rms", ("The doctor can see you", 800, "on Friday afternoon.")),
]

SHORT: list[tuple[str, str]] = [
    ("slt", "Hello world."),
    ("kal16", "Yes."),
    ("slt", "Okay, thanks."),
    ("kal16", "No."),
    ("festival", "Hello world."),
    ("rms", "Yes."),
    ("awb", "Okay, thanks."),
    ("festival", "No."),
    ("rms", "Thank you."),
    ("awb", "Good morning."),
    # espeak-ng, as the project's own set: the voice whose "Hello world." lost its first word (issue #16)
    ("espeak-en-us", "Hello world."),
    ("espeak-en-gb", "Yes."),
    ("espeak-en-us+f3", "Okay, thanks."),
    ("espeak-en-gb-x-rp", "No."),
]

# (voice, (text[, pause ms, text...]), silence after the turn in seconds)
CONVERSATIONS: list[tuple[str, list[tuple[str, tuple, float]]]] = [
    (
        "conv_a",
        [
            ("slt", ("Hi, thanks for calling. How can I help you?",), 1.0),
            ("kal16", ("Hello.",), 1.2),
            ("kal16", ("I would like to change my delivery address.",), 1.0),
            ("slt", ("Sure. What is the new address?",), 1.5),
            ("kal16", ("It is on Park Road", 600, "near the train station."), 1.2),
            ("slt", ("Okay, thanks.",), 1.0),
        ],
    ),
    (
        "conv_b",
        [
            ("awb", ("Good morning.",), 1.2),
            ("festival", ("Good morning. Is the library open on Saturday?",), 1.0),
            ("awb", ("Yes, it opens in the morning", 700, "and closes in the evening."), 1.2),
            ("festival", ("Can I borrow books without a card?",), 1.5),
            ("awb", ("No.",), 1.2),
            ("rms", ("You can make a card at the front desk.",), 1.0),
        ],
    ),
]


def versions() -> dict[str, str]:
    flite = subprocess.run(["flite", "--version"], capture_output=True, text=True).stdout.split("version:")[-1].strip()
    festival = subprocess.run(["festival", "--version"], capture_output=True, text=True).stdout.strip()
    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
    sox = subprocess.run(["sox", "--version"], capture_output=True, text=True).stdout.strip()
    return {"flite": flite, "festival": festival, "espeak_ng": espeak, "sox": sox}


def synthesizer(voice: str) -> str:
    if voice.startswith("espeak-"):
        return f"espeak-ng -v {voice.removeprefix('espeak-')} -s {ESPEAK_WPM}"
    return "festival kal_diphone (festvox-kallpc16k)" if voice == "festival" else f"flite -voice {voice}"


def synthesize(voice: str, text: str, tmp: Path) -> np.ndarray:
    """flite or festival -> sox (16 kHz mono Int16, high-quality resampling, no dither) -> trimmed."""
    raw = tmp / "raw.wav"
    if voice.startswith("espeak-"):
        run(["espeak-ng", "-v", voice.removeprefix("espeak-"), "-s", str(ESPEAK_WPM), "-w", str(raw), text])
    elif voice == "festival":
        (tmp / "text.txt").write_text(text + "\n")
        run(["text2wave", "-eval", "(voice_kal_diphone)", str(tmp / "text.txt"), "-o", str(raw)])
    else:
        run(["flite", "-voice", voice, "-t", text, "-o", str(raw)])
    return converted_speech(raw, tmp)


def with_noise(samples: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, NOISE_RMS, samples.size)
    return np.clip(samples.astype(np.float64) + noise, -32768, 32767).astype("<i2")


def utterance(voice: str, parts: tuple, t0: float, tmp: Path) -> tuple[list[np.ndarray], dict]:
    """One turn: its text pieces spoken separately, joined by the given pauses, starting at ``t0``."""
    pieces, segments, pauses, t = [], [], [], t0
    for i, part in enumerate(parts):
        if i % 2:  # a pause, in ms
            pieces.append(silence(part / 1000))
            pauses.append({"start": round(t, 3), "end": round(t + part / 1000, 3), "ms": part, "after": parts[i - 1]})
            t += part / 1000
            continue
        speech = synthesize(voice, part, tmp)
        pieces.append(speech)
        segments.append({"text": part, "start": round(t, 3), "end": round(t + speech.size / RATE, 3)})
        t += speech.size / RATE
    text = " ".join(p for i, p in enumerate(parts) if not i % 2)
    turn = {
        "text": text,
        "voice": voice,
        "synthesizer": synthesizer(voice),
        "speech_start": segments[0]["start"],
        "speech_end": segments[-1]["end"],
        "pauses": pauses,
        "segments": segments,
    }
    return pieces, turn


def phrase_break(samples: np.ndarray, near: int, threshold: float = 300.0) -> tuple[int, int]:
    """The quiet stretch (10 ms windows under ``threshold`` RMS, 50 ms or more) that starts nearest
    sample ``near``, within 300 ms of it: where the synthesizer paused for the comma."""
    win = RATE // 100
    n = samples.size // win
    rms = np.sqrt((samples[: n * win].astype(np.float64).reshape(n, win) ** 2).mean(axis=1))
    runs, start = [], None
    for i, quiet in enumerate(np.append(rms <= threshold, False)):
        if quiet and start is None:
            start = i
        elif not quiet and start is not None:
            if i - start >= 5:
                runs.append((start * win, i * win))
            start = None
    if not runs:
        raise RuntimeError("no phrase break in the synthesized sentence")
    best = min(runs, key=lambda r: abs(r[0] - near))
    if abs(best[0] - near) > 0.3 * RATE:
        raise RuntimeError(f"no phrase break within 300 ms of {near / RATE:.2f} s (nearest at {best[0] / RATE:.2f} s)")
    return best


def spoken_whole(voice: str, parts: tuple, t0: float, tmp: Path) -> tuple[list[np.ndarray], dict]:
    """A sentence with one pause inside, spoken as one utterance (``pause_whole``, above).

    The text goes to the synthesizer whole, with a comma at the pause; the first half is also
    spoken alone (with its comma) to find how long it lasts, and the quiet stretch the
    synthesizer left nearest that point becomes the pause.
    """
    first, ms, second = parts
    head = first if first.endswith(",") else first + ","
    whole = synthesize(voice, f"{head} {second}", tmp)
    start, end = phrase_break(whole, synthesize(voice, head, tmp).size)
    pause_s = ms / 1000
    t_break = t0 + start / RATE
    segments = [
        {"text": first, "start": round(t0, 3), "end": round(t_break, 3)},
        {"text": second, "start": round(t_break + pause_s, 3), "end": round(t_break + pause_s + (whole.size - end) / RATE, 3)},
    ]
    turn = {
        "text": f"{first} {second}",
        "voice": voice,
        "synthesizer": synthesizer(voice),
        "speech_start": segments[0]["start"],
        "speech_end": segments[-1]["end"],
        "pauses": [{"start": round(t_break, 3), "end": round(t_break + pause_s, 3), "ms": ms, "after": first}],
        "segments": segments,
    }
    return [whole[:start], silence(pause_s), whole[end:]], turn


def split(voices: list[str]) -> str:
    return "held_out" if set(voices) & HELD_OUT_VOICES else "tune"


def write_clip(out: Path, manifest: dict, name: str, kind: str, pieces: list[np.ndarray], turn: dict, seed: int) -> None:
    """One clip: the turn's pieces between room noise pads, written and listed in the manifest."""
    samples = with_noise(np.concatenate([silence(PAD_SECONDS), *pieces, silence(PAD_SECONDS)]), seed)
    write_wav(out / name, samples)
    voice = turn["voice"]
    manifest["clips"].append({"file": name, "kind": kind, "split": split([voice]), **turn, "duration": round(samples.size / RATE, 3)})
    print(f"{name:24s} {samples.size / RATE:4.1f}s  {turn['text']}" + (" (spoken whole)" if kind == "pause_whole" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for tool in ("flite", "text2wave", "espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install flite festival festvox-kallpc16k espeak-ng sox)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "generator": "scripts/make_turn_audio.py",
        "tools": versions(),
        "sample_rate": RATE,
        "noise_rms": NOISE_RMS,
        "held_out_voices": sorted(HELD_OUT_VOICES),
        "clips": [],
        "conversations": [],
    }
    seed = 100
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for kind, items in (("pause", PAUSES), ("short", [(v, (t,)) for v, t in SHORT])):
            for i, (voice, parts) in enumerate(items, 1):
                seed += 1
                write_clip(out, manifest, f"{kind}{i:02d}_{voice}.wav", kind, *utterance(voice, parts, PAD_SECONDS, tmp), seed)
        for name, turns in CONVERSATIONS:
            pieces, refs, t = [silence(0.4)], [], 0.4
            for voice, parts, after in turns:
                speech, turn = utterance(voice, parts, t, tmp)
                pieces += speech + [silence(after)]
                refs.append(turn)
                t = turn["speech_end"] + after
            seed += 1
            samples = with_noise(np.concatenate(pieces), seed)
            write_wav(out / f"{name}.wav", samples)
            manifest["conversations"].append(
                {"file": f"{name}.wav", "kind": "conversation", "split": split([r["voice"] for r in refs]), "turns": refs, "duration": round(samples.size / RATE, 3)}
            )
            print(f"{name}.wav {len(refs)} turns {samples.size / RATE:.1f}s")
        # Made after the others, so their noise seeds (and files) stay as they were.
        for i, (voice, parts) in enumerate(PAUSES, 1):
            seed += 1
            write_clip(out, manifest, f"whole{i:02d}_{voice}.wav", "pause_whole", *spoken_whole(voice, parts, PAD_SECONDS, tmp), seed)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.glob("*.wav"))
    print(f"wrote {out} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
