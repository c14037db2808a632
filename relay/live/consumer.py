"""The WebSocket side of a stream: accept, authenticate, admit, then carry out what the core says.

Every protocol and ordering rule lives in :class:`relay.live.session.StreamSession`; this class
does the I/O it asks for (socket, engine, store, channel layer, timers) and feeds the results
back. The order of the set-up is what makes replay gap-free: the connection row is committed
before the group is joined and history is read, so a turn that finishes meanwhile is either
counted by its store (and sent to this tab live) or read back by the replay.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import timedelta
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError, InterfaceError
from django.utils import timezone

from relay.engines import EngineStream, EngineWarning, get_engine
from relay.exceptions import ConfigureRejected, RelayError, SessionEnded, UnsupportedEncoding
from relay.flux import protocol
from relay.live import admission, auth, heartbeat, layer_health, registry
from relay.live import session as core
from relay.live.engine_link import EngineLink
from relay.ops import metrics
from relay.ops.logs import get_logger
from relay.server.consumer_loop import SingleTaskLoop
from relay.api import usage
from relay.store import access, selectors, services
from relay.store.retry import with_db_retry

log = get_logger("relay.consumer")


class TranscriptionConsumer(SingleTaskLoop, AsyncWebsocketConsumer):
    """Flux v2 over a WebSocket, bound to one relay session."""

    # Defaults on the class: an idle connection's instance stores only what it changed.
    session: core.StreamSession | None = None
    stream: EngineStream | None = None
    engine: EngineLink | None = None
    finished = True  # until websocket_connect runs
    admitted = False
    accepted = False  # the handshake: refusals before it may be HTTP responses (auth.handshake_refusal)
    group = ""
    audio_meter: metrics.AudioMeter | None = None
    timer: asyncio.TimerHandle | None = None
    layer_lock: asyncio.Lock | None = None
    forced_at: float | None = None  # a ForceEndTurn waiting for its EndOfTurn (relay_force_end_turn_latency_seconds)
    log = log  # bound to the session and connection once they are known

    @property
    def closing(self) -> bool:
        return self.session is None or self.session.closing

    # -- set-up --------------------------------------------------------------------------------
    async def websocket_connect(self, message: dict[str, Any]) -> None:
        self.started = time.monotonic()
        self.finished = False
        self.session = core.StreamSession.from_settings(settings, channel_name=getattr(self, "channel_name", ""))
        try:
            await self._open()
        except RelayError as exc:
            await self.end_stream(exc)
        except Exception:
            self.log.exception("connect_failed")
            await self.end_stream(RelayError())

    async def _open(self) -> None:
        client = str((self.scope.get("client") or ("", 0))[0] or "")
        admission.check_rate(client)
        params = protocol.parse_connect_params(self.scope.get("query_string", b""))
        self.session.use_options(params.options, params.relay_events)
        credentials = await auth.authenticate(self.scope, share=params.share is not None)
        await self._accept()  # not before: a refusal until here may be an HTTP status instead (auth.handshake_refusal)
        if credentials.ignored_key:  # never the key itself in the log
            self.log.info("unknown_credentials_ignored", client=client)
            params.notices.append(protocol.Notice(auth.UNKNOWN_CREDENTIALS_IGNORED, "The relay does not know the API key this client sent and serves it without one (RELAY_REQUIRE_AUTH is off)."))
        # The role first (relay.store.access): a stranger is refused before using anything, and a
        # viewer gets no engine stream.
        admitted = await access.aconnect_access(user=credentials.user, session_id=params.session_id, share=params.share, wants=params.role,
                                                previous=params.previous_connection, client_addr=client)
        admission.admit()
        self.admitted = True
        engine = get_engine()
        if params.options.encoding not in engine.supported_encodings():
            raise UnsupportedEncoding(f"The {engine.name} engine does not accept {params.options.encoding}.")
        # The engine stream starts first: a full engine pool or a refused upstream key refuses the
        # attempt before it becomes a connection (Error, and no Connected).
        warnings: list[EngineWarning] = []
        if admitted.may_speak:
            self.stream = engine.open_stream(params.options)
            self.engine = EngineLink(self.stream, deliver=self._deliver, failed=self._engine_failed, log=self.log)
            warnings = await self.stream.start()
        headers = dict(self.scope.get("headers", []))
        opened = await services.aconnection_open(
            session_id=params.session_id, user=credentials.user, engine=engine.alias, since=params.since,
            client_addr=client, user_agent=headers.get(b"user-agent", b"").decode("latin-1"), previous=params.previous_connection,
            admitted=admitted,
        )
        self.log = log.bind(session=opened.session_id, connection=opened.connection_id)
        self.group = services.session_group_name(opened.session_id)
        heartbeat.ensure_running()
        s = self.session
        await self._run(s.opened(session_id=opened.session_id, connection_id=opened.connection_id, others=opened.others, resumed=opened.resumed, engine=engine.alias, since=params.since,
                                 role=opened.role, speaker_name=opened.speaker_name))
        metrics.connection_opened(resumed=opened.resumed)
        self.audio_meter = metrics.AudioMeter(s.bytes_per_second)
        self.log.info("client_connected", resumed=opened.resumed, since=params.since, engine=engine.alias, client=client)
        await self._run(s.joined(sharing=await self._layer("group_add", self.group, self.channel_name)))
        if opened.resumed:
            await self._replay(params.since)
        await self._run(s.ready([*params.notices, *warnings]))
        if self.engine is not None:
            self.engine.log = self.log
            self.engine.start_pump()
        registry.register(self)
        usage.connection_opened(connection_id=opened.connection_id, credentials=credentials)  # API-token connections only; not awaited

    async def _replay(self, since: int | None) -> None:
        s = self.session
        count, last, started = 0, None, time.monotonic()
        async for page in selectors.aturn_pages(session_id=s.session_id, after_index=since if since is not None else -1, page_size=settings.RELAY_REPLAY_PAGE_SIZE):
            await self._run(s.replay_page(page))
            if not count:
                metrics.replay_first_turn(time.monotonic() - started)
            count += len(page)
            last = page[-1]["index"]
        await self._run(s.replay_done(turns=count, last_turn_index=last, since=since))
        if count:
            self.log.info("history_replayed", turns=count, since=since)

    # -- client -> relay -----------------------------------------------------------------------
    async def websocket_receive(self, message: dict[str, Any]) -> None:
        data, text = message.get("bytes"), message.get("text")
        actions = self.session.receive_bytes(data) if data is not None else self.session.receive_text(text) if text is not None else ()
        if actions:
            await self._run(actions)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        code = message.get("code", 1005)
        if self.session is not None:
            self.session.client_disconnected(code)
            self.log.info("client_disconnected", code=code, reason=self.session.close_reason, duration=f"{time.monotonic() - self.started:.1f}s")
            await self._finish()
        raise StopConsumer()

    # -- carrying out actions ------------------------------------------------------------------
    async def _run(self, actions: Any) -> None:
        for action in actions:
            await _PERFORM[type(action)](self, action)  # _send_client for SendClient, ...

    async def _send_client(self, action: core.SendClient) -> None:
        try:
            await self.base_send({"type": "websocket.send", "text": action.text})
        except Exception as exc:  # the client went away under us (daphne: autobahn Disconnected)
            if not self.session.client_gone:
                self.session.client_disconnected(1006)
                self.log.info("client_gone", error=type(exc).__name__)

    async def _send_group(self, action: core.SendGroup) -> None:
        if self.layer_lock is None:  # keeps this connection's group sends in order
            self.layer_lock = asyncio.Lock()
        async with self.layer_lock:
            await self._layer("group_send", self.group, action.message)

    async def _feed_audio(self, action: core.FeedAudio) -> None:
        error = self.engine.feed(action.pcm) or getattr(self.session.backlog(self.stream.backlog_seconds), "error", None)
        if error is not None:
            await self.end_stream(error)

    async def _allocate_turn_index(self, action: core.AllocateTurnIndex) -> None:
        index = await with_db_retry("turn_index", services.aturn_index_allocate, session_id=self.session.session_id)
        await self._run(self.session.turn_index_allocated(index))

    async def _store_turn(self, action: core.StoreTurn) -> None:
        s = self.session
        others = await with_db_retry("turn_record", services.aturn_record, session_id=s.session_id, connection_id=s.connection_id,
                                     index=action.index, event=action.event, timed=action.timed)
        finished, actions = s.turn_stored(others)
        metrics.turn_finished(trigger=finished.event.trigger)
        self.audio_meter.report(s.audio_bytes)
        self.log.info("turn_finished", turn_index=finished.index, trigger=finished.event.trigger, words=len(finished.event.words))
        await self._run(actions)
        self.forced_at = metrics.end_of_turn_sent(self.stream.engine.alias, finished.event, self.forced_at)

    async def _read_turns(self, action: core.ReadTurns) -> None:
        s = self.session
        records: list[dict[str, Any]] = []
        try:  # page by page: a gap can be longer than one page (a long layer outage)
            after, size = action.after, settings.RELAY_REPLAY_PAGE_SIZE
            while page := await selectors.aturns_between(session_id=s.session_id, after_index=after, before_index=action.before, limit=size):
                records += page
                if len(page) < size:
                    break
                after = page[-1]["index"]
        except (DatabaseError, InterfaceError) as exc:  # the live final still goes out; a resync retries
            self.log.warning("gap_repair_failed", error=type(exc).__name__)
            records = []  # none sent rather than part: the ledger then still sees the whole gap
        if records:
            self.log.info("gap_repaired", after=action.after, before=action.before, turns=len(records))
        await self._run(s.turns_read(action, records))

    async def _join_group(self, action: core.JoinGroup) -> None:
        self.session.rejoined(await self._layer("group_add", self.group, self.channel_name))

    def layer_changed(self, up: bool) -> None:
        """The process's channel layer went down or came back (relay.live.layer_health)."""
        actions = self.session.layer_up() if up else self.session.layer_down()
        if actions:
            _spawn(self._run(actions))

    async def _start_timer(self, action: core.StartTimer) -> None:
        self.timer = asyncio.get_running_loop().call_later(action.delay, self._timer_fired, action.name)

    def _timer_fired(self, name: str) -> None:
        self.timer = None
        actions = self.session.timer_fired(name)  # decided now; sent in order behind earlier sends
        if actions:
            _spawn(self._run(actions))

    async def _count_presence(self, action: core.CountPresence) -> None:
        try:
            count = await selectors.asession_live_connection_count(session_id=self.session.session_id)
        except DatabaseError:
            count = None
        await self._run(self.session.presence_counted(action.event, action.connection_id, count))

    async def _force_end_turn(self, action: core.ForceEndTurn) -> None:
        self.forced_at = time.monotonic()
        if error := await self.engine.control(self.stream.force_end_turn()):
            await self.end_stream(error)

    async def _configure(self, action: core.Configure) -> None:
        async def configure() -> None:
            try:
                hints = {} if action.language_hints is None else {"language_hints": action.language_hints}
                warnings = await self.stream.configure(action.thresholds, action.keyterms, **hints)
            except ConfigureRejected as exc:
                return await self._run(self.session.configure_rejected(exc))
            await self._run(self.session.configured(self.stream.options, warnings))

        if error := await self.engine.control(configure()):
            await self.end_stream(error)

    async def _close_stream(self, action: core.CloseStream) -> None:
        self.log.info("close_stream")
        await self._finish()
        await self.close(code=self.session.close_code or 1000)

    async def _fail(self, action: core.Fail) -> None:
        await self.end_stream(action.error)

    # -- engine -> clients ---------------------------------------------------------------------
    async def _deliver(self, item: Any) -> None:
        await self._run(self.session.engine_warning(item) if isinstance(item, EngineWarning) else self.session.engine_event(item))

    def _engine_failed(self, error: RelayError) -> None:
        """During a flush, :meth:`_finish` picks the error up; otherwise the stream ends with it."""
        self.session.engine_failed(error)
        if not self.finished:
            _spawn(self.end_stream(error))

    # -- other tabs -> this one ----------------------------------------------------------------
    async def relay_event(self, message: dict[str, Any]) -> None:
        await self._run(self.session.layer_event(message))

    async def relay_presence(self, message: dict[str, Any]) -> None:
        await self._run(self.session.layer_presence(message))

    async def session_end(self, message: dict[str, Any]) -> None:
        await self.end_stream(SessionEnded(f"This session was ended: {message.get('reason') or 'by an operator'}."))

    # -- ending --------------------------------------------------------------------------------
    async def end_stream(self, error: RelayError) -> None:
        """End the stream with ``error``: store what is finished, send Error, close with its code."""
        s = self.session
        if s is None or not s.fail(error):
            return
        metrics.error_sent(code=error.code)
        if not s.connection_id:  # refused before it became a connection: an attempt, counted apart
            heartbeat.note_refusal(error.code)
        if not self.accepted and (refusal := auth.handshake_refusal(self.scope, error)):
            return await self._deny(error, *refusal)
        self.log.warning("stream_error", code=error.code, description=error.description)
        await self._accept()
        await self._finish(error)
        if not s.client_gone:
            await self.close(code=error.close_code, reason=error.code)

    async def _accept(self) -> None:
        if not self.accepted:
            self.accepted = True
            protocols = self.scope.get("subprotocols") or []
            await self.accept(subprotocol="token" if protocols[:1] == ["token"] else None)

    async def _deny(self, error: RelayError, status: int, err_code: str) -> None:
        """Refuse the handshake with an HTTP status and a Deepgram-shaped JSON body, as Deepgram does:
        what an SDK's status handling (deepgram-sdk's ApiError(401)) expects. Nothing was opened, so
        nothing is flushed or recorded beyond the refusal counted in end_stream."""
        self.finished = True
        request_id = str(uuid.uuid4())
        self.log.warning("stream_refused", code=error.code, status=status, request_id=request_id, description=error.description)
        await self.base_send({"type": "websocket.http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await self.base_send({"type": "websocket.http.response.body", "body": auth.refusal_body(error, err_code=err_code, request_id=request_id)})

    async def _finish(self, error: RelayError | None = None) -> None:
        """Flush the engine (finishing the open turn), send the error, record the close."""
        if self.finished:
            return
        self.finished = True
        self.session.flush_started()
        await self._drain()
        s = self.session
        reported = s.engine_error is not None and error is None
        error, actions = s.final_error(error)
        if reported:
            metrics.error_sent(code=error.code)
        await self._run(actions)
        await self._record_close()

    async def _drain(self) -> None:
        if self.admitted:
            self.admitted = False
            admission.release()
        if self.engine is not None:
            cut = await self.engine.drain(idle=settings.RELAY_FLUSH_TIMEOUT_SECONDS, limit=settings.RELAY_FLUSH_LIMIT_SECONDS,
                                          engine_error=self.session.engine_error, deadline=registry.flush_deadline)
            if cut is not None and self.session.engine_error is None:
                self.session.engine_failed(cut)  # reported by final_error, unless the stream already ends with an error

    async def _record_close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        s = self.session
        if not s.connection_id:
            return
        metrics.connection_closed(code=s.close_code, duration_seconds=time.monotonic() - self.started)
        if self.audio_meter is not None:
            self.audio_meter.report(s.audio_bytes)
        last_frame_at = None if s.last_frame is None else timezone.now() - timedelta(seconds=time.monotonic() - s.last_frame)
        await heartbeat.record_close(connection_id=s.connection_id, session_id=s.session_id, closed=True, close_code=s.close_code,
                                     close_reason=s.close_reason, last_frame_at=last_frame_at, **s.counters())
        if self.group:
            await self._layer("group_discard", self.group, self.channel_name)
            await self._run(s.leave())

    async def _layer(self, method: str, *args: Any) -> bool:
        """A channel-layer call that never takes the stream down (Redis restarting, say)."""
        try:
            await getattr(self.channel_layer, method)(*args)
        except Exception as exc:
            layer_health.failed(method, exc)
            return False
        layer_health.succeeded()
        return True


_tasks: set[asyncio.Task] = set()


def _spawn(coro: Any) -> None:
    """Run ``coro`` as a task kept referenced until it ends (asyncio holds tasks only weakly)."""
    task = asyncio.ensure_future(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


_PERFORM = {
    action: getattr(TranscriptionConsumer, "_" + re.sub(r"(?<!^)(?=[A-Z])", "_", action.__name__).lower())
    for action in (core.SendClient, core.SendGroup, core.FeedAudio, core.AllocateTurnIndex, core.StoreTurn, core.StartTimer,
                   core.CountPresence, core.ForceEndTurn, core.Configure, core.CloseStream, core.Fail, core.ReadTurns, core.JoinGroup)
}
