"""PocketSphinx 5 as a truly streaming turn engine: low CPU, many streams, low accuracy.

Every 30 ms frame goes through pocketsphinx's ``Endpointer`` (its WebRTC-style VAD smoothed over
a window) and, while in speech, straight into the ``Decoder``: nothing is re-decoded, so a
stream costs about a fifth of a core whatever the turn length. The endpointer's window (300 ms,
scaled by ``eot_threshold``) decides the end of a turn. Updates are the decoder's partial
hypothesis at a steady cadence; the EndOfTurn carries the word segmentation (pocketsphinx
frames are 10 ms) with the language-model probability of each word as its confidence (the
decoder gives no per-word posterior without a lattice pass).

Decoders take about 0.3 s and some tens of MB to build, so the engine keeps idle ones and lends
them to new streams; frames are decoded in the engine's worker pool, never on the event loop.
pocketsphinx holds the GIL while it decodes, so a process gives it about one core whatever the
pool size (one thread by default); run more server processes for more sphinx streams.
"""
from __future__ import annotations

import importlib.util
import re
import threading
from typing import Any

import numpy as np

from relay.exceptions import Capacity
from relay.flux.audio import Resampler
from relay.flux.constants import DEFAULT_EOT_THRESHOLD
from relay.ops.logs import get_logger

from relay.engines.base import (
    TRIGGER_END_OF_STREAM,
    EngineWarning,
    StreamOptions,
    TurnEvent,
    Word,
    language_ignored_warning,
    model_ignored_warning,
)
from relay.engines.offline.pool import PRIORITY_STREAM, OfflineEngine, OfflineStream, WorkerPool

if importlib.util.find_spec("pocketsphinx") is None:
    raise ImportError("The sphinx engine needs the 'pocketsphinx' package (pip install -r requirements.txt).")

log = get_logger("relay.engines.offline.sphinx")

RATE = 16000
FRAME_RATE = 100  # pocketsphinx feature frames per second
_ALT = re.compile(r"\(\d+\)$")


def _clean(word: str) -> str:
    """'the(2)' -> 'the'; fillers such as <sil>, <s>, [NOISE] -> ''."""
    if word.startswith(("<", "[", "+")):
        return ""
    return _ALT.sub("", word)


class SphinxStream(OfflineStream):
    engine: "SphinxEngine"

    def __init__(self, engine: "SphinxEngine", options: StreamOptions) -> None:
        super().__init__(engine, options)
        self.resampler = Resampler(options.encoding, options.sample_rate, RATE)
        self.decoder: Any = None
        self.endpointer: Any = None
        self.carry = b""
        self.frames_done = 0
        self.turn = 0
        self.utt_open = False
        self.utt_start = 0.0
        self.since_update = 0.0
        self.last_text = ""

    def _window(self) -> float:
        base = float(self.engine.options.get("eot_window_ms", 300)) / 1000
        if self.options.eot_threshold is not None:
            base *= self.options.eot_threshold / DEFAULT_EOT_THRESHOLD
        return min(2.0, max(0.12, base))

    async def start(self) -> list[EngineWarning]:
        import pocketsphinx

        try:
            self.decoder = await self.engine.pool.run(PRIORITY_STREAM, self.engine.acquire_decoder)
            self.endpointer = pocketsphinx.Endpointer(window=self._window(), sample_rate=RATE)
        except BaseException:
            self._release()
            raise
        await super().start()
        return self._warnings(self.options.explicit)

    def _warnings(self, fields: set[str]) -> list[EngineWarning]:
        warnings = []
        if "model" in fields:
            model_warning = model_ignored_warning(self.options, serving="using the pocketsphinx en-us model")
            if model_warning is not None:
                warnings.append(model_warning)
        if "language_hints" in fields:
            language_warning = language_ignored_warning(self.options, serving="the sphinx engine transcribes English only")
            if language_warning is not None:
                warnings.append(language_warning)
        if self.options.keyterms:
            warnings.append(EngineWarning("KEYTERMS_IGNORED", "The sphinx engine does not use keyterms."))
        if self.options.eager_eot_threshold is not None:
            warnings.append(EngineWarning("EAGER_EOT_UNSUPPORTED", "The sphinx engine ends turns from its endpointer only; no EagerEndOfTurn is sent."))
        if self.options.eot_timeout_ms is not None:
            warnings.append(EngineWarning("EOT_TIMEOUT_IGNORED", "The sphinx engine ends turns after its endpointer window; eot_timeout_ms is not used."))
        return warnings

    async def configure(
        self, thresholds: dict[str, Any], keyterms: list[str] | None, *, language_hints: list[str] | None = None
    ) -> list[EngineWarning]:
        await super().configure(thresholds, keyterms, language_hints=language_hints)
        fields = set(thresholds) | ({"keyterm"} if keyterms else set()) | ({"language_hints"} if language_hints else set())
        warnings = self._warnings(fields - {"model"})
        if "eot_threshold" in thresholds:
            warnings.append(EngineWarning("EOT_THRESHOLD_NEXT_STREAM", "The sphinx endpointer window is fixed per stream; eot_threshold applies to new streams."))
        return warnings

    def release(self) -> None:
        if self.decoder is not None:
            if self.utt_open:
                try:
                    self.decoder.end_utt()
                except Exception:
                    pass
            self.engine.return_decoder(self.decoder)
            self.decoder = None

    # -- worker side: everything below runs in the engine's pool, one job per stream at a time --
    def _event(self, name: str, text: str, words: list[Word] | None = None, **extra: Any) -> TurnEvent:
        return TurnEvent(
            event=name,  # type: ignore[arg-type]
            turn=self.turn,
            transcript=text,
            words=words if words is not None else [Word(w, 0.5) for w in text.split()],
            audio_window_start=round(self.utt_start, 3),
            audio_window_end=round(self.frames_done * self.endpointer.frame_length, 3),
            **extra,
        )

    def _hyp(self) -> str:
        hyp = self.decoder.hyp()
        return " ".join(w for w in (_clean(x) for x in (hyp.hypstr.split() if hyp else [])) if w)

    def _speech(self, speech: bytes, events: list[TurnEvent]) -> None:
        if not self.utt_open:
            self.utt_open = True
            self.utt_start = float(self.endpointer.speech_start)
            self.since_update = 0.0
            self.last_text = ""
            self.decoder.start_utt()
            events.append(self._event("StartOfTurn", ""))
        self.decoder.process_raw(speech, False, False)
        self.since_update += len(speech) / (2 * RATE)
        if self.since_update >= self.engine.update_interval_s:
            self.since_update = 0.0
            text = self._hyp()
            if text:
                self.last_text = text
                events.append(self._event("Update", text, end_of_turn_confidence=0.05))

    def _end_utt(self, trigger: str, events: list[TurnEvent]) -> None:
        if not self.utt_open:
            return
        self.decoder.end_utt()
        self.utt_open = False
        text = self._hyp()
        words = []
        for seg in self.decoder.seg():
            word = _clean(seg.word)
            if word:
                words.append(
                    Word(word, float(seg.lscore), self.utt_start + seg.start_frame / FRAME_RATE, self.utt_start + (seg.end_frame + 1) / FRAME_RATE)
                )
        confidence = {"model": 0.9, "manual": 1.0}.get(trigger, 1.0)
        events.append(self._event("EndOfTurn", text, words, end_of_turn_confidence=confidence, trigger=trigger))
        self.turn += 1

    def _process(self, data: bytes, last: bool) -> list[TurnEvent]:
        pcm = self.resampler.process(data, last=last) if (data or last) else np.zeros(0, dtype=np.float32)
        raw = self.carry + (np.clip(pcm * 32768.0, -32768, 32767).astype("<i2").tobytes() if pcm.size else b"")
        size = self.endpointer.frame_bytes
        events: list[TurnEvent] = []
        n = len(raw) // size
        for i in range(n):
            frame = raw[i * size : (i + 1) * size]
            was_speech = self.endpointer.in_speech
            speech = self.endpointer.process(frame)
            self.frames_done += 1
            if speech is not None:
                self._speech(speech, events)
                if was_speech and not self.endpointer.in_speech:
                    self._end_utt("model", events)
        self.carry = raw[n * size :]
        if last:
            if self.endpointer.in_speech:
                speech = self.endpointer.end_stream(self.carry)
                if speech:
                    self._speech(speech, events)
            self.carry = b""
            self._end_utt(TRIGGER_END_OF_STREAM, events)
        return events

    def _force(self) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        self._end_utt("manual", events)
        return events

    # -- loop side ------------------------------------------------------------------------------
    async def process_audio(self, audio: bytes) -> None:
        for event in await self.engine.pool.run(PRIORITY_STREAM, self._process, audio, False):
            self.emit(self.stamped(event))

    async def end_turn_now(self, trigger: str) -> None:
        for event in await self.engine.pool.run(PRIORITY_STREAM, self._force):
            self.emit(self.stamped(event))

    async def flush(self) -> None:
        for event in await self.engine.pool.run(PRIORITY_STREAM, self._process, b"", True):
            self.emit(self.stamped(event))


class SphinxEngine(OfflineEngine):
    """Options: workers, max_streams, eot_window_ms, update_interval_ms, hmm, lm, dict."""

    name = "sphinx"
    stream_class = SphinxStream

    def __init__(self, alias: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(alias, options)
        # pocketsphinx's Python binding holds the GIL while decoding: a second thread only adds
        # contention (measured: two threads take 1.5x longer than one doing both streams' work).
        self.workers = int(self.options.get("workers") or 1)
        self.max_streams = int(self.options.get("max_streams") or 16)
        self.update_interval_s = float(self.options.get("update_interval_ms", 250)) / 1000
        self.pool = WorkerPool(self.workers, f"sphinx-{alias}", max_wait=float(self.options.get("max_queue_wait_s", 1.0)), engine=alias)
        self._idle: list[Any] = []
        self._idle_lock = threading.Lock()

    def _new_decoder(self) -> Any:
        import pocketsphinx

        pocketsphinx.set_loglevel("FATAL")
        config = {key: self.options[key] for key in ("hmm", "lm", "dict") if self.options.get(key)}
        config.setdefault("dither", True)
        # The flat-lexicon second pass runs in end_utt and took up to 0.7 s per turn; without it
        # a turn ends within ~35 ms of the endpointer's decision (bestpath stays on).
        config.setdefault("fwdflat", False)
        return pocketsphinx.Decoder(**config)

    def acquire_decoder(self) -> Any:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        return self._new_decoder()

    def return_decoder(self, decoder: Any) -> None:
        with self._idle_lock:
            self._idle.append(decoder)

    def open_stream(self, options: StreamOptions) -> SphinxStream:
        if self.pool.saturated():
            raise Capacity("The sphinx decoders are saturated; try again later.")
        self.reserve()
        return SphinxStream(self, options)

    def readiness(self) -> tuple[bool, str]:
        if self.pool.saturated():
            return False, "decoders saturated"
        return True, "ok"

    def close(self) -> None:
        self.pool.shutdown()
