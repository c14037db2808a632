"""One Whisper stream: Silero windows in, turn events out, in order.

The turn machine runs on the event loop and only decides; resampling and VAD run in the engine's
front-end worker, decodes in its decode pool (see the package docstring for how a turn is made).
"""
from __future__ import annotations

import asyncio
import collections
import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from relay.exceptions import EngineError
from relay.flux.audio import Resampler
from relay.flux.constants import DEFAULT_EOT_THRESHOLD, DEFAULT_MODEL, MULTILINGUAL_MODEL
from relay.ops.logs import get_logger

from relay.engines.base import (
    TRIGGER_END_OF_STREAM,
    EngineWarning,
    StreamOptions,
    TurnEvent,
    Word,
    base_language,
    language_ignored_warning,
    model_ignored_warning,
)
from relay.engines.offline.pool import PRIORITY_FINAL, PRIORITY_STREAM, PRIORITY_UPDATE, OfflineStream

from .runner import RATE, Decoded
from .vad import SPEECH_OFF, SPEECH_ON, WINDOW, WINDOW_S

if TYPE_CHECKING:
    from .engine import WhisperEngine

log = get_logger("relay.engines.offline.whisper")

START_WINDOWS = 3  # ~100 ms of speech opens a turn
PREROLL_S = 0.4
#: flux-general-multi: a turn's language is settled by the first decode with this much audio (or
#: by its final when shorter). Earlier Updates decode in a provisional guess and report none.
LANGUAGE_LOCK_S = 2.0


class WhisperStream(OfflineStream):
    engine: "WhisperEngine"

    def __init__(self, engine: "WhisperEngine", options: StreamOptions) -> None:
        super().__init__(engine, options)
        self.resampler = Resampler(options.encoding, options.sample_rate, RATE)
        self.vad_state: dict[str, np.ndarray] | None = None
        self.carry = np.zeros(0, dtype=np.float32)
        self.windows_done = 0
        self.turn = 0
        # Events leave in order; an EndOfTurn still being decoded holds back the next turn's.
        self._outbox: collections.deque[TurnEvent | asyncio.Future] = collections.deque()
        self._out_idle = asyncio.Event()
        self._out_idle.set()
        self.update_task: asyncio.Task | None = None
        self.spec: asyncio.Future | None = None
        # flux-general-multi only (set in start()): the pinned language (one hint), the languages
        # detection chooses from (several hints), the last turn's language (the prior).
        self.multilingual = False
        self.pinned: str | None = None
        self.candidates: frozenset[str] | None = None
        self.last_language: str | None = None
        self._reset_turn()
        self.preroll: list[np.ndarray] = []
        self.speech_run = 0

    # -- options --------------------------------------------------------------------------------
    def _limits(self) -> tuple[float, str, float | None]:
        """(silence that ends a turn, its trigger, silence for EagerEndOfTurn or None)."""
        base = float(self.engine.options.get("eot_silence_ms", 500)) / 1000
        eot = base
        if self.options.eot_threshold is not None:
            # A higher threshold asks for more certainty: wait longer before ending the turn.
            eot = base * self.options.eot_threshold / DEFAULT_EOT_THRESHOLD
        trigger = "model"
        if self.options.eot_timeout_ms is not None and self.options.eot_timeout_ms / 1000 < eot:
            eot, trigger = self.options.eot_timeout_ms / 1000, "timeout"
        eager = None
        if self.options.eager_eot_threshold is not None:
            ratio = self.options.eager_eot_threshold / (self.options.eot_threshold or DEFAULT_EOT_THRESHOLD)
            eager = min(eot, max(self.engine.speculate_s + WINDOW_S, eot * ratio))
        return eot, trigger, eager

    def _hotwords(self) -> str | None:
        terms = [t.strip() for t in self.options.keyterms if t.strip()]
        return ", ".join(terms)[:400] if terms else None

    async def start(self) -> list[EngineWarning]:
        try:
            await self.engine.wait_loaded()
        except BaseException:
            self._release()
            raise
        self.vad_state = self.engine.vad.new_state()
        await super().start()
        runner = self.engine.runner
        if self.options.model == MULTILINGUAL_MODEL and runner.multilingual:
            self.multilingual = True
            return self._apply_hints()
        serving = f"transcribing English with {self.engine.model_label}"
        supported = {DEFAULT_MODEL, MULTILINGUAL_MODEL} if runner.multilingual else DEFAULT_MODEL
        warnings = [model_ignored_warning(self.options, serving=serving, supported=supported), language_ignored_warning(self.options, serving=serving)]
        return [w for w in warnings if w is not None]

    def _apply_hints(self) -> list[EngineWarning]:
        """One usable hint pins the language; several narrow detection to them; none: any language."""
        codes = list(dict.fromkeys(base_language(h) for h in self.options.language_hints))
        usable = [c for c in codes if c in self.engine.runner.languages]
        self.pinned = usable[0] if len(usable) == 1 else None
        self.candidates = frozenset(usable) if len(usable) > 1 else None
        if self.pinned is not None:
            self.turn_language = self.pinned
        unknown = [c for c in codes if c not in usable]
        if not unknown:
            return []
        return [EngineWarning("LANGUAGE_IGNORED", f"{self.engine.model_label} cannot transcribe {', '.join(unknown)}; that hint is not used.")]

    async def configure(
        self, thresholds: dict[str, Any], keyterms: list[str] | None, *, language_hints: list[str] | None = None
    ) -> list[EngineWarning]:
        # _limits() and _hotwords() read the options live; new hints apply from the next decode.
        await super().configure(thresholds, keyterms, language_hints=language_hints)
        if language_hints is None:
            return []
        if not self.multilingual:
            warning = language_ignored_warning(self.options, serving=f"transcribing English with {self.engine.model_label}")
            return [warning] if warning is not None else []
        return self._apply_hints()

    # -- turn state -----------------------------------------------------------------------------
    def _reset_turn(self) -> None:
        # Queued decodes of a finished turn would only be thrown away: take them off the pool.
        if self.update_task is not None and not self.update_task.done():
            self.update_task.cancel()
        self._drop_spec()
        self.in_turn = False
        self.turn_audio: list[np.ndarray] = []
        self.turn_samples = 0
        self.turn_start = 0.0  # stream seconds of the first sample in turn_audio
        self.silence = 0.0
        self.speech_since_update = 0.0
        self.updates_started = False
        self.eager_sent = False
        self.last_decoded: Decoded | None = None
        self.turn_language: str | None = self.pinned  # flux-general-multi: settled for this turn

    def _now(self) -> float:
        return self.windows_done * WINDOW_S

    def _turn_event(
        self, name: str, decoded: Decoded | None = None, *, window: tuple[int, float, float] | None = None, **extra: Any
    ) -> TurnEvent:
        turn, start, end = window or (self.turn, self.turn_start, self._now())
        words = [
            Word(w.word, w.confidence, None if w.start is None else start + w.start, None if w.end is None else start + w.end)
            for w in (decoded.words if decoded else [])
        ]
        return TurnEvent(
            event=name,  # type: ignore[arg-type]
            turn=turn,
            transcript=decoded.text if decoded else "",
            words=words,
            audio_window_start=round(start, 3),
            audio_window_end=round(end, 3),
            languages=self._languages(name, decoded),
            **extra,
        )

    def _languages(self, name: str, decoded: Decoded | None) -> list[str] | None:
        """flux-general-multi: a final's own language; otherwise the turn's, once settled."""
        if not self.multilingual:
            return None
        if name in ("EagerEndOfTurn", "EndOfTurn") and decoded is not None and decoded.language:
            return [decoded.language]
        return [self.turn_language] if self.turn_language else None

    def _out(self, item: TurnEvent | asyncio.Future) -> None:
        self._outbox.append(item)
        if isinstance(item, asyncio.Future):
            self._out_idle.clear()
            item.add_done_callback(self._drain_out)
        self._drain_out()

    def _drain_out(self, _: object = None) -> None:
        while self._outbox:
            head = self._outbox[0]
            if isinstance(head, asyncio.Future):
                if not head.done():
                    return
                self._outbox.popleft()
                if head.cancelled():
                    continue
                if head.exception() is not None:
                    log.error("whisper_final_failed", exc_info=head.exception())
                    self.emit(EngineError("The Whisper decoder failed."))
                    continue
                self.emit(head.result())
            else:
                self.emit(self._outbox.popleft())
        self._out_idle.set()

    def _turn_pcm(self) -> np.ndarray:
        return np.concatenate(self.turn_audio) if self.turn_audio else np.zeros(0, dtype=np.float32)

    def _launch(self, final: bool) -> asyncio.Future:
        priority = PRIORITY_FINAL if final else PRIORITY_UPDATE
        if not self.multilingual:
            return asyncio.ensure_future(self.engine.pool.run(priority, self.engine.runner.decode, self._turn_pcm(), final, self._hotwords()))
        # turn_language None: the decode detects the language on its own encoder output.
        decode = functools.partial(self.engine.runner.decode, candidates=self.candidates, prior=self.last_language)
        return asyncio.ensure_future(self.engine.pool.run(priority, decode, self._turn_pcm(), final, self._hotwords(), self.turn_language))

    # -- audio ----------------------------------------------------------------------------------
    def _frontend(self, data: bytes, last: bool) -> tuple[np.ndarray, np.ndarray]:
        """Worker thread: resample, cut 32 ms windows, Silero probabilities."""
        pcm = self.resampler.process(data, last=last) if (data or last) else np.zeros(0, dtype=np.float32)
        pcm = np.concatenate((self.carry, pcm)) if self.carry.size else pcm
        if last and pcm.size % WINDOW:
            pcm = np.concatenate((pcm, np.zeros(WINDOW - pcm.size % WINDOW, dtype=np.float32)))
        k = pcm.size // WINDOW
        windows = pcm[: k * WINDOW].reshape(k, WINDOW).astype(np.float32, copy=False)
        self.carry = pcm[k * WINDOW :].copy()
        assert self.vad_state is not None
        return windows, self.engine.vad(windows, self.vad_state)

    async def process_audio(self, audio: bytes, last: bool = False) -> None:
        windows, probs = await self.engine.frontend.run(PRIORITY_STREAM, self._frontend, audio, last)
        for window, prob in zip(windows, probs):
            await self._window(window, float(prob))

    async def _window(self, window: np.ndarray, prob: float) -> None:
        self.windows_done += 1
        if not self.in_turn:
            self.preroll.append(window)
            limit = int(PREROLL_S / WINDOW_S) + START_WINDOWS
            if len(self.preroll) > limit:
                del self.preroll[: len(self.preroll) - limit]
            self.speech_run = self.speech_run + 1 if prob >= SPEECH_ON else 0
            if self.speech_run >= START_WINDOWS:
                self.in_turn = True
                self.turn_audio = self.preroll
                self.turn_samples = sum(w.size for w in self.preroll)
                self.turn_start = self._now() - self.turn_samples / RATE
                self.preroll = []
                self.speech_run = 0
                self.speech_since_update = START_WINDOWS * WINDOW_S
                self._out(self._turn_event("StartOfTurn"))
            return

        self.turn_audio.append(window)
        self.turn_samples += window.size
        speaking = prob >= SPEECH_OFF if self.silence == 0.0 else prob >= SPEECH_ON
        if speaking:
            self.silence = 0.0
            self.speech_since_update += WINDOW_S
            self._drop_spec()  # speech went on: a speculative final is stale
            if self.eager_sent:
                self.eager_sent = False
                self._out(self._turn_event("TurnResumed", self.last_decoded))
            self._maybe_update()
        else:
            self.silence += WINDOW_S
        eot, trigger, eager = self._limits()
        if self.turn_samples / RATE >= self.engine.max_turn_s:
            await self.end_turn_now("max_duration")
            return
        # Speculate early while a worker is idle; on a busy pool wait a little longer, since a
        # final decoded at a mere pause between words takes a worker from the other streams.
        spec_after = self.engine.speculate_s if self.engine.pool.idle() else self.engine.speculate_busy_s
        if self.silence >= spec_after and self.spec is None:
            self.spec = self._launch(final=True)
            if eager is not None:
                self.spec.add_done_callback(self._spec_done)
        spec = self.spec
        if eager is not None and not self.eager_sent and self.silence >= eager and spec is not None and spec.done() and not spec.cancelled() and spec.exception() is None:
            self._send_eager(spec)
        if self.silence >= eot:
            await self.end_turn_now(trigger)

    def _drop_spec(self) -> None:
        if self.spec is not None and not self.spec.done():
            self.spec.cancel()  # still queued: never runs; running: its result is ignored
        self.spec = None

    def _maybe_update(self) -> None:
        if self.eager_sent:
            return
        interval = self.engine.update_interval_s if self.updates_started else self.engine.first_update_s
        if self.speech_since_update < interval:
            return
        if self.update_task is not None and not self.update_task.done():
            return
        self.updates_started = True
        self.speech_since_update = 0.0
        self.update_task = asyncio.get_running_loop().create_task(self._update(self.turn, self._launch(final=False)))

    async def _update(self, turn: int, job: asyncio.Future) -> None:
        try:
            decoded: Decoded = await job
        except Exception:
            log.exception("whisper_update_failed")
            return
        if turn != self.turn or not self.in_turn or self.eager_sent or self._closed:
            return
        self.last_decoded = decoded
        if self.multilingual and self.turn_language is None and decoded.seconds >= LANGUAGE_LOCK_S:
            self.turn_language = decoded.language
        confidence = min(0.99, self.silence / max(self._limits()[0], 1e-3))
        self._out(self._turn_event("Update", decoded, end_of_turn_confidence=round(confidence, 3)))

    def _spec_done(self, future: asyncio.Future) -> None:
        if future is not self.spec or self.eager_sent or future.cancelled() or future.exception():
            return
        eager = self._limits()[2]
        if eager is not None and self.silence >= eager:
            self._send_eager(future)

    def _send_eager(self, future: asyncio.Future) -> None:
        decoded: Decoded = future.result()
        self.eager_sent = True
        self.last_decoded = decoded
        self._out(self._turn_event("EagerEndOfTurn", decoded, end_of_turn_confidence=self.options.eager_eot_threshold or 0.5))

    async def end_turn_now(self, trigger: str) -> None:
        """Close the turn now; its EndOfTurn leaves when its final decode is done.

        Audio processing goes on meanwhile (the next turn may start), but the next turn's events
        queue behind this EndOfTurn, so clients always see turns in order.
        """
        if not self.in_turn:
            return
        job = self.spec if self.spec is not None else self._launch(final=True)
        self.spec = None  # handed over: _reset_turn must not cancel it
        confidence = {"model": max(self.options.eot_threshold or DEFAULT_EOT_THRESHOLD, 0.9), "timeout": 0.5}.get(trigger, 1.0)
        window = (self.turn, self.turn_start, self._now())
        fed_at = self.fed_at  # the turn's end arrived with this batch, not with the one after its decode

        async def final() -> TurnEvent:
            decoded: Decoded = await job
            if decoded.language and self.multilingual:
                self.last_language = decoded.language
            event = self._turn_event("EndOfTurn", decoded, window=window, end_of_turn_confidence=confidence, trigger=trigger)
            return self.stamped(event, fed_at)

        self._out(asyncio.ensure_future(final()))
        self.turn += 1
        self._reset_turn()

    async def flush(self) -> None:
        await self.process_audio(b"", last=True)
        await self.end_turn_now(TRIGGER_END_OF_STREAM)
        if self.update_task is not None and not self.update_task.done():
            self.update_task.cancel()
        await self._out_idle.wait()

