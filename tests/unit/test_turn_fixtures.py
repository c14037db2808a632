"""The committed turn-taking speech set (tests/fixtures/speech/turns) says what its manifest says:
the benchmark's latencies and early-close counts are measured from these times, so a clip whose
speech or pauses are not where the manifest puts them would skew every figure."""
from __future__ import annotations

import wave

import numpy as np
import pytest

from tests.support.speech import SPEECH, pcm, turns_manifest

RATE = 16000


def rms(samples: np.ndarray, start: float, end: float) -> float:
    part = samples[int(start * RATE) : int(end * RATE)].astype(np.float64)
    return float(np.sqrt((part**2).mean()))


def all_turns() -> list[tuple[str, dict]]:
    m = turns_manifest()
    return [(c["file"], c) for c in m["clips"]] + [(conv["file"], t) for conv in m["conversations"] for t in conv["turns"]]


@pytest.mark.parametrize("name,turn", all_turns(), ids=lambda v: v if isinstance(v, str) else "")
def test_speech_and_pauses_are_where_the_manifest_says(name, turn):
    samples = np.frombuffer(pcm("turns/" + name), dtype="<i2")
    for seg in turn["segments"]:
        assert rms(samples, seg["start"], seg["start"] + 0.05) > 200 or rms(samples, seg["start"], seg["start"] + 0.15) > 300, seg
        assert rms(samples, seg["end"] - 0.15, seg["end"]) > 100, seg
    for pause in turn["pauses"]:
        assert pause["end"] - pause["start"] == pytest.approx(pause["ms"] / 1000, abs=0.002)
        assert rms(samples, pause["start"] + 0.01, pause["end"] - 0.01) < 30, pause  # the noise floor only
    assert turn["speech_start"] == turn["segments"][0]["start"] and turn["speech_end"] == turn["segments"][-1]["end"]
    assert turn["text"] == " ".join(seg["text"] for seg in turn["segments"])
    assert rms(samples, turn["speech_start"] - 0.2, turn["speech_start"] - 0.01) < 30  # quiet right before speech


def test_wavs_are_16k_mono_int16_of_the_stated_length_and_small():
    m = turns_manifest()
    files = [c["file"] for c in m["clips"]] + [c["file"] for c in m["conversations"]]
    durations = {c["file"]: c["duration"] for c in m["clips"] + m["conversations"]}
    for name in files:
        with wave.open(str(SPEECH / "turns" / name)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), name
            assert w.getnframes() / RATE == pytest.approx(durations[name], abs=0.001), name
    on_disk = sorted(p.name for p in (SPEECH / "turns").glob("*.wav"))
    assert on_disk == sorted(files)  # nothing unlisted, nothing missing
    assert sum((SPEECH / "turns" / n).stat().st_size for n in files) < 4_500_000


def test_every_kind_and_a_held_out_split_by_voice():
    m = turns_manifest()
    kinds = {c["kind"] for c in m["clips"]} | {c["kind"] for c in m["conversations"]}
    assert kinds == {"pause", "pause_whole", "short", "conversation"}
    held = set(m["held_out_voices"])
    for c in m["clips"]:
        assert c["split"] == ("held_out" if c["voice"] in held else "tune"), c["file"]
        assert c["synthesizer"].split()[0] in {"flite", "festival", "espeak-ng"}, c["file"]
    for conv in m["conversations"]:
        voices = {t["voice"] for t in conv["turns"]}
        assert conv["split"] == ("held_out" if voices & held else "tune"), conv["file"]
        ends = [t["speech_end"] for t in conv["turns"]]
        starts = [t["speech_start"] for t in conv["turns"]]
        assert all(s - e >= 0.9 for e, s in zip(ends, starts[1:])), conv["file"]  # turn boundaries are real pauses
    splits = [c["split"] for c in m["clips"]]
    assert splits.count("held_out") >= 8 and splits.count("tune") >= 8
    assert all(c["pauses"] for c in m["clips"] if c["kind"] in ("pause", "pause_whole"))
    # pause_whole pairs with pause clip by clip: the same voice, text and pause, spoken as one utterance
    # (where each pause lies is checked for every clip above)
    pairs = zip([c for c in m["clips"] if c["kind"] == "pause"], [c for c in m["clips"] if c["kind"] == "pause_whole"], strict=True)
    for split_clip, whole in pairs:
        assert (whole["voice"], whole["text"], whole["split"]) == (split_clip["voice"], split_clip["text"], split_clip["split"])
        assert [p["ms"] for p in whole["pauses"]] == [p["ms"] for p in split_clip["pauses"]]
    assert {c["text"] for c in m["clips"] if c["kind"] == "short"} >= {"Hello world.", "Yes.", "Okay, thanks.", "No."}
    makers = {c["synthesizer"].split()[0] for c in m["clips"] if c["kind"] == "short"}
    assert makers == {"flite", "festival", "espeak-ng"}  # short turns in the project's own voice too


@pytest.mark.slow
def test_the_script_makes_the_committed_set_again_byte_for_byte(tmp_path):
    """The set is reproducible: flite, festival and sox (no dither) give the same samples."""
    import subprocess
    import sys

    from tests.support.live import ROOT

    subprocess.run([sys.executable, "scripts/make_turn_audio.py", "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    committed = SPEECH / "turns"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in committed.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
