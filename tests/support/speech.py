"""The committed speech sets and helpers to run a real engine over them through the engine interface.

* tests/fixtures/speech: espeak-ng sentences and a long clip (scripts/make_test_audio.py);
* tests/fixtures/speech/turns: flite and festival speech for turn taking, sentences with pauses
  inside, one- and two-word turns, conversations, with a held-out split
  (scripts/make_turn_audio.py; :func:`turns_manifest`)."""
from __future__ import annotations

import asyncio
import json
import wave
from functools import cache
from pathlib import Path
from typing import Any

import jiwer

from relay.engines.base import EngineStream, TurnEvent

SPEECH = Path(__file__).resolve().parents[1] / "fixtures" / "speech"

_NORMALIZE = jiwer.Compose(
    # "OK" and "okay" are one word said one way; the references spell it "okay".
    [jiwer.ToLowerCase(), jiwer.SubstituteWords({"ok": "okay"}), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip(), jiwer.ReduceToListOfListOfWords()]
)


@cache
def manifest() -> dict:
    return json.loads((SPEECH / "manifest.json").read_text())


@cache
def turns_manifest() -> dict:
    """The flite/festival turn-taking set: ``clips`` (kind ``pause`` or ``short``) and
    ``conversations``, each with ``split`` ``tune`` or ``held_out``; files are under ``turns/``."""
    return json.loads((SPEECH / "turns" / "manifest.json").read_text())


def pcm(name: str) -> bytes:
    """16 kHz mono Int16 samples of a committed clip (``turns/...`` for the turn-taking set)."""
    with wave.open(str(SPEECH / name)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return w.readframes(w.getnframes())


def silence(seconds: float, rate: int = 16000) -> bytes:
    return bytes(2 * int(seconds * rate))


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate after lower-casing and removing punctuation."""
    return jiwer.wer(references, hypotheses, reference_transform=_NORMALIZE, hypothesis_transform=_NORMALIZE)


def finals(events: list) -> list[TurnEvent]:
    return [e for e in events if isinstance(e, TurnEvent) and e.event == "EndOfTurn"]


def finals_per_loop(events: list, loop: bytes, loops: int) -> list[list[str]]:
    """The EndOfTurn transcripts of a stream of ``loop`` repeated ``loops`` times, by the loop
    their audio window starts in."""
    loop_s = len(loop) / 2 / 16000
    per_loop: list[list[str]] = [[] for _ in range(loops)]
    for end in finals(events):
        per_loop[min(loops - 1, int(end.audio_window_start // loop_s))].append(end.transcript)
    return per_loop


async def run_stream(stream: EngineStream, audio: bytes, *, chunk: int = 2560, between: Any = None) -> list:
    """Start ``stream``, feed ``audio`` in 80 ms frames, finish, collect. ``between(stream)`` is
    awaited after each frame: by default nothing (as fast as it takes them); ``settle`` for a
    talker who waits for each frame to be processed, a sleep for a paced one."""
    warnings = await stream.start()
    events: list = list(warnings)

    async def collect() -> None:
        async for item in stream.events():
            events.append(item)

    pump = asyncio.get_running_loop().create_task(collect())
    for i in range(0, len(audio), chunk):
        stream.feed(audio[i : i + chunk])
        await (asyncio.sleep(0) if between is None else between(stream))
    await stream.finish()
    await pump
    return events


async def settle(stream: EngineStream, timeout: float = 30.0) -> None:
    """Wait until the stream has processed everything fed so far (polls a condition, no fixed sleep)."""
    async with asyncio.timeout(timeout):
        while stream.backlog_seconds > 0:
            await asyncio.sleep(0.005)


def check_turn_grammar(events: list) -> None:
    """Flux's turn state machine: StartOfTurn, Updates, EagerEndOfTurn/TurnResumed pairs, EndOfTurn."""
    turns: dict[int, list[TurnEvent]] = {}
    order: list[int] = []
    for e in events:
        if isinstance(e, TurnEvent):
            if e.turn not in turns:
                order.append(e.turn)
            turns.setdefault(e.turn, []).append(e)
    assert order == sorted(order), "turns interleave"
    for turn, evs in turns.items():
        names = [e.event for e in evs]
        assert names[0] == "StartOfTurn" and names[-1] == "EndOfTurn" and names.count("EndOfTurn") == 1, (turn, names)
        eager = None
        for e in evs[1:-1]:
            assert e.event in {"Update", "EagerEndOfTurn", "TurnResumed"}, (turn, names)
            if e.event == "EagerEndOfTurn":
                assert eager is None, names
                eager = e
            elif e.event == "TurnResumed":
                assert eager is not None, names
                eager = None
            else:
                assert eager is None, f"Update after EagerEndOfTurn: {names}"
        if eager is not None:
            assert evs[-1].transcript == eager.transcript


def synthesize(voice: str, text: str, directory: Path, *, wpm: int = 160) -> bytes:
    """Speak ``text`` with espeak-ng now (for languages the committed set lacks): 16 kHz mono Int16.

    Same tools and sox settings as scripts/make_test_audio.py; skips the test without them.
    """
    import shutil
    import subprocess

    import pytest

    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install espeak-ng sox)")
    raw, out = directory / f"{voice}-raw.wav", directory / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(
        ["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", str(out), "rate", "-v"],
        check=True,
        capture_output=True,
    )
    with wave.open(str(out)) as w:
        return w.readframes(w.getnframes())
