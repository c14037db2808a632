"""One Whisper stream: Silero windows in, turn events out, in order.

The turn machine runs on the event loop and only decides; resampling and VAD run in the engine's
front-end worker, decodes in its decode pool (see the package docstring for how a turn is made).
"""
from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

import numpy as np

from relay.exceptions import EngineError
from relay.flux.audio import Resampler
from relay.flux.constants import DEFAULT_EOT_THRESHOLD
from relay.ops.logs import get_logger

from relay.engines.base import TRIGGER_END_OF_STREAM, EngineWarning, StreamOptions, TurnEvent, Word, model_ignored_warning
from relay.engines.offline.pool import PRIORITY_FINAL, PRIORITY_STREAM, PRIORITY_UPDATE, OfflineStream

from .runner import RATE, Decoded
from .vad import SPEECH_OFF, SPEECH_ON, WINDOW, WINDOW_S

if TYPE_CHECKING:
    from .engine import WhisperEngine

log = get_logger("relay.engines.offline.whisper")

START_WINDOWS = 3  # ~100 ms of speech opens a turn
PREROLL_S = 0.4


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
        warning = model_ignored_warning(self.options, serving=f"transcribing English with {self.engine.model_label}")
        return [warning] if warning is not None else []

    async def configure(self, thresholds: dict[str, Any], keyterms: list[str] | None) -> list[EngineWarning]:
        await super().configure(thresholds, keyterms)  # _limits() and _hotwords() read the options live
        return []

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
            **extra,
        )

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
        return asyncio.ensure_future(self.engine.pool.run(priority, self.engine.runner.decode, self._turn_pcm(), final, self._hotwords()))

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

        async def final() -> TurnEvent:
            decoded: Decoded = await job
            return self._turn_event("EndOfTurn", decoded, window=window, end_of_turn_confidence=confidence, trigger=trigger)

        self._out(asyncio.ensure_future(final()))
        self.turn += 1
        self._reset_turn()

    async def flush(self) -> None:
        await self.process_audio(b"", last=True)
        await self.end_turn_now(TRIGGER_END_OF_STREAM)
        if self.update_task is not None and not self.update_task.done():
            self.update_task.cancel()
        await self._out_idle.wait()

