"""A deterministic engine for tests and benchmarks: energy-based turns, transcripts from durations.

Speech is any 10 ms window whose RMS exceeds ``energy_threshold`` (tone bursts and silence make
turns). The transcript names the speech blocks of the turn: one word per ``update_interval_ms``
of speech ("one two three ..."), so a test knows exactly what to expect from the audio it sent.
Costs one numpy call per frame for the energies of its 10 ms windows. Compressed audio is decoded
inline, on the event loop (this is a test engine; real engines decode in their worker pools),
with the same decoders and the same INVALID_AUDIO_PACKET / INVALID_AUDIO rules.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from relay.exceptions import ConfigureRejected, InvalidAudio
from relay.flux.codecs import INVALID_AUDIO_PACKET, PACKET_ENCODINGS, decoder_for, frame_packet
from relay.flux.constants import DEFAULT_EOT_THRESHOLD

from relay.engines.base import (
    TRIGGER_END_OF_STREAM,
    Engine,
    EngineStream,
    EngineWarning,
    StreamOptions,
    TurnEvent,
    Word,
    language_ignored_warning,
    model_ignored_warning,
)

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()


_EMPTY = np.zeros(0, dtype=np.int16)


def number_word(n: int) -> str:
    return NUMBER_WORDS[n % len(NUMBER_WORDS)]


class FakeStream(EngineStream):
    engine: "FakeEngine"

    def __init__(self, engine: "FakeEngine", options: StreamOptions) -> None:
        super().__init__(engine, options)
        self.decoder = decoder_for(options.encoding, options.sample_rate)
        self.audio_failed = False
        self.rate = self.decoder.rate
        self.window = max(1, self.rate // 100)  # 10 ms of samples
        self._pending = _EMPTY
        self.samples_done = 0
        self.turn = 0
        self.in_turn = False
        self.eager_sent = False
        self.turn_start = 0.0
        self.speech_samples = 0  # speech in the open turn
        self.silence_samples = 0  # trailing silence in the open turn
        self.words: list[Word] = []
        self.next_update_at = 0
        threshold = float(engine.options.get("energy_threshold", 500.0))
        self._limit = threshold * threshold * self.window  # a window's sum of squares above this is speech
        self._interval = int(self.rate * engine.options.get("update_interval_ms", 250) / 1000)

    # -- helpers --------------------------------------------------------------------------------
    def _now(self) -> float:
        return self.samples_done / self.rate

    def _event(self, name: str, **extra: Any) -> TurnEvent:
        return TurnEvent(
            event=name,  # type: ignore[arg-type]
            turn=self.turn,
            transcript=" ".join(w.word for w in self.words),
            words=list(self.words),
            audio_window_start=round(self.turn_start, 3),
            audio_window_end=round(self._now(), 3),
            **extra,
        )

    def _silence_limits(self) -> tuple[int, int | None]:
        eot = int(self.engine.options.get("eot_silence_ms", 500))
        if self.options.eot_threshold is not None:
            # A higher threshold asks for more certainty: wait longer before ending the turn.
            eot = int(eot * (0.5 + self.options.eot_threshold) / (0.5 + DEFAULT_EOT_THRESHOLD))
        timeout = self.options.eot_timeout_ms
        return eot, timeout

    def _end_turn(self, trigger: str) -> None:
        if not self.in_turn:
            return
        # Audio is processed inline in feed(), so now is when the audio that ended the turn arrived.
        self.emit(self._event("EndOfTurn", end_of_turn_confidence=0.95 if trigger == "model" else 1.0, trigger=trigger, speech_ended_at=time.monotonic()))
        self.in_turn = False
        self.eager_sent = False
        self.words = []
        self.speech_samples = 0
        self.silence_samples = 0
        self.turn += 1

    # -- engine interface -----------------------------------------------------------------------
    async def start(self) -> list[EngineWarning]:
        warnings = []
        if self.options.keyterms:
            warnings.append(EngineWarning("KEYTERMS_IGNORED", "The fake engine does not use keyterms."))
        model_warning = model_ignored_warning(self.options, serving="using the fake engine")
        if model_warning is not None:
            warnings.append(model_warning)
        language_warning = language_ignored_warning(self.options, serving="the fake engine makes English number words")
        if language_warning is not None:
            warnings.append(language_warning)
        return warnings

    def feed(self, audio: bytes) -> None:
        if self._closed or self.audio_failed:
            return
        try:
            samples = self.decoder.decode(frame_packet(audio) if self.options.encoding in PACKET_ENCODINGS else audio)
        except InvalidAudio as exc:
            # The consumer ends the stream on this error and still calls finish(), which ends
            # and stores the open turn; no more audio is taken meanwhile.
            self.audio_failed = True
            self._audio_warnings()
            self.emit(exc)
            return
        self._audio_warnings()
        self._windows(samples)

    def _audio_warnings(self) -> None:
        for description in self.decoder.take_warnings():
            self.emit(EngineWarning(INVALID_AUDIO_PACKET, description))

    def _windows(self, samples: np.ndarray) -> None:
        if self._pending.size:
            samples = np.concatenate((self._pending, samples))
        w = self.window
        n_windows = samples.size // w
        span = n_windows * w
        self._pending = samples[span:].copy() if samples.size > span else _EMPTY
        if not n_windows:
            return
        # Each window's energy in one call; float64 holds these sums of squares exactly, so the
        # outcome does not depend on the order numpy adds them in.
        x = samples[:span].reshape(n_windows, w).astype(np.float64)
        limit = self._limit
        voiced = [energy > limit for energy in np.einsum("ij,ij->i", x, x).tolist()]
        # The common frames in one step, with the same outcome as window by window: silence
        # outside a turn, or speech inside one that reaches no Update and resumes nothing.
        if True not in voiced:
            if not self.in_turn:
                self.samples_done += span
                return
        elif False not in voiced and self.in_turn and not (self.eager_sent and self.silence_samples) \
                and self.speech_samples + span < self.next_update_at:
            self.samples_done += span
            self.silence_samples = 0
            self.speech_samples += span
            return
        interval = self._interval
        eot_ms, timeout_ms = self._silence_limits()
        eot_samples = self.rate * eot_ms // 1000
        timeout_samples = self.rate * timeout_ms // 1000 if timeout_ms else None
        for speech in voiced:
            self.samples_done += w
            if speech:
                if not self.in_turn:
                    self.in_turn = True
                    self.turn_start = (self.samples_done - w) / self.rate
                    self.speech_samples = 0
                    self.next_update_at = interval
                    self.emit(self._event("StartOfTurn"))
                elif self.eager_sent and self.silence_samples:
                    self.eager_sent = False
                    self.emit(self._event("TurnResumed"))
                self.silence_samples = 0
                self.speech_samples += w
                if self.speech_samples >= self.next_update_at:
                    start = (self.samples_done - interval) / self.rate
                    self.words.append(Word(number_word(len(self.words) + 1), 0.99, round(start, 3), round(self._now(), 3)))
                    self.next_update_at += interval
                    self.emit(self._event("Update", end_of_turn_confidence=0.05))
            elif self.in_turn:
                self.silence_samples += w
                if timeout_samples is not None and self.silence_samples >= timeout_samples and timeout_samples < eot_samples:
                    self._end_turn("timeout")
                elif self.silence_samples >= eot_samples:
                    self._end_turn("model")
                elif (
                    self.options.eager_eot_threshold is not None
                    and not self.eager_sent
                    and self.silence_samples >= eot_samples // 2
                ):
                    self.eager_sent = True
                    self.emit(self._event("EagerEndOfTurn", end_of_turn_confidence=self.options.eager_eot_threshold))

    async def force_end_turn(self) -> None:
        self._end_turn("manual")

    async def configure(
        self, thresholds: dict[str, Any], keyterms: list[str] | None, *, language_hints: list[str] | None = None
    ) -> list[EngineWarning]:
        if thresholds.get("eot_timeout_ms") == 0:
            raise ConfigureRejected("eot_timeout_ms must be positive.")
        await super().configure(thresholds, keyterms, language_hints=language_hints)
        warnings = [EngineWarning("KEYTERMS_IGNORED", "The fake engine does not use keyterms.")] if keyterms else []
        if language_hints:
            warnings.append(EngineWarning("LANGUAGE_IGNORED", "The fake engine makes English number words; language hints are not used."))
        return warnings

    async def finish(self) -> None:
        if self._closed:
            return
        if not self.audio_failed:
            try:
                self._windows(self.decoder.finish())
            except InvalidAudio as exc:
                self.audio_failed = True
                self.emit(exc)
            self._audio_warnings()
        self._end_turn(TRIGGER_END_OF_STREAM)
        self.end()


class FakeEngine(Engine):
    name = "fake"
    stream_class = FakeStream
