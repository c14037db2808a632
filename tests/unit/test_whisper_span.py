"""The span a whisper decode gets is anchored to the speech, including at the start of a stream.

A stream whose first words come less than the lead (ANCHOR_LEAD_S) after it began gets the rest
of the lead as digital silence, so the decoder sees the same samples however long the client
waited before speaking (issue #16: the demo page started its capture a few ms apart from run to
run, and Whisper base heard the same sentence three ways). No model: the decoder records what it
is given.
"""
from __future__ import annotations

import numpy as np

from relay.engines.base import Word
from relay.engines.offline.whisper.runner import RATE, Decoded
from relay.engines.offline.whisper.stream import ANCHOR_LEAD_S, ANCHOR_TAIL_S, LANGUAGE_LOCK_S, LOUD_SAMPLES, decode_span, speech_span

LEAD = int(ANCHOR_LEAD_S * RATE)


def speech(seconds: float = 0.6) -> np.ndarray:
    """A 220 Hz tone at -12 dBFS: loud from its first sample."""
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.25 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def recorded(pcm: np.ndarray, final: bool = True, language: tuple = (), detect: bool = False) -> tuple[np.ndarray, Decoded, list]:
    """decode_span over ``pcm`` (a whole first turn, no context); what the decoder was given, its
    result, and what detection was given."""
    given, detected = [], []

    def decode(piece, final, hotwords, *language):
        given.append(piece.copy())
        # One word at the piece's 0.4 s: where the speech starts when the lead is whole.
        return Decoded("Hi.", [Word("Hi.", 0.9, ANCHOR_LEAD_S, ANCHOR_LEAD_S + 0.3)], 0.9, piece.size / RATE, language[0] if language else None,
                       1.0 if final else None)

    def detector(piece):
        detected.append(piece.copy())
        return "de"

    decoded = decode_span(decode, pcm, 0, 0, final, None, *language, **({"detect": detector} if detect else {}))
    return given[0], decoded, detected


def test_a_first_turn_is_decoded_the_same_however_soon_the_stream_spoke():
    words = speech()
    pieces, starts = [], []
    # (From 10 ms on: the loud 10 ms that finds the onset looks ahead from each sample.)
    for before in (160, 800, 3000, LEAD - 1, LEAD, LEAD + 4321):
        pcm = np.concatenate((np.zeros(before, dtype=np.float32), words, np.zeros(RATE // 2, dtype=np.float32)))
        span = speech_span(pcm, final=True)
        assert before - LOUD_SAMPLES < span.onset <= before
        assert span.start == span.onset - LEAD  # negative while the stream is younger than the lead
        piece, decoded, _ = recorded(pcm)
        pieces.append(piece)
        starts.append((span.onset, decoded.words[0].start))
    assert pieces[0].size >= LEAD + words.size + int(ANCHOR_TAIL_S * RATE)  # the whole lead, the speech, the tail
    assert all(np.array_equal(p, pieces[0]) for p in pieces)
    # Word times still count from the turn's first sample, where the stream began.
    assert all(abs(start - onset / RATE) < 1e-6 for onset, start in starts), starts


def test_the_language_is_detected_on_the_speech_not_on_the_silence_before_it():
    words = speech(3.5)
    seen = []
    for before in (160, 800, 4800, LEAD + 800):
        pcm = np.concatenate((np.zeros(before, dtype=np.float32), words, np.zeros(RATE // 2, dtype=np.float32)))
        _, decoded, detected = recorded(pcm, final=False, language=(None,), detect=True)
        assert decoded.settled and decoded.language == "de"
        seen.append(detected[0])
    assert all(d.size == LANGUAGE_LOCK_S * RATE for d in seen)
    assert all(np.array_equal(d, seen[0]) for d in seen)  # from the onset, whatever came before
    # Less than LANGUAGE_LOCK_S of speech: the decode guesses on its own, and nothing is settled.
    _, decoded, detected = recorded(np.concatenate((words[: 2 * RATE], np.zeros(RATE // 2, dtype=np.float32))), final=False, language=(None,),
                                     detect=True)
    assert not detected and not decoded.settled
