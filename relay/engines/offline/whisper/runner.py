"""The loaded Whisper model and one decode of a turn's audio, shared by every stream (thread-safe).

Decodes run in the engine's worker pool. A turn is encoded in a window of its own length plus
padding (see the package docstring); :func:`looping` spots Whisper's repetition loops so a decode
can be retried in the native 30 s window and a repeated tail trimmed.

Language: a decode is in a given language (English for ``flux-general-en``, with exactly the
prompt it always had) or, given ``language=None``, in the language Whisper detects from the very
encoder output the decode uses, so detection adds one decoder step (~16 ms), not an encode.

Spare cores: a final that finds every other decode worker idle (``spare()``) is encoded on every
core by a second copy of the model (``wide_threads``; the engine's ``wide_encode``), and its
completion pass runs beside its word alignment. CTranslate2's thread count is fixed per model,
and its decoder steps are slower on two threads (a short turn's beam search: 131 -> 159 ms here)
while its encoder is faster (20 s window: 324 -> 203 ms; ``python -m bench.decode_cost --parts
threads``), so only the encode goes wide. The copy is kept only when it encodes bit for bit as the
one-thread model does (checked at load), so a final never depends on how busy the box was.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from relay.engines.base import Word

if TYPE_CHECKING:
    from faster_whisper.tokenizer import Tokenizer

RATE = 16000  # Whisper hears 16 kHz mono float32
MIN_WINDOW_FRAMES = 800  # 8 s: shortest encoder window (100 mel frames per second)
PAD_FRAMES = 300  # 3 s of padding after the audio in the encoder window
#: A final of less audio than SHORT_TURN_S is encoded in at least SHORT_WINDOW_FRAMES (20 s). In an
#: 8 s window Whisper base loses the first word of one- and two-word turns ("Hello world" came
#: out "The Low World", "Hello" "I love you"); offline faster-whisper's 30 s window does not.
#: Measured on 110 short turns (espeak-ng, flite, festival): 6 wrong at 8 s, 4 at 20 s (none a
#: lost word), 3 at 30 s, which costs 2.5 times the CPU of 20 s (docs/engines.md).
SHORT_TURN_S = 3.0
SHORT_WINDOW_FRAMES = 2000
#: Normalised log-mel of digital silence (log10 of the extractor's 1e-10 clip: (-10 + 4) / 4).
SILENCE_MEL = -1.5
MAX_FRAMES = 3000
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
PUNCTUATION = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS
#: Detection keeps the stream's last language (``prior``) unless another is this many times as
#: likely: a short turn ("Ja, danke.") is often misheard as Thai or Latin by Whisper base, while a
#: real switch of language wins by far more than that.
PRIOR_WEIGHT = 3.0
#: Tokens that end a sentence (the completion probability sums over them).
TERMINAL_TOKENS = frozenset({".", "?", "!", '."', '?"', '!"', "。", "？", "！"})
#: Words a finished English statement rarely ends with: conjunctions, articles, a few
#: prepositions, possessives, fillers. (Questions may end with a preposition: "?" and "!" skip
#: this list; other languages rely on the decoder's probability alone.)
UNFINISHED_WORDS = frozenset("and or but because if than the a an to of with my your our their um uh er erm".split())


@dataclass(slots=True)
class Decoded:
    text: str = ""
    words: list[Word] = field(default_factory=list)
    confidence: float = 0.0
    seconds: float = 0.0  # audio decoded
    language: str | None = None  # the language it was decoded in
    #: Finals only: how likely the text is a finished utterance, from 0 to 1 (see
    #: :meth:`WhisperModelRunner.completion`); None when not measured.
    complete: float | None = None
    #: Finals only (set by stream.decode_span): the sample of the turn's audio where its last loud
    #: 10 ms ends, and the mean square that counted as loud; None when the span was not found.
    speech_end: int | None = None
    loud: float | None = None
    #: flux-general-multi: the language was detected on LANGUAGE_LOCK_S of the turn's speech (set
    #: by stream.decode_span), so it is the turn's from now on.
    settled: bool = False


class Abandoned(Exception):
    """A decode stopped between two of its stages because its result was no longer wanted (the
    stream set the decode's ``abandoned`` event: the speech came back, or the turn ended)."""


def _go_on(abandoned: threading.Event | None) -> None:
    """Between two stages of a decode: stop here if its result is no longer wanted."""
    if abandoned is not None and abandoned.is_set():
        raise Abandoned


def window_frames(frames: int, final: bool, seconds: float) -> int:
    """The encoder window (mel frames) for ``frames`` of audio features: the audio plus padding, in
    whole seconds, at least 8 s (20 s for the final of a turn under SHORT_TURN_S), at most 30 s."""
    shortest = SHORT_WINDOW_FRAMES if final and seconds < SHORT_TURN_S else MIN_WINDOW_FRAMES
    return min(MAX_FRAMES, max(shortest, -(-(frames + PAD_FRAMES) // 100) * 100))


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

    def __init__(
        self,
        path: Path,
        *,
        compute_type: str,
        cpu_threads: int,
        workers: int,
        beam_size: int,
        language: str = "en",
        wide_threads: int = 0,
    ) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self.model = WhisperModel(
            str(path), device="cpu", compute_type=compute_type, cpu_threads=cpu_threads, num_workers=workers, local_files_only=True
        )
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe", language=language)
        self._tokenizers = {language: self.tokenizer}
        self.multilingual = bool(self.model.model.is_multilingual)
        vocab = self.model.hf_tokenizer
        #: Language codes this model can transcribe (Whisper base: 99; an ``.en`` model: English).
        self.languages = frozenset(
            [c for c in _LANGUAGE_CODES if vocab.token_to_id(f"<|{c}|>") is not None] if self.multilingual else ["en"]
        )
        self.suppress = list(get_suppressed_tokens(self.tokenizer, [-1]))
        self.beam_size = beam_size
        self.timings: dict[bool, list[float]] = {True: [], False: []}  # final? -> decode seconds (bench)
        self.abandoned: dict[bool, list[float]] = {True: [], False: []}  # final? -> seconds of abandoned decodes (bench)
        self.n_mels = self.model.feature_extractor.mel_filters.shape[0]
        # For completion(): the encoding of silence and the sentence-ending tokens, made once.
        self._silent_encoding = self.model.encode(np.full((self.n_mels, MIN_WINDOW_FRAMES), SILENCE_MEL, dtype=np.float32))
        self._terminals = [i for i in range(self.tokenizer.eot) if self.tokenizer.decode([i]).strip() in TERMINAL_TOKENS]
        #: Whether every other decode worker is idle; the engine sets it to its pool's ``alone``.
        self.spare: Callable[[], bool] = lambda: False
        #: The model again on ``wide_threads`` threads, for the encode of a final on a spare core
        #: (None: not asked for, or its encodings differ from the one-thread model's).
        self.wide = self._load_wide(path, compute_type, wide_threads) if wide_threads > cpu_threads else None
        self.wide_threads = wide_threads if self.wide is not None else 0
        self._wide_lock = threading.Lock()
        # Runs a final's completion pass beside its alignment, on the model's other replica.
        self._side = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="whisper-side") if workers > 1 else None
        self.wide_encodes = 0  # finals encoded wide (bench, tests)

    def _load_wide(self, path: Path, compute_type: str, threads: int) -> Any:
        """The model on ``threads`` threads, kept only if it encodes exactly as ``self.model`` does."""
        import ctranslate2

        wide = ctranslate2.models.Whisper(str(path), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1)
        window = np.random.default_rng(0).normal(SILENCE_MEL, 1.0, (1, self.n_mels, MIN_WINDOW_FRAMES)).astype(np.float32)
        narrow = np.asarray(self.model.encode(window[0]))
        if not np.array_equal(narrow, np.asarray(wide.encode(ctranslate2.StorageView.from_array(window)))):
            return None  # its sums come out otherwise: finals would depend on the load
        self._storage = ctranslate2.StorageView.from_array
        return wide

    def tokenizer_for(self, language: str) -> "Tokenizer":
        tokenizer = self._tokenizers.get(language)
        if tokenizer is None:
            from faster_whisper.tokenizer import Tokenizer

            tokenizer = Tokenizer(self.model.hf_tokenizer, self.multilingual, task="transcribe", language=language)
            self._tokenizers[language] = tokenizer  # a race only builds an equal one twice
        return tokenizer

    def decode(
        self,
        audio: np.ndarray,
        final: bool,
        hotwords: str | None,
        language: str | None = "en",
        *,
        candidates: frozenset[str] | None = None,
        prior: str | None = None,
        abandoned: threading.Event | None = None,
    ) -> Decoded:
        """Decode ``audio`` in ``language``, or (``None``) in the language detected on it.

        Detection picks among ``candidates`` (default: every language of the model) and falls
        back to ``prior`` (the stream's last language) unless another language clearly wins.

        ``abandoned``: once set, the decode raises :class:`Abandoned` at the next boundary
        between its stages (encode, search, alignment, completion) instead of running the rest.
        A stage already running is not interrupted, and a decode that is not abandoned runs
        exactly the same steps, so what a final says never depends on it.
        """
        started = time.perf_counter()
        times = self.timings[final]
        try:
            return self._decode(audio, final, hotwords, language, candidates, prior, abandoned)
        except Abandoned:
            times = self.abandoned[final]
            raise
        finally:
            times.append(time.perf_counter() - started)
            if len(times) > 10000:
                del times[:5000]

    def detect(self, encoded: object, candidates: frozenset[str] | None = None, prior: str | None = None) -> str:
        """The language of an encoder output: one decoder step over the language tokens."""
        allowed = self.languages if not candidates else candidates & self.languages or self.languages
        ranked = [(token[2:-2], p) for token, p in self.model.model.detect_language(encoded)[0] if token[2:-2] in allowed]
        if not ranked:
            return prior or "en"
        language, p = ranked[0]
        if prior is not None and prior != language and PRIOR_WEIGHT * dict(ranked).get(prior, 0.0) >= p:
            return prior
        return language

    def _decode(
        self, audio: np.ndarray, final: bool, hotwords: str | None, language: str | None, candidates: frozenset[str] | None, prior: str | None,
        abandoned: threading.Event | None = None,
    ) -> Decoded:
        from faster_whisper.transcribe import merge_punctuations

        _go_on(abandoned)
        seconds = audio.size / RATE
        features = self.model.feature_extractor(audio)
        n = features.shape[-1]
        frames = window_frames(n, final, seconds)
        wide = final and self.wide is not None and self.spare()
        tokens, result, encoded, language = self._generate(features, frames, final, hotwords, seconds, language, candidates, prior, wide,
                                                           abandoned)
        tokenizer = self.tokenizer_for(language)
        text = tokenizer.decode(tokens).strip()
        if looping(text) and frames < MAX_FRAMES:
            # A repetition loop: decode once more in Whisper's native 30 s window.
            _go_on(abandoned)
            frames = MAX_FRAMES
            tokens, result, encoded, language = self._generate(features, frames, final, hotwords, seconds, language, None, None, wide,
                                                               abandoned)
            text = tokenizer.decode(tokens).strip()
        tokens, text = self._trim_repeats(tokenizer, tokens, text)
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if result.scores else -10.0
        if not tokens or (result.no_speech_prob > 0.6 and avg_logprob < -1.0):
            return Decoded(seconds=seconds, language=language)
        confidence = float(np.exp(min(0.0, avg_logprob)))
        if not final:
            return Decoded(text, [Word(w, confidence) for w in text.split()], confidence, seconds, language)
        _go_on(abandoned)
        # The completion pass needs only the words: beside the alignment when a worker is spare.
        side = self._side.submit(self.completion, tokenizer, tokens, text) if self._side is not None and self.spare() else None
        alignment = self.model.find_alignment(tokenizer, [tokens], encoded, min(n, frames))[0]
        merge_punctuations(alignment, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
        words = [
            Word(w["word"].strip(), float(w["probability"]), float(w["start"]), float(w["end"]))
            for w in alignment
            if w["word"].strip()
        ]
        if side is None:
            _go_on(abandoned)
        complete = side.result() if side is not None else self.completion(tokenizer, tokens, text)
        return Decoded(text, words, confidence, seconds, language, complete)

    def completion(self, tokenizer: "Tokenizer", tokens: list[int], text: str) -> float:
        """How likely ``text`` is a finished utterance (0..1): the end-of-turn signal from what was said.

        Whisper's own punctuation cannot tell: the audio stops at the pause, so a sentence cut
        there ("I went to the store") is decoded with a full stop as often as a finished one. Its
        decoder is also a language model, though: run over the encoding of silence, with the
        words as a forced prefix, the probability that the next token is terminal punctuation
        (". ? !") is low after "Could you send me" (0.03) and high after "...the report from
        yesterday" (0.5). A trailing conjunction, article, preposition or filler, or a trailing
        "..." or comma, reads as unfinished whatever the model says.
        """
        words = _norm_words(text)
        if not words:
            return 1.0  # nothing said (noise): nothing to wait for
        stripped = text.rstrip()
        english = tokenizer.language_code == "en"
        if stripped.endswith(("...", "…", ",", "-", ":")) or (english and words[-1] in UNFINISHED_WORDS and not stripped.endswith(("?", "!"))):
            return 0.0
        while tokens and not tokenizer.decode(tokens[-1:]).strip(" " + PUNCTUATION):
            tokens = tokens[:-1]  # drop trailing punctuation: the question is what comes next
        if not tokens:
            return 1.0
        prompt = self.model.get_prompt(tokenizer, [], without_timestamps=True)
        # CTranslate2 counts forced prefix steps against max_length at about half their number.
        result = self.model.model.generate(
            self._silent_encoding,
            [prompt + tokens],
            beam_size=1,
            max_length=2 * len(tokens) + 6,
            return_logits_vocab=True,
            suppress_blank=False,
            suppress_tokens=[],
        )[0]
        steps = result.logits[0] if result.logits else []
        if len(steps) <= len(tokens):
            return 0.5  # not measurable: neither early nor late
        logits = np.asarray(steps[len(tokens)], dtype=np.float64)
        probs = np.exp(logits - logits.max())
        return float(probs[self._terminals].sum() / probs.sum())

    def _trim_repeats(self, tokenizer: "Tokenizer", tokens: list[int], text: str) -> tuple[list[int], str]:
        """Drop a repeated tail ("a b c. a b c") down to its first occurrence."""
        words = _norm_words(text)
        while (size := repeated_tail(words)) > 0:
            words = words[:-size]
            for k in range(len(tokens) - 1, 0, -1):
                if _norm_words(tokenizer.decode(tokens[:k])) == words:
                    tokens = tokens[:k]
                    break
            else:
                break
            text = tokenizer.decode(tokens).strip()
        return tokens, text

    def _encode(self, features: np.ndarray, frames: int, wide: bool = False) -> Any:
        # The padding is silence: the floor the feature extractor clamps to, 8 orders below the
        # loudest bin, as when Whisper pads the audio itself. A zero in normalised log-mel is
        # not silence but a steady hum 4 orders above that floor, and it cost the first word of
        # short turns ("Hello world" -> "The long world").
        n = min(features.shape[-1], frames)
        floor = max(float(features[:, :n].max()) - 2.0, SILENCE_MEL) if n else SILENCE_MEL
        window = np.full((self.n_mels, frames), floor, dtype=np.float32)
        window[:, :n] = features[:, :n]
        if wide and self.wide is not None and self._wide_lock.acquire(blocking=False):
            try:
                self.wide_encodes += 1
                return self.wide.encode(self._storage(window[None]))
            finally:
                self._wide_lock.release()
        return self.model.encode(window)

    def encode_seconds(self, runs: int = 3) -> float:
        """The box's speed: the fastest of ``runs`` encodes of an 8 s window (an Update's), in seconds.

        The window is silence, so the figure does not depend on what was said; the fastest run is
        the one least disturbed by other work on the box.
        """
        window = np.full((self.n_mels, MIN_WINDOW_FRAMES), SILENCE_MEL, dtype=np.float32)
        best = float("inf")
        for _ in range(runs):
            started = time.perf_counter()
            self.model.encode(window)
            best = min(best, time.perf_counter() - started)
        return best

    def detect_audio(self, audio: np.ndarray, candidates: frozenset[str] | None = None, prior: str | None = None) -> str:
        """The language of ``audio`` on its own encoding (as :meth:`detect`), in the shortest window."""
        features = self.model.feature_extractor(audio)
        frames = window_frames(features.shape[-1], False, audio.size / RATE)
        return self.detect(self._encode(features, frames), candidates, prior)

    def _generate(
        self,
        features: np.ndarray,
        frames: int,
        final: bool,
        hotwords: str | None,
        seconds: float,
        language: str | None,
        candidates: frozenset[str] | None,
        prior: str | None,
        wide: bool = False,
        abandoned: threading.Event | None = None,
    ):
        encoded = self._encode(features, frames, wide)
        _go_on(abandoned)
        if language is None:
            language = self.detect(encoded, candidates, prior)
        tokenizer = self.tokenizer_for(language)
        prompt = self.model.get_prompt(tokenizer, [], without_timestamps=True, hotwords=hotwords)
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
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        return tokens, result, encoded, language

