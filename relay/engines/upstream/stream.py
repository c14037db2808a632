"""A client stream relayed to an upstream Flux service: the socket loop, reconnects and fallback.

The rules live in :mod:`.flux_client` (what to send, how to read replies, what to resend, how
turns are numbered); :mod:`.connection` runs one WebSocket. Here one task per stream connects,
replays unanswered audio, serves the connection until it fails, reconnects, and finally hands
the stream to a fallback engine (:mod:`.fallback`).

The reconnect loop is the relay's own rather than ``async for ws in connect(...)`` because it
must refuse to retry 401/403, resend unanswered audio on every new connection, count an outage
towards the fallback limit, and take its backoff from settings (websockets reads its backoff from
process-wide environment variables). docs/upstream.md explains the choices.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.exceptions import InvalidURI, WebSocketException

from relay.exceptions import ConfigureRejected, EngineError, EngineUnavailable, InvalidAudio, RelayError, UpstreamAuthFailed
from relay.flux.audio import COMPRESSED_ENCODINGS, to_int16
from relay.flux.codecs import INVALID_AUDIO_PACKET
from relay.ops.logs import get_logger

from relay.engines.base import TRIGGER_END_OF_STREAM, EngineStream, EngineWarning, StreamOptions

from .connection import Dropped, Link, LinkedStream, Rejected, Stalled, open_connection
from .fallback import fallback_stream_open
from .flux_client import (
    AUDIO_LOST,
    FALLBACK,
    FORCE_END_TURN,
    RECONNECTED,
    RECONNECTING,
    TURN_LEAD_SECONDS,
    TurnMapper,
    configure_message,
    shift,
)
from .replay import MAX_OPUS_BYTES_PER_SECOND, AudioLog, PageNumbers, Unit, framer_for, page_numbers_for

if TYPE_CHECKING:
    from .engine import UpstreamEngine

log = get_logger("relay.upstream")


class UpstreamStream(LinkedStream):
    """A client stream relayed to an upstream Flux service, surviving its failures."""

    engine: "UpstreamEngine"

    def __init__(self, engine: "UpstreamEngine", options: StreamOptions) -> None:
        super().__init__(engine, options)
        self.config = engine.config()
        self.framer = framer_for(options)
        self.tps = self.framer.ticks_per_second
        compressed = options.encoding in COMPRESSED_ENCODINGS
        self.log = AudioLog(
            max_ticks=self.framer.ticks(self.config.replay_seconds),
            width=self.framer.width,
            divisible=self.framer.divisible,
            max_bytes=int(self.config.replay_seconds * MAX_OPUS_BYTES_PER_SECOND) if compressed else None,
        )
        self.turns = TurnMapper()
        self._outbox: deque[Unit | str] = deque()
        self._outbox_ticks = 0
        self._wake = asyncio.Event()
        self._link: Link | None = None
        self._task: asyncio.Task | None = None
        self._started: asyncio.Future | None = None
        self._finishing = False
        self._failed = False
        self._force_pos: int | None = None
        self._loud_end = 0
        self._loud_limit = self.config.speech_rms**2
        self._preroll = self.framer.ticks(2 * self.config.stall_seconds + TURN_LEAD_SECONDS)
        self._last_link: Link | None = None
        self._fallback: EngineStream | None = None
        self._fallback_pages: PageNumbers | None = None
        self._fallback_pump: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    # -- engine interface -------------------------------------------------------------------------
    async def start(self) -> list[EngineWarning]:
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._task = loop.create_task(self._run())
        self._task.add_done_callback(self._run_ended)
        await asyncio.wait({self._started, self._task}, timeout=self.config.connect_timeout + 1, return_when=asyncio.FIRST_COMPLETED)
        if not self._started.done():
            self._started.cancel()  # still trying: later failures reach the client as events
        elif self._started.exception() is not None:
            raise self._started.exception()  # type: ignore[misc]
        return self.engine.option_warnings(self.options)

    def feed(self, audio: bytes) -> None:
        if not audio or self._failed:
            return
        units = self._frame(audio)
        if self._fallback is not None:
            pages = self._fallback_pages
            for unit in units:
                self._fallback.feed(unit.data if pages is None else pages(unit.data))
            return
        link = self._link
        for unit in units:
            if not unit.header:
                self.log.append(unit)
            if link is not None:
                self._outbox.append(unit)
                self._outbox_ticks += unit.ticks
        if link is not None and units:
            self._wake.set()
        if self._is_loud(audio):
            self._loud_end = self.log.fed
        if self._link is not None and not self.turns.open:
            # With no turn open, audio sent more than two stall limits ago was silence to a live
            # upstream (it would have started a turn, or the watchdog would have declared it
            # stalled, by now): no need to resend it. During an outage nothing is dropped but
            # by the replay buffer's own bound.
            self.log.commit(self._link.sent - self._preroll)

    @property
    def backlog_seconds(self) -> float:
        if self._fallback is not None:
            return self._fallback.backlog_seconds
        return self._outbox_ticks / self.tps if self._link is not None else 0.0

    async def force_end_turn(self) -> None:
        if self._fallback is not None:
            await self._fallback.force_end_turn()
            return
        if self._link is None:
            if self.turns.open:  # reconnecting: end the turn with what the upstream said so far
                self._end_open_turn("manual", at=self.log.fed)
            return
        if self.turns.open:
            self._force_pos = self.log.fed
        self._send_text(FORCE_END_TURN)

    async def configure(
        self, thresholds: dict[str, Any], keyterms: list[str] | None, *, language_hints: list[str] | None = None
    ) -> list[EngineWarning]:
        hints = {} if language_hints is None else {"language_hints": language_hints}
        if self._fallback is not None:
            warnings = await self._fallback.configure(thresholds, keyterms, **hints)
            await super().configure(thresholds, keyterms, **hints)  # the consumer reports our options
            return warnings
        warnings: list[EngineWarning] = []
        if language_hints is not None and not self.engine.sends_model:
            # An upstream with a fixed English model (Cloudflare) would refuse them.
            if language_hints:
                warnings.append(EngineWarning("LANGUAGE_IGNORED", f"The {self.engine.alias} upstream serves one English model; language hints are not used."))
            language_hints = None
        before = {name: getattr(self.options, name) for name in thresholds}
        old_keyterms, old_hints = list(self.options.keyterms), list(self.options.language_hints)
        # Applied locally first: a reconnect sends the new values as query parameters.
        await super().configure(thresholds, keyterms, language_hints=language_hints)
        link = self._link
        if link is None:
            return warnings
        if not thresholds and keyterms is None and language_hints is None:
            return warnings  # nothing left to send upstream
        reply: asyncio.Future = asyncio.get_running_loop().create_future()
        link.configures.append((reply, False))
        self._send_text(configure_message(thresholds, keyterms, language_hints))
        try:
            async with asyncio.timeout(self.config.stall_seconds):  # not wait_for: see _write_loop
                rejected = await asyncio.shield(reply)
        except TimeoutError:
            return warnings  # unconfirmed; a silent upstream is the stall watchdog's business
        if rejected is not None:
            for name, value in before.items():
                setattr(self.options, name, value)
            self.options.keyterms = old_keyterms
            self.options.language_hints = old_hints
            raise ConfigureRejected(rejected)
        return warnings

    async def finish(self) -> None:
        self._finishing = True
        self._wake.set()
        task = self._task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(self.config.close_timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                log.warning("upstream_flush_incomplete", engine=self.engine.alias, timeout=f"{self.config.close_timeout:.1f}s")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._fallback is not None:
            await self._fallback.finish()
            if self._fallback_pump is not None:
                await self._fallback_pump
        self._emit_all(self.turns.close(TRIGGER_END_OF_STREAM))
        self.end()

    async def abort(self) -> None:
        for task in (self._task, self._fallback_pump):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._fallback is not None:
            await self._fallback.abort()
        self.end()

    # -- helpers ----------------------------------------------------------------------------------
    def _frame(self, audio: bytes) -> list[Unit]:
        """The client's frame as whole units (Ogg: the pages it completes); bad Ogg is the
        client's error, as with the relay's own decoders (docs/protocol.md)."""
        try:
            units = self.framer.push(audio)
        except InvalidAudio as exc:
            self._failed = True  # the consumer ends the stream; finish() still flushes the upstream
            units = []
            self._audio_warnings()
            self.emit(exc)
        else:
            self._audio_warnings()
        return units

    def _audio_warnings(self) -> None:
        for description in self.framer.take_warnings():
            self.emit(EngineWarning(INVALID_AUDIO_PACKET, description))

    def _is_loud(self, audio: bytes) -> bool:
        if self.options.encoding in COMPRESSED_ENCODINGS:
            return True  # not decoded here (the upstream does): keep it all for resend, up to the bound
        samples = to_int16(audio, self.options.encoding).astype(np.float32)
        return bool(samples.size) and float(np.dot(samples, samples)) / samples.size > self._loud_limit

    def _signal_started(self, exc: BaseException | None = None) -> None:
        if self._started is not None and not self._started.done():  # start() is waiting
            if exc is None:
                self._started.set_result(None)
            else:
                self._started.set_exception(exc)
        elif exc is not None:
            self._failed = True
            self.emit(exc)

    def _starting_without_fallback(self, why: str) -> bool:
        """Whether the stream ends here: the first connection failed before the upstream said a
        word, and there is no fallback engine to wait for. Otherwise the stream starts and the
        outage runs its course (reconnects, then the fallback) as it would later."""
        if self._started is None or self._started.done():
            return False
        fallback = self.config.fallback_engine
        if fallback and fallback != self.engine.alias:
            self._signal_started()
            return False
        self._signal_started(EngineUnavailable(f"The upstream speech service {why} and no fallback engine is configured."))
        return True

    def _run_ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("upstream_failed", engine=self.engine.alias, exc_info=task.exception())
        self._signal_started(EngineError())

    # -- the connection loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        alias, url = self.engine.alias, self.engine.loggable_url()
        attempt = 0
        outage_since: float | None = None
        warned = False
        while True:
            if outage_since is not None and loop.time() - outage_since >= self.config.fallback_after:
                self._signal_started()
                await self._switch_to_fallback(loop.time() - outage_since)
                return
            if outage_since is not None:
                await asyncio.sleep(self.config.backoff(attempt))
                attempt += 1
            try:
                ws = await open_connection(self.engine.url_for(self.options), authorization=self.engine.authorization(), config=self.config)
            except UpstreamAuthFailed as exc:
                log.warning("upstream_auth_failed", engine=alias, url=url)
                self._signal_started(exc)
                return
            except Rejected as exc:
                log.warning("upstream_rejected", engine=alias, url=url, status=exc.args[0])
                await self._switch_to_fallback(0.0, reason=f"refused the stream (HTTP {exc})")
                self._signal_started()
                return
            except InvalidURI:
                log.error("upstream_bad_url", engine=alias)
                self._signal_started(EngineUnavailable(f"The {alias} engine's upstream URL is not valid."))
                return
            except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
                status = getattr(getattr(exc, "response", None), "status_code", "")
                log.warning("upstream_connect_failed", engine=alias, url=url, error=type(exc).__name__, status=status, attempt=attempt)
                if self._starting_without_fallback("cannot be reached"):
                    return
                if outage_since is None:
                    outage_since = loop.time()
                if not warned:
                    self._warn(RECONNECTING, "The upstream speech service cannot be reached; retrying. Audio is kept and will be sent when it is back.")
                    warned = True
                continue
            # start() waits on: the upstream's first message (its Connected), or a refusal after
            # the handshake (a relay checks its API tokens then: Error, close 4001).
            replay = self.log.size / self.tps
            if warned:
                lost = self.log.lost / self.tps
                down = loop.time() - outage_since if outage_since is not None else 0.0
                self._warn(RECONNECTED, f"Reconnected to the upstream speech service after {down:.1f} s; resent {replay:.1f} s of audio.")
                if lost:
                    self._warn(AUDIO_LOST, f"{lost:.1f} s of audio from the outage was more than the replay buffer holds and was not transcribed.")
                warned = False
            log.info("upstream_connected", engine=alias, url=url, attempt=attempt, replay=f"{replay:.2f}s")
            opened = loop.time()
            try:
                link = await self._serve(ws)
            except UpstreamAuthFailed as exc:
                log.warning("upstream_auth_failed", engine=alias, url=url)
                self._signal_started(exc)
                return
            except (Stalled, Dropped) as exc:
                kind = "stalled" if isinstance(exc, Stalled) else "dropped"
                link = self._last_link
                healthy = link is not None and (link.answered or (kind == "dropped" and loop.time() - opened >= self.config.stall_seconds))
                log.warning("upstream_lost", engine=alias, url=url, reason=kind, detail=str(exc), healthy=healthy)
                if self._starting_without_fallback("dropped the stream as it opened"):
                    return
                if healthy or outage_since is None:
                    outage_since = loop.time()
                    attempt = 0
                self._warn(RECONNECTING, f"The upstream speech service {'stopped answering' if kind == 'stalled' else 'connection dropped'}; reconnecting. No audio is lost.")
                warned = True
                continue
            log.info("upstream_closed", engine=alias, url=url, request_id=link.request_id)
            return


    # -- fallback ---------------------------------------------------------------------------------
    async def _switch_to_fallback(self, down: float, *, reason: str = "") -> None:
        alias = self.config.fallback_engine
        why = reason or f"has been unreachable for {down:.1f} s"
        try:
            stream, warnings = await fallback_stream_open(alias, self.options, upstream_alias=self.engine.alias)
        except RelayError as exc:
            log.error("upstream_fallback_failed", engine=self.engine.alias, fallback=alias, error=exc.description)
            self._signal_started(EngineUnavailable(f"The upstream speech service {why} and no fallback engine is available."))
            return
        log.warning("upstream_fallback", engine=self.engine.alias, fallback=alias, reason=why, replay=f"{self.log.size / self.tps:.2f}s")
        if self._force_pos is not None and self.turns.open:
            self._end_open_turn("manual", at=self._force_pos)
        self._warn(FALLBACK, f"The upstream speech service {why}; this stream continues on the {alias!r} engine.")
        for warning in warnings:
            self.emit(warning)
        self.turns.new_source()
        self._fallback_pump = asyncio.get_running_loop().create_task(self._pump_fallback(stream, self.log.base / self.tps))
        self._fallback = stream
        # Like a new upstream connection: Ogg's header pages first, then whole units, renumbered.
        pages = self._fallback_pages = page_numbers_for(self.options)
        for data in self.framer.header + [unit.data for unit in self.log.units()]:
            stream.feed(data if pages is None else pages(data))
        self.log.clear()

    async def _pump_fallback(self, stream: EngineStream, offset: float) -> None:
        try:
            async for item in stream.events():
                if isinstance(item, EngineWarning):
                    self.emit(item)
                else:
                    self._emit_all(self.turns.map(shift(item, offset)))
        except RelayError as exc:
            self.emit(exc)
