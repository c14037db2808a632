"""The loaded Whisper model and one decode of a turn's audio, shared by every stream (thread-safe).

Decodes run in the engine's worker pool. A turn is encoded in a window of its own length plus
padding (see the package docstring); :func:`looping` spots Whisper's repetition loops so a decode
can be retried in the native 30 s window and a repeated tail trimmed.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from relay.engines.base import Word

RATE = 16000  # Whisper hears 16 kHz mono float32
MIN_WINDOW_FRAMES = 800  # 8 s: shortest encoder window (100 mel frames per second)
PAD_FRAMES = 300  # 3 s of padding after the audio in the encoder window
MAX_FRAMES = 3000
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
PUNCTUATION = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS


@dataclass(slots=True)
class Decoded:
    text: str = ""
    words: list[Word] = field(default_factory=list)
    confidence: float = 0.0
    seconds: float = 0.0  # audio decoded


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / max(1, len(zlib.compress(data)))


def _norm_words(text: str) -> list[str]:
    return [w for w in (w.strip(PUNCTUATION).lower() for w in text.split()) if w]


def repeated_tail(words: list[str], shortest: int = 3) -> int:
    """Length of a block of words the text ends with twice in a row (Whisper's repetition loop)."""
    for size in range(len(words) // 2, shortest - 1, -1):
        if words[-size:] == words[-2 * size : -size]:
            return size
    return 0


def looping(text: str) -> bool:
    return compression_ratio(text) > 2.4 or repeated_tail(_norm_words(text)) > 0


class WhisperModelRunner:
    """The loaded model plus the decode routine; shared by every stream, thread-safe."""

    def __init__(self, path: Path, *, compute_type: str, cpu_threads: int, workers: int, beam_size: int, language: str = "en") -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self.model = WhisperModel(
            str(path), device="cpu", compute_type=compute_type, cpu_threads=cpu_threads, num_workers=workers, local_files_only=True
        )
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe", language=language)
        self.suppress = list(get_suppressed_tokens(self.tokenizer, [-1]))
        self.beam_size = beam_size
        self.timings: dict[bool, list[float]] = {True: [], False: []}  # final? -> decode seconds (bench)
        self.n_mels = self.model.feature_extractor.mel_filters.shape[0]

    def decode(self, audio: np.ndarray, final: bool, hotwords: str | None) -> Decoded:
        started = time.perf_counter()
        try:
            return self._decode(audio, final, hotwords)
        finally:
            times = self.timings[final]
            times.append(time.perf_counter() - started)
            if len(times) > 10000:
                del times[:5000]

    def _decode(self, audio: np.ndarray, final: bool, hotwords: str | None) -> Decoded:
        from faster_whisper.transcribe import merge_punctuations

        seconds = audio.size / RATE
        features = self.model.feature_extractor(audio)
        n = features.shape[-1]
        frames = min(MAX_FRAMES, max(MIN_WINDOW_FRAMES, -(-(n + PAD_FRAMES) // 100) * 100))
        tokens, result, encoded = self._generate(features, frames, final, hotwords, seconds)
        text = self.tokenizer.decode(tokens).strip()
        if looping(text) and frames < MAX_FRAMES:
            # A repetition loop: decode once more in Whisper's native 30 s window.
            frames = MAX_FRAMES
            tokens, result, encoded = self._generate(features, frames, final, hotwords, seconds)
            text = self.tokenizer.decode(tokens).strip()
        tokens, text = self._trim_repeats(tokens, text)
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if result.scores else -10.0
        if not tokens or (result.no_speech_prob > 0.6 and avg_logprob < -1.0):
            return Decoded(seconds=seconds)
        confidence = float(np.exp(min(0.0, avg_logprob)))
        if not final:
            return Decoded(text, [Word(w, confidence) for w in text.split()], confidence, seconds)
        alignment = self.model.find_alignment(self.tokenizer, [tokens], encoded, min(n, frames))[0]
        merge_punctuations(alignment, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
        words = [
            Word(w["word"].strip(), float(w["probability"]), float(w["start"]), float(w["end"]))
            for w in alignment
            if w["word"].strip()
        ]
        return Decoded(text, words, confidence, seconds)

    def _trim_repeats(self, tokens: list[int], text: str) -> tuple[list[int], str]:
        """Drop a repeated tail ("a b c. a b c") down to its first occurrence."""
        words = _norm_words(text)
        while (size := repeated_tail(words)) > 0:
            words = words[:-size]
            for k in range(len(tokens) - 1, 0, -1):
                if _norm_words(self.tokenizer.decode(tokens[:k])) == words:
                    tokens = tokens[:k]
                    break
            else:
                break
            text = self.tokenizer.decode(tokens).strip()
        return tokens, text

    def _generate(self, features: np.ndarray, frames: int, final: bool, hotwords: str | None, seconds: float):
        window = np.zeros((self.n_mels, frames), dtype=np.float32)
        n = min(features.shape[-1], frames)
        window[:, :n] = features[:, :n]
        encoded = self.model.encode(window)
        prompt = self.model.get_prompt(self.tokenizer, [], without_timestamps=True, hotwords=hotwords)
        max_length = min(self.model.max_length, len(prompt) + int(10 * seconds) + 10)
        result = self.model.model.generate(
            encoded,
            [prompt],
            beam_size=self.beam_size if final else 1,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self.suppress,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < self.tokenizer.eot]
        return tokens, result, encoded

