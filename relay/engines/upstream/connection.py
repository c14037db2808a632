"""One upstream WebSocket: how it is opened, the loops that run it, and how it can fail.

:class:`LinkedStream` holds the work done on one connection (:class:`Link`): write audio and
control messages, read replies into turn events, watch for stalls. It ends by returning the link
after a clean close or by raising :class:`Stalled`, :class:`Dropped` or
:class:`~relay.exceptions.UpstreamAuthFailed`;
:class:`~relay.engines.upstream.stream.UpstreamStream` (its subclass) runs one link after another
and decides from those whether to reconnect, fall back or give up.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.exceptions import UpstreamAuthFailed
from relay.flux.constants import DEFAULT_EOT_THRESHOLD
from relay.ops.logs import get_logger

from relay.engines.base import EngineStream, EngineWarning, StreamOptions, TurnEvent

from .flux_client import (
    AUTH_CLOSE_CODES,
    AUTH_ERROR_CODES,
    CLOSE_STREAM,
    KEEPALIVE,
    TURN_LEAD_SECONDS,
    UNANSWERED_SLACK_SECONDS,
    BadUpstreamMessage,
    ServerMessage,
    TurnMapper,
    configure_message,
    parse_server_message,
    shift,
)
from .replay import AudioLog, Framer, PageNumbers, Unit, page_numbers_for

if TYPE_CHECKING:
    from .engine import UpstreamConfig, UpstreamEngine

log = get_logger("relay.upstream")

#: The websockets library logs every handshake header at DEBUG, Authorization included. Its
#: connections get this logger, which never goes below INFO whatever RELAY_LOG_LEVEL says.
wire_log = logging.getLogger("relay.upstream.wire")
wire_log.setLevel(logging.INFO)


class Stalled(Exception):
    """The upstream stopped answering."""


class Dropped(Exception):
    """The upstream connection ended under us."""


class Rejected(Exception):
    """The upstream refused the request for good (a 4xx other than auth, timeout, rate limit)."""


@dataclass(eq=False)
class Link:
    """One upstream connection and what it has and has not answered for."""

    ws: ClientConnection
    start: int  # absolute position (AudioLog ticks) of the first audio sent on it
    offset: float  # the same in seconds
    opened_at: float
    sent: int = 0
    processed: int = 0  # absolute end of the last audio window it reported
    pages: PageNumbers | None = None  # ogg-opus: its own page numbering
    up_open: bool = False  # it reported a turn that has not ended
    audio_since_message: bool = False
    clock: float | None = None  # since when it owes an answer
    probe_at: float | None = None
    probe_pos: int = 0
    answered: bool = False  # it sent a TurnInfo or a Configure reply
    close_sent: bool = False
    last_send: float = 0.0
    request_id: str = ""
    configures: deque[tuple[asyncio.Future, bool]] = field(default_factory=deque)


async def open_connection(url: str, *, authorization: str, config: UpstreamConfig) -> ClientConnection:
    """Connect to the upstream; a refusal that retrying cannot fix raises at once.

    401/403 raise :class:`~relay.exceptions.UpstreamAuthFailed`; other 4xx except 408 and 429
    raise :class:`Rejected`. Everything else (network errors, timeouts, 5xx) is the caller's to
    retry.
    """
    try:
        return await connect(
            url,
            additional_headers={"Authorization": authorization},
            open_timeout=config.connect_timeout,
            ping_interval=config.keepalive_seconds,
            ping_timeout=config.stall_seconds,
            close_timeout=1.0,
            max_size=2**22,
            compression=None,
            logger=wire_log,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise UpstreamAuthFailed(f"The upstream speech service rejected the relay's credentials (HTTP {status}).") from None
        if 400 <= status < 500 and status not in (408, 429):
            raise Rejected(status) from None
        raise


class LinkedStream(EngineStream):
    """The per-connection half of :class:`~relay.engines.upstream.stream.UpstreamStream`.

    The subclass builds the state below and the outbox the writer drains; these methods run one
    :class:`Link` and keep the replay log and turn numbering up to date from its replies.
    """

    engine: UpstreamEngine
    options: StreamOptions
    config: UpstreamConfig
    framer: Framer
    tps: int  # AudioLog ticks per second
    log: AudioLog
    turns: TurnMapper
    _outbox: deque[Unit | str]
    _outbox_ticks: int
    _wake: asyncio.Event
    _link: Link | None
    _last_link: Link | None
    _started: asyncio.Future | None  # start() waits on it until the first link hears the upstream
    _finishing: bool
    _force_pos: int | None
    _loud_end: int
    _closing: set[asyncio.Task]

    # -- helpers ----------------------------------------------------------------------------------
    def _pos(self, link: Link, seconds: float) -> int:
        return link.start + self.framer.ticks(seconds)

    def _send_text(self, text: str) -> None:
        self._outbox.append(text)
        self._wake.set()

    def _emit_all(self, events: list[TurnEvent]) -> None:
        for event in events:
            self.emit(event)

    def _end_open_turn(self, trigger: str, *, at: int) -> None:
        self._emit_all(self.turns.close(trigger))
        self._force_pos = None
        self.log.commit(at)

    def _owes_answer(self, link: Link) -> bool:
        """Audio the upstream should have answered: more audio in an open turn (Flux sends an
        Update about every 0.25 s), or speech-loud audio past its last reported window."""
        slack = self.framer.ticks(UNANSWERED_SLACK_SECONDS)
        return (link.up_open and link.audio_since_message) or min(self._loud_end, link.sent) - link.processed > slack

    def _warn(self, code: str, description: str) -> None:
        self.emit(EngineWarning(code, description))

    # -- one connection ---------------------------------------------------------------------------
    async def _serve(self, ws: ClientConnection) -> Link:
        """Relay over one connection until it closes after CloseStream (returned) or fails (raised)."""
        loop = asyncio.get_running_loop()
        link = self._begin(ws)
        tasks = [
            loop.create_task(self._read(link)),
            loop.create_task(self._write(link)),
            loop.create_task(self._watch(link)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            self._link = None
            self._outbox.clear()
            self._outbox_ticks = 0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for reply, _probe in link.configures:
                if not reply.done():
                    reply.set_result(None)  # the next connection carries the values in its query
            if ws.state.name != "CLOSED":
                closing = loop.create_task(ws.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    def _begin(self, ws: ClientConnection) -> Link:
        """A new connection's link, its outbox loaded with what it must hear first."""
        now = asyncio.get_running_loop().time()
        if self._force_pos is not None and self.turns.open:
            # A ForceEndTurn the last connection never answered: honour it before replaying.
            self._end_open_turn("manual", at=self._force_pos)
        link = Link(ws=ws, start=self.log.base, offset=self.log.base / self.tps, opened_at=now, pages=page_numbers_for(self.options))
        link.sent = link.processed = link.start
        link.last_send = now
        self._last_link = link
        # Ogg's header pages open every connection; then the audio not answered for, whole units.
        self._outbox = deque([Unit(page, 0, header=True) for page in self.framer.header] + self.log.units())
        self._outbox_ticks = self.log.size
        self.turns.new_source()
        self._link = link
        return link

    async def _read(self, link: Link) -> Link:
        loop = asyncio.get_running_loop()
        try:
            async for raw in link.ws:
                if isinstance(raw, bytes):
                    continue
                try:
                    msg = parse_server_message(raw)
                except BadUpstreamMessage as exc:
                    log.warning("upstream_bad_message", engine=self.engine.alias, reason=str(exc), chars=len(raw))
                else:
                    self._on_message(link, msg)
                if self._started is not None and not self._started.done():
                    self._started.set_result(None)  # it spoke (Connected) rather than refuse: started
                link.audio_since_message = False
                link.clock = loop.time() if self._owes_answer(link) else None
        except ConnectionClosed:
            pass  # a close without a clean handshake: judged below like any other
        code = link.ws.close_code
        if code in AUTH_CLOSE_CODES:
            raise UpstreamAuthFailed()
        if not link.close_sent or code not in (1000, 1001):
            raise Dropped(f"closed by the upstream ({code})")
        return link

    def _on_message(self, link: Link, msg: ServerMessage) -> None:
        if msg.event is not None:
            self._on_turn_info(link, msg.event)
        elif msg.type in ("ConfigureSuccess", "ConfigureFailure"):
            link.answered = True
            if link.configures:
                reply, probe = link.configures.popleft()
                if probe:
                    link.probe_at = None
                    link.processed = max(link.processed, link.probe_pos)
                elif not reply.done():
                    reply.set_result(None if msg.type == "ConfigureSuccess" else str(msg.data.get("description") or "The upstream refused the configuration."))
        elif msg.type == "Connected":
            link.request_id = str(msg.data.get("request_id", ""))[:64]
        elif msg.type == "Warning":
            code, description = msg.data.get("code"), msg.data.get("description")
            if isinstance(code, str) and isinstance(description, str):
                self._warn(code[:64], description[:500])
        elif msg.type == "Error":
            code = str(msg.data.get("code", ""))[:64]
            log.warning("upstream_error", engine=self.engine.alias, code=code)
            if code in AUTH_ERROR_CODES:
                raise UpstreamAuthFailed()
            raise Dropped(f"upstream error {code}")

    def _on_turn_info(self, link: Link, event: TurnEvent) -> None:
        link.answered = True
        link.probe_at = None  # it is transcribing: alive
        end = self._pos(link, event.audio_window_end)
        link.processed = max(link.processed, end)
        link.up_open = event.event != "EndOfTurn"
        was_open = self.turns.open
        trigger = "manual" if self._force_pos is not None else "model"
        self._emit_all(self.turns.map(shift(event, link.offset), skipped_trigger=trigger))
        if not was_open and self.turns.open:
            lead = self.framer.ticks(TURN_LEAD_SECONDS)
            self.log.commit(self._pos(link, event.audio_window_start) - lead)
        if event.event == "EndOfTurn":
            self._force_pos = None
            self.log.commit(end)

    async def _write(self, link: Link) -> None:
        try:
            await self._write_loop(link)
        except ConnectionClosed:
            raise Dropped("send failed: the connection is closed") from None

    async def _write_loop(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        ws = link.ws
        while True:
            self._wake.clear()
            while self._outbox:
                item = self._outbox.popleft()
                if isinstance(item, str):
                    await ws.send(item)
                else:
                    self._outbox_ticks -= item.ticks
                    await ws.send(item.data if link.pages is None else link.pages(item.data))
                    link.sent += item.ticks
                    link.audio_since_message = True
                    if link.clock is None and self._owes_answer(link):
                        link.clock = loop.time()
                link.last_send = loop.time()
            if self._finishing and not link.close_sent:
                await ws.send(CLOSE_STREAM)
                link.close_sent = True
            idle = loop.time() - link.last_send
            try:
                # Not wait_for: on 3.11 it drops a cancel that lands as the wake-up does, and the
                # writer then sleeps until the keepalive while _serve waits for it to end.
                async with asyncio.timeout(max(self.config.keepalive_seconds - idle, 0.001)):
                    await self._wake.wait()
            except TimeoutError:
                if not link.close_sent:
                    # The client is silent: keep the upstream from closing an idle connection.
                    await ws.send(KEEPALIVE)
                    link.last_send = loop.time()

    async def _watch(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        stall = self.config.stall_seconds
        while True:
            await asyncio.sleep(stall / 5)
            now = loop.time()
            if link.probe_at is not None:
                if now - link.probe_at >= stall:
                    raise Stalled("no answer to a liveness probe")
                continue
            if link.clock is None or now - link.clock < stall:
                continue
            if link.up_open:
                raise Stalled(f"no update for {now - link.clock:.1f} s inside a turn")
            # Loud audio and no turn: stalled, or the upstream heard noise rather than speech. A
            # Configure that changes nothing must be answered by a live upstream: ask.
            eot = self.options.eot_threshold if self.options.eot_threshold is not None else DEFAULT_EOT_THRESHOLD
            reply: asyncio.Future = loop.create_future()
            link.configures.append((reply, True))
            link.probe_at, link.probe_pos = now, link.sent
            self._send_text(configure_message({"eot_threshold": eot}))
