"""The per-connection consumer: the relay's stateful layer, one instance per WebSocket.

It accepts, validates, joins the session (row, then channel group, then history replay), feeds
audio to its engine stream, and forwards engine events: straight to its own socket, and through
the channel layer only when the session has other live connections. Protocol details live in
relay.flux.protocol, writes in relay.store.services, reads in relay.store.selectors.

Gap-free replay: the connection row is committed before the group is joined and history is read.
A finishing turn is committed before its sender counts the session's other connections, and is
group-sent only after that. So a joiner either is counted (and gets the turn live, or read back
if it joined the group late) or was not yet committed (and its history read sees the turn). Live
finals already replayed are dropped by index.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError, InterfaceError

from relay.live import auth, admission as load

from relay.ops import metrics

from relay.flux import protocol

from relay.store import selectors, services

from relay.server import shutdown
from relay.flux.audio import SampleAligner
from relay.engines import EngineStream, EngineWarning, TurnEvent, get_engine
from relay.exceptions import (
    BacklogExceeded,
    Capacity,
    ConfigureRejected,
    EngineError,
    FrameTooLarge,
    RateLimited,
    RelayError,
    StorageUnavailable,
    Unauthorized,
    UnsupportedEncoding,
)
from relay.live.limits import SlidingWindowLimiter

log = logging.getLogger("relay.consumer")

_heartbeat_task: asyncio.Task | None = None
#: Connection closes the database refused (outage past RELAY_DB_RETRY_SECONDS). The heartbeat
#: loop writes them once it can; until then those connections count as live for as long as this
#: process heartbeats.
_unrecorded_closes: dict[str, dict[str, Any]] = {}
_active_streams = 0
_connect_limiter: SlidingWindowLimiter | None = None


def active_streams() -> int:
    """Streams this process is serving now."""
    return _active_streams


def _connect_allowed(address: str) -> bool:
    global _connect_limiter
    limit = settings.RELAY_CONNECTS_PER_MINUTE
    if _connect_limiter is None or _connect_limiter.limit != limit:
        _connect_limiter = SlidingWindowLimiter(limit, 60.0)
    return _connect_limiter.hit(address)


async def _heartbeat_loop() -> None:
    while True:
        try:
            await services.aprocess_heartbeat()
            for connection_id, close in list(_unrecorded_closes.items()):
                await services.aconnection_flush(**close)
                _unrecorded_closes.pop(connection_id, None)
        except Exception:  # the database may be restarting; try again next beat
            log.warning("heartbeat_failed process=%s", services.process_id(), exc_info=True)
        await asyncio.sleep(settings.RELAY_HEARTBEAT_SECONDS)


def _ensure_heartbeat() -> None:
    global _heartbeat_task
    if _heartbeat_task is None or _heartbeat_task.done():
        _heartbeat_task = asyncio.get_running_loop().create_task(_heartbeat_loop())


async def _with_db_retry(what: str, call, /, **kwargs):
    """Run a database write, retrying while the database is unreachable (restart, failover).

    A finished turn must not be lost to a database blip: the engine's events wait meanwhile.
    Gives up after RELAY_DB_RETRY_SECONDS and re-raises.
    """
    delay = 0.1
    deadline = time.monotonic() + settings.RELAY_DB_RETRY_SECONDS
    while True:
        try:
            return await call(**kwargs)
        except (DatabaseError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("db_retry what=%s error=%s retry_in=%.1fs", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


_LAYER_FAILED = "relay.layer_failed"


class TranscriptionConsumer(AsyncWebsocketConsumer):
    """Flux v2 over a WebSocket, bound to one relay session."""

    async def __call__(self, scope, receive, send):
        """AsyncConsumer.__call__ with one task per connection instead of two per message.

        Channels' ``await_many_dispatch`` wraps every incoming message in a new task and an
        ``asyncio.wait`` over the socket and the channel layer. When ``receive`` is an
        ``asyncio.Queue.get`` (daphne's, and Channels' test communicator's), one forwarder task
        moves channel-layer messages into that same queue and the consumer just awaits
        ``receive()``: same handlers, still one at a time, about 8% less CPU per audio frame.
        """
        queue = getattr(receive, "__self__", None)
        if not isinstance(queue, asyncio.Queue):
            return await super().__call__(scope, receive, send)
        self.scope = scope
        self.base_send = send
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        forwarder = None
        if self.channel_layer is not None:
            self.channel_name = await self.channel_layer.new_channel()
            forwarder = asyncio.get_running_loop().create_task(self._forward_layer(queue))
        try:
            while True:
                message = await receive()
                if message["type"] == _LAYER_FAILED:
                    raise message["exc"]
                await self.dispatch(message)
        except StopConsumer:
            pass
        finally:
            if forwarder is not None:
                forwarder.cancel()  # the pub/sub layer unsubscribes the channel on cancel
                try:
                    await forwarder
                except BaseException:
                    pass

    async def _forward_layer(self, queue: asyncio.Queue) -> None:
        try:
            while True:
                queue.put_nowait(await self.channel_layer.receive(self.channel_name))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # fail the consumer with it, as Channels' loop would
            queue.put_nowait({"type": _LAYER_FAILED, "exc": exc})

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels awaits aclose_old_connections() (a thread hop) before every handler. Audio
        # frames and layer events never touch the ORM, and every ORM call here goes through
        # database_sync_to_async, which closes stale connections itself: skip the hop.
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # Per-connection state. Defaults live on the class, so an instance stores only what it
    # changed: a smaller instance dict for the thousands of mostly idle connections a process
    # holds (docs/benchmarks.md, idle memory).
    seq = 0
    request_id = ""
    connection_id = ""
    session_id = ""
    group = ""
    stream: EngineStream | None = None
    pump: asyncio.Task | None = None
    client_gone = False
    closing = False
    finished = True  # until websocket_connect runs
    close_code: int | None = None
    pump_error: RelayError | None = None
    audio_meter: metrics.AudioMeter | None = None
    close_reason = ""
    audio_bytes = 0
    messages_received = 0
    messages_sent = 0
    errors = 0
    last_error_code = ""
    peers: frozenset[str] | set[str] = frozenset()  # other live connections of the session
    replayed: frozenset[int] | set[int] = frozenset()  # turn indexes sent by replay
    engine_turn: int | None = None
    turn_index: int | None = None
    listener_update_at = float("-inf")
    held_update: tuple[str, int, float] | None = None
    held_timer: asyncio.TimerHandle | None = None
    fan_out_lock: asyncio.Lock | None = None
    counted = False
    configure_limiter: SlidingWindowLimiter | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def websocket_connect(self, message: dict[str, Any]) -> None:
        self.started = time.monotonic()
        self.finished = False
        self.max_frame = settings.RELAY_MAX_FRAME_BYTES
        self.max_backlog = settings.RELAY_MAX_BACKLOG_SECONDS
        protocols = self.scope.get("subprotocols") or []
        await self.accept(subprotocol="token" if protocols[:1] == ["token"] else None)
        try:
            await self._open()
        except RelayError as exc:
            await self._fatal(exc)
        except Exception:
            log.exception("connect_failed session=%s", self.session_id or "-")
            await self._fatal(RelayError())

    async def _open(self) -> None:
        global _active_streams
        client = self.scope.get("client") or ("", 0)
        if not _connect_allowed(str(client[0] or "")):
            raise RateLimited("Too many connection attempts from this address; try again in a minute.")
        params = protocol.parse_connect_params(self.scope.get("query_string", b""))
        user = await self._authenticate()
        if _active_streams >= settings.RELAY_MAX_STREAMS_PER_PROCESS:
            raise Capacity()
        busy = load.overloaded()
        if busy:
            raise Capacity(f"This relay process is overloaded ({busy}); try again later.")
        # Reserve the slot before the first await, or a burst of connects all pass the check.
        _active_streams += 1
        self.counted = True
        engine = get_engine()
        if params.options.encoding not in engine.supported_encodings():
            raise UnsupportedEncoding(f"The {engine.name} engine does not accept {params.options.encoding}.")
        self.options = params.options
        self.aligner = SampleAligner(params.options.sample_width)
        self.bytes_per_second = params.options.bytes_per_second
        headers = dict(self.scope.get("headers", []))
        opened = await services.aconnection_open(
            session_id=params.session_id,
            user=user,
            engine=engine.alias,
            since=params.since,
            client_addr=str(client[0] or ""),
            user_agent=headers.get(b"user-agent", b"").decode("latin-1"),
        )
        self.session_id = opened.session_id
        self.connection_id = self.request_id = opened.connection_id
        self.group = services.session_group_name(self.session_id)
        if opened.others:
            self.peers = set(opened.others)
        _ensure_heartbeat()

        # The stream opens before Connected so a full engine pool refuses the stream up front.
        self.stream = engine.open_stream(params.options)
        warnings = await self.stream.start()
        await self._send(
            protocol.connected_body(
                session_id=self.session_id, resumed=opened.resumed, connection_id=self.connection_id, engine=engine.alias
            )
        )
        metrics.connection_opened(resumed=opened.resumed, gap_seconds=opened.gap_seconds)
        self.audio_meter = metrics.AudioMeter(self.bytes_per_second)
        log.info(
            "client_connected session=%s connection=%s resumed=%s since=%s engine=%s client=%s",
            self.session_id, self.connection_id, opened.resumed, params.since, engine.alias, client[0],
        )
        if not await self._layer("group_add", self.group, self.channel_name):
            await self._send(protocol.warning_body("SHARING_UNAVAILABLE", "Live sharing with other tabs is unavailable right now; your own transcript is not affected."))
        await self._send(
            protocol.presence_body(
                event="join", connection_id=self.connection_id, connections=len(opened.others) + 1, session_id=self.session_id
            )
        )
        if opened.others:
            await self._layer(
                "group_send",
                self.group,
                {"type": "relay.presence", "event": "join", "connection_id": self.connection_id, "origin": self.channel_name},
            )
        if opened.resumed:
            await self._replay(params.since)
        for notice in params.notices:
            await self._send(protocol.warning_body(notice.code, notice.description))
        for warning in warnings:
            await self._send(protocol.warning_body(warning.code, warning.description))
        self.pump = asyncio.get_running_loop().create_task(self._pump_events())
        shutdown.register(self)

    async def _authenticate(self):
        """The Django user of the connection: from a login session or an API token."""
        user = self.scope.get("user")
        key = auth.key_from_scope(self.scope)
        if key is not None:
            token = await auth.atoken_authenticate(key=key)
            self.scope["relay_token"] = token.pk
            user = token.user or user
        elif settings.RELAY_REQUIRE_AUTH and not getattr(user, "is_authenticated", False):
            raise Unauthorized()
        return user

    async def _replay(self, since: int | None) -> None:
        after = since if since is not None else -1
        page_size = settings.RELAY_REPLAY_PAGE_SIZE
        count = 0
        last: int | None = None
        replayed = self.replayed = set()
        while True:
            page = await selectors.aturn_page(session_id=self.session_id, after_index=after, limit=page_size)
            for record in page:
                replayed.add(record["index"])
                await self._send(protocol.turn_info_from_record(record))
            count += len(page)
            if page:
                last = page[-1]["index"]
            if len(page) < page_size:
                break
            after = page[-1]["index"]
        await self._send(protocol.history_body(turns=count, last_turn_index=last, since=since))
        if count:
            log.info("history_replayed session=%s connection=%s turns=%d since=%s", self.session_id, self.connection_id, count, since)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        self.client_gone = True
        code = message.get("code", 1005)
        if self.close_code is None:
            self.close_code = code
            self.close_reason = "client closed" if code in (1000, 1001) else "connection lost"
        log.info(
            "client_disconnected session=%s connection=%s code=%s reason=%r duration=%.1fs",
            self.session_id or "-", self.connection_id or "-", code, self.close_reason, time.monotonic() - getattr(self, "started", time.monotonic()),
        )
        await self._finish(flush=True)
        raise StopConsumer()

    async def _finish(self, *, flush: bool, error: RelayError | None = None) -> None:
        """Flush the engine (finishing the open turn), send ``error``, record the close."""
        if getattr(self, "finished", True):
            return
        self.finished = True
        await self._drain(flush=flush)
        if error is None and self.pump_error is not None:
            error = self.pump_error
            self.errors += 1
            self.last_error_code = error.code
            self.close_code, self.close_reason = error.close_code, error.code
            metrics.error_sent(code=error.code)
        if error is not None:
            await self._send(protocol.error_body(error.code, error.description))
        await self._record_close()

    async def _drain(self, *, flush: bool) -> None:
        global _active_streams
        if self.counted:
            self.counted = False
            _active_streams -= 1
        stream, pump = self.stream, self.pump
        if stream is not None:
            try:
                if flush:
                    await asyncio.wait_for(stream.finish(), settings.RELAY_FLUSH_TIMEOUT_SECONDS)
                else:
                    await stream.abort()
                if pump is not None and flush and self.pump_error is not None and not isinstance(self.pump_error, StorageUnavailable):
                    # The pump died with the engine's event stream, but what finish() produced
                    # (the open turn's EndOfTurn) is queued: deliver and store it here.
                    await asyncio.wait_for(self._deliver_remaining(), settings.RELAY_FLUSH_TIMEOUT_SECONDS)
                elif pump is not None:
                    await asyncio.wait_for(asyncio.shield(pump), settings.RELAY_FLUSH_TIMEOUT_SECONDS)
            except (asyncio.TimeoutError, Exception):
                log.warning("flush_incomplete session=%s connection=%s", self.session_id, self.connection_id, exc_info=True)
                await stream.abort()
                if pump is not None:
                    pump.cancel()

    async def _deliver_remaining(self) -> None:
        assert self.stream is not None
        async for item in self.stream.events():
            if not isinstance(item, EngineWarning):
                await self._on_turn_event(item)

    async def _record_close(self) -> None:
        if self.held_timer is not None:
            self.held_timer.cancel()
            self.held_timer = None
        if not self.connection_id:
            return
        metrics.connection_closed(code=self.close_code, duration_seconds=time.monotonic() - self.started)
        if self.audio_meter is not None:
            self.audio_meter.report(self.audio_bytes)
        close = dict(
            connection_id=self.connection_id,
            session_id=self.session_id,
            closed=True,
            close_code=self.close_code,
            close_reason=self.close_reason,
            **self._counters(),
        )
        try:
            await _with_db_retry("connection_close", services.aconnection_flush, **close)
        except Exception:
            log.exception("close_not_recorded session=%s connection=%s", self.session_id, self.connection_id)
            _unrecorded_closes[self.connection_id] = close
        if self.group:
            await self._layer("group_discard", self.group, self.channel_name)
            if self.peers:
                await self._layer(
                    "group_send",
                    self.group,
                    {"type": "relay.presence", "event": "leave", "connection_id": self.connection_id, "origin": self.channel_name},
                )

    def _counters(self) -> dict[str, Any]:
        return {
            "audio_bytes": self.audio_bytes,
            "audio_seconds": self.audio_bytes / self.bytes_per_second if getattr(self, "bytes_per_second", 0) else 0.0,
            "messages_received": self.messages_received,
            "messages_sent": self.messages_sent,
            "errors": self.errors,
            "last_error_code": self.last_error_code,
        }

    async def _fatal(self, exc: RelayError) -> None:
        """Send Error, persist what is finished, close with the error's code."""
        if self.closing:
            return
        self.closing = True
        self.errors += 1
        metrics.error_sent(code=exc.code)
        self.last_error_code = exc.code
        self.close_code, self.close_reason = exc.close_code, exc.code
        log.warning("stream_error session=%s connection=%s code=%s description=%r", self.session_id or "-", self.connection_id or "-", exc.code, exc.description)
        await self._finish(flush=True, error=exc)
        if not self.client_gone:
            await self.close(code=exc.close_code, reason=exc.code)

    # -- client -> relay ------------------------------------------------------------------------
    async def websocket_receive(self, message: dict[str, Any]) -> None:
        data = message.get("bytes")
        if data is not None:
            size = len(data)
            if not size or self.closing or self.stream is None:
                return
            if size > self.max_frame:
                await self._fatal(FrameTooLarge(f"Frames may be at most {self.max_frame} bytes; got {size}."))
                return
            self.messages_received += 1
            self.audio_bytes += size
            pcm = self.aligner.push(data)
            try:
                if pcm:
                    self.stream.feed(pcm)
            except RelayError as exc:
                await self._fatal(exc)
                return
            except Exception:
                log.exception("engine_feed_failed session=%s connection=%s", self.session_id, self.connection_id)
                await self._fatal(EngineError())
                return
            if self.stream.backlog_seconds > self.max_backlog:
                await self._fatal(BacklogExceeded())
            return
        text = message.get("text")
        if text is None or self.closing or self.stream is None:
            return
        self.messages_received += 1
        if len(text) > self.max_frame:
            await self._fatal(FrameTooLarge(f"Frames may be at most {self.max_frame} bytes."))
            return
        try:
            msg = protocol.parse_client_text(text)
        except protocol.BadClientMessage as exc:
            await self._send(protocol.warning_body(exc.code, exc.description))
            return
        try:
            await self._on_control(msg)
        except RelayError as exc:
            await self._fatal(exc)
        except Exception:
            log.exception("control_failed session=%s connection=%s type=%s", self.session_id, self.connection_id, msg.type)
            await self._fatal(EngineError())

    async def _on_control(self, msg: protocol.ClientMessage) -> None:
        assert self.stream is not None
        if msg.type == "KeepAlive":
            return
        if msg.type == "ForceEndTurn":
            await self.stream.force_end_turn()
        elif msg.type == "Configure":
            if self.configure_limiter is None:
                self.configure_limiter = SlidingWindowLimiter(settings.RELAY_CONFIGURES_PER_MINUTE, 60.0)
            if not self.configure_limiter.hit("configure"):
                raise RateLimited("Too many Configure messages; at most %d a minute." % self.configure_limiter.limit)
            try:
                thresholds, keyterms = protocol.parse_configure(msg.data, self.options)
                warnings = await self.stream.configure(thresholds, keyterms)
            except ConfigureRejected as exc:
                await self._send(protocol.configure_failure_body(exc.code, exc.description))
                return
            await self._send(protocol.configure_success_body(self.stream.options))
            for warning in warnings:
                await self._send(protocol.warning_body(warning.code, warning.description))
        elif msg.type == "CloseStream":
            self.closing = True
            self.close_code, self.close_reason = 1000, "CloseStream"
            log.info("close_stream session=%s connection=%s", self.session_id, self.connection_id)
            await self._finish(flush=True)
            await self.close(code=self.close_code or 1000)

    # -- engine -> clients ----------------------------------------------------------------------
    async def _pump_events(self) -> None:
        assert self.stream is not None
        try:
            async for item in self.stream.events():
                if isinstance(item, EngineWarning):
                    await self._send(protocol.warning_body(item.code, item.description))
                else:
                    await self._on_turn_event(item)
        except asyncio.CancelledError:
            raise
        except RelayError as exc:
            self._pump_failed(exc)
        except (DatabaseError, InterfaceError):
            log.exception("storage_failed session=%s connection=%s", self.session_id, self.connection_id)
            self._pump_failed(StorageUnavailable())
        except Exception:
            log.exception("engine_failed session=%s connection=%s", self.session_id, self.connection_id)
            self._pump_failed(EngineError())

    def _pump_failed(self, exc: RelayError) -> None:
        """The engine stream died: end the connection with its error.

        During a flush (CloseStream, disconnect) _finish is already running; it picks the error
        up from ``pump_error`` so the client still gets the Error before the close.
        """
        self.pump_error = exc
        if not self.finished:
            asyncio.get_running_loop().create_task(self._fatal(exc))

    async def _on_turn_event(self, event: TurnEvent) -> None:
        if event.turn != self.engine_turn or self.turn_index is None:
            self.engine_turn = event.turn
            self.turn_index = await _with_db_retry("turn_index", services.aturn_index_allocate, session_id=self.session_id)
        index = self.turn_index
        body = protocol.turn_info_body(event, turn_index=index, speaker=self.connection_id)
        final = event.event == "EndOfTurn"
        fan_out = bool(self.peers)
        if fan_out and event.event == "Update":
            # Listening tabs get at most one interim Update per RELAY_LISTENER_UPDATE_SECONDS of
            # audio. Each carries the whole turn so far, so one held back loses nothing: the next
            # Update or the turn's end supersedes it, or it goes out when that interval has passed
            # in wall time (a speaker who pauses mid-turn), so listeners never stay behind.
            if event.audio_window_end - self.listener_update_at < settings.RELAY_LISTENER_UPDATE_SECONDS:
                self._hold_listener_update(body, index, event.audio_window_end)
                fan_out = False
            else:
                self.listener_update_at = event.audio_window_end
                self.held_update = None
        elif event.event != "Update":
            self.listener_update_at = float("-inf")
            self.held_update = None
        if final:
            # Committed before anyone hears of it, the speaker included: an EndOfTurn is the
            # client's receipt (a re-sending client drops the audio it covers), and other tabs
            # rely on it for gap-free replay. The write is retried through database blips.
            others = await _with_db_retry(
                "turn_record",
                services.aturn_record,
                session_id=self.session_id, connection_id=self.connection_id, index=index, event=event,
                timed=not self.finished,  # a closing stream's flush is not load on the open ones
            )
            fan_out = fan_out or others > 0
            metrics.turn_finished(trigger=event.trigger)
            self.audio_meter.report(self.audio_bytes)
            self.turn_index = None
            self.engine_turn = None
            log.info(
                "turn_finished session=%s connection=%s turn_index=%d trigger=%s words=%d",
                self.session_id, self.connection_id, index, event.trigger, len(event.words),
            )
        await self._send(body)
        if fan_out:
            async with self._fan_out_lock():
                await self._send_to_others(body, index, final)

    async def _send_to_others(self, body: str, index: int, final: bool) -> None:
        await self._layer(
            "group_send",
            self.group,
            {"type": "relay.event", "origin": self.channel_name, "body": body, "turn_index": index, "final": final},
        )

    def _fan_out_lock(self) -> asyncio.Lock:
        """Keeps this connection's group_sends in order (a held Update goes out from a timer)."""
        if self.fan_out_lock is None:
            self.fan_out_lock = asyncio.Lock()
        return self.fan_out_lock

    def _hold_listener_update(self, body: str, index: int, audio_end: float) -> None:
        self.held_update = (body, index, audio_end)
        if self.held_timer is None:
            self.held_timer = asyncio.get_running_loop().call_later(settings.RELAY_LISTENER_UPDATE_SECONDS, self._held_timer_fired)

    def _held_timer_fired(self) -> None:
        self.held_timer = None
        self.release_task = asyncio.ensure_future(self._release_held_update())  # keep a reference

    async def _release_held_update(self) -> None:
        async with self._fan_out_lock():
            held, self.held_update = self.held_update, None
            if held is None:  # superseded meanwhile
                return
            body, index, audio_end = held
            self.listener_update_at = audio_end
            await self._send_to_others(body, index, final=False)

    async def _layer(self, method: str, *args: Any) -> bool:
        """A channel-layer call that never takes the stream down (Redis restarting, say).

        Other tabs may then miss live events; they get finished turns back by replay.
        """
        try:
            await getattr(self.channel_layer, method)(*args)
            return True
        except Exception as exc:
            log.warning("layer_failed method=%s session=%s connection=%s error=%r", method, self.session_id, self.connection_id, exc)
            return False

    async def _send(self, body_json: str) -> None:
        if self.client_gone:
            return
        text = protocol.stamp(body_json, sequence_id=self.seq, request_id=self.request_id)
        self.seq += 1
        self.messages_sent += 1
        await self.base_send({"type": "websocket.send", "text": text})

    # -- channel layer events -------------------------------------------------------------------
    async def relay_event(self, event: dict[str, Any]) -> None:
        if event["origin"] == self.channel_name:
            return
        if event["final"] and event["turn_index"] in self.replayed:
            return
        await self._send(event["body"])

    async def relay_presence(self, event: dict[str, Any]) -> None:
        if event["origin"] == self.channel_name:
            return
        if event["event"] == "join":
            self.peers = {*self.peers, event["connection_id"]}
        else:
            self.peers = set(self.peers) - {event["connection_id"]}
        if self.client_gone or self.closing:
            return
        try:
            count = await selectors.asession_live_connection_count(session_id=self.session_id)
        except DatabaseError:
            count = len(self.peers) + 1
        await self._send(
            protocol.presence_body(
                event=event["event"], connection_id=event["connection_id"], connections=count, session_id=self.session_id
            )
        )

    async def session_end(self, event: dict[str, Any]) -> None:
        from relay.exceptions import SessionEnded

        await self._fatal(SessionEnded(f"This session was ended: {event.get('reason') or 'by an operator'}."))
