"""Prototype hot-path changes, applied by bench.asgi when ``BENCH_PATCHES`` names them, so the
benchmark measures each one against the unpatched relay in the same run before it is proposed
for relay/ (docs/benchmarks.md gives the exact code change for each).

* ``dispatch``: one task per connection instead of one per message. Channels'
  ``await_many_dispatch`` creates a task per incoming message and runs ``asyncio.wait`` over two
  tasks (client socket, channel layer) for each one. When ``receive`` is an ``asyncio.Queue.get``
  (daphne's), a forwarder task moves channel-layer messages into that same queue and the
  consumer simply awaits ``receive()`` in a loop: same ordering, handlers still run one at a
  time.
* ``inbound``: (with ``dispatch``) bound what daphne buffers for a connection the relay cannot
  keep up with: daphne queues every incoming frame in an unbounded ``asyncio.Queue``; past
  ``INBOUND_LIMIT`` queued messages the stream ends with the relay's BacklogExceeded error
  instead of the process growing without bound.
* ``dbpool``: the relay's ``a*`` service and selector functions built with
  ``database_sync_to_async(fn, thread_sensitive=False)``. With the default (thread-sensitive)
  every ORM call of the whole process queues on asgiref's single thread; unsensitive calls run on
  the loop's thread pool, each thread with its own (persistent, ``CONN_MAX_AGE``) connection.
* ``leansql``: fewer round trips and commits per turn and per connection:
  ``turn_index_allocate`` as one ``UPDATE ... RETURNING`` (was BEGIN, UPDATE, SELECT, COMMIT);
  ``turn_record`` as one ``INSERT ... ON CONFLICT DO UPDATE`` (was SELECT, SAVEPOINT, INSERT,
  RELEASE, COMMIT) before its count; ``connection_open`` without a heartbeat commit per
  connection (the heartbeat loop keeps the process row fresh) and, for a new session (no
  ``session`` asked for: a fresh uuid4 cannot exist yet), just two INSERTs in one transaction
  (was SELECT, SAVEPOINT, INSERT, RELEASE, SELECT live connections, INSERT, UPDATE).
* ``ownfirst``: the speaker's own TurnInfo goes to its socket before the turn is written, so
  its EndOfTurn does not wait for the database; the write (and the count of other connections
  that decides the fan-out) still happens before the group_send, which is what keeps replay
  gap-free for the other tabs.
* ``autobahn``: daphne's WebSocket library (autobahn 26) formats debug-log arguments eagerly,
  whether or not debug logging is on: ``hltype``/``hlval`` (click styling) on every incoming
  read and outgoing message, ``pformat`` of its whole configuration on every connection. This
  replaces those helpers in autobahn's modules with a no-op (the log lines are never emitted).
"""
from __future__ import annotations

import asyncio
import uuid
import weakref
from typing import Any, Callable

_ERROR = "__bench_layer_error__"
INBOUND_LIMIT = 64  # messages, about 5 s of 80 ms frames
_bound_inbound = False
_queues: "weakref.WeakSet[asyncio.Queue]" = None  # type: ignore[assignment]


async def await_many_dispatch(consumer_callables: list[Callable], dispatch: Callable) -> None:
    receive = consumer_callables[0]
    queue = getattr(receive, "__self__", None)
    if not isinstance(queue, asyncio.Queue) or len(consumer_callables) > 2:
        return await _channels_await_many_dispatch(consumer_callables, dispatch)
    _queues.add(queue)
    forwarder = None
    if len(consumer_callables) == 2:
        layer_receive = consumer_callables[1]

        async def forward() -> None:
            try:
                while True:
                    queue.put_nowait(await layer_receive())
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # surface it in the consumer, as Channels does
                queue.put_nowait({"type": _ERROR, "exc": exc})

        forwarder = asyncio.get_running_loop().create_task(forward())
    try:
        while True:
            message: dict[str, Any] = await receive()
            if message.get("type") == _ERROR:
                raise message["exc"]
            if _bound_inbound and queue.qsize() > INBOUND_LIMIT:
                consumer = dispatch.__self__
                if not getattr(consumer, "closing", True):
                    from relay.exceptions import BacklogExceeded

                    await consumer._fatal(BacklogExceeded(f"The relay fell {queue.qsize()} messages behind this stream."))
            await dispatch(message)
    finally:
        if forwarder is not None:
            forwarder.cancel()
            try:
                await forwarder
            except (asyncio.CancelledError, Exception):
                pass


_channels_await_many_dispatch: Callable


def _lean_services() -> None:
    import time as _time

    from channels.db import database_sync_to_async
    from django.conf import settings
    from django.db import connection
    from django.utils import timezone

    from relay import services
    from relay.models import Session, Turn

    heartbeat = services.process_heartbeat
    last = [0.0]

    def process_heartbeat_at_most_every_few_seconds() -> None:
        now = _time.monotonic()
        if now - last[0] >= settings.RELAY_HEARTBEAT_SECONDS / 3:
            heartbeat()
            last[0] = now

    sql = (
        f'UPDATE {connection.ops.quote_name(Session._meta.db_table)} SET "next_turn_index" = "next_turn_index" + 1, '
        f'"last_activity_at" = %s WHERE "id" = %s RETURNING "next_turn_index" - 1'
    )

    def turn_index_allocate(*, session_id: str) -> int:
        with connection.cursor() as cursor:
            cursor.execute(sql, [timezone.now(), session_id])
            return cursor.fetchone()[0]

    update_fields = ["connection", "transcript", "words", "audio_window_start", "audio_window_end", "end_of_turn_confidence", "trigger"]

    def turn_record(*, session_id: str, connection_id: str, index: int, event: Any) -> int:
        Turn.objects.bulk_create(
            [Turn(session_id=session_id, index=index, connection_id=connection_id, transcript=event.transcript,
                  words=[w.as_dict() for w in event.words], audio_window_start=event.audio_window_start,
                  audio_window_end=event.audio_window_end, end_of_turn_confidence=event.end_of_turn_confidence,
                  trigger=event.trigger or "model")],
            update_conflicts=True, unique_fields=["session", "index"], update_fields=update_fields,
        )
        return services.Connection.objects.live().filter(session_id=session_id).exclude(pk=connection_id).count()

    from django.db import transaction

    from relay.models import Connection

    connection_open = services.connection_open

    def connection_open_lean(*, session_id, user, engine, since, client_addr="", user_agent=""):
        if session_id is not None:
            return connection_open(session_id=session_id, user=user, engine=engine, since=since,
                                   client_addr=client_addr, user_agent=user_agent)
        process_heartbeat_at_most_every_few_seconds()
        authenticated = bool(user is not None and getattr(user, "is_authenticated", False))
        now = timezone.now()
        with transaction.atomic():
            session = Session.objects.create(pk=str(uuid.uuid4()), owner=user if authenticated else None, engine=engine,
                                             created_at=now, last_activity_at=now)
            conn = Connection.objects.create(session=session, process_id=services.process_id(), engine=engine, resumed=False,
                                             since=since, client_addr=client_addr[:64], user_agent=user_agent[:256])
        return services.Opened(session_id=session.pk, connection_id=str(conn.pk), resumed=False, engine=engine, others=[], gap_seconds=None)

    services.connection_open = connection_open_lean
    services.aconnection_open = database_sync_to_async(connection_open_lean)
    services.process_heartbeat = process_heartbeat_at_most_every_few_seconds
    services.turn_index_allocate = turn_index_allocate
    services.turn_record = turn_record
    services.aturn_index_allocate = database_sync_to_async(turn_index_allocate)
    services.aturn_record = database_sync_to_async(turn_record)


def _own_first() -> None:
    """TranscriptionConsumer._on_turn_event as committed, with ``await self._send(body)`` moved
    before the turn write."""
    from relay import consumers, metrics, protocol, services

    async def _on_turn_event(self, event):
        if event.turn != self.engine_turn or self.turn_index is None:
            self.engine_turn = event.turn
            self.turn_index = await consumers._with_db_retry("turn_index", services.aturn_index_allocate, session_id=self.session_id)
        index = self.turn_index
        body = protocol.turn_info_body(event, turn_index=index, speaker=self.connection_id)
        final = event.event == "EndOfTurn"
        fan_out = bool(self.peers)
        await self._send(body)  # moved up: the speaker's own events never wait for the database
        if final:
            others = await consumers._with_db_retry(
                "turn_record", services.aturn_record,
                session_id=self.session_id, connection_id=self.connection_id, index=index, event=event,
            )
            fan_out = fan_out or others > 0
            metrics.turn_finished(trigger=event.trigger)
            self.audio_meter.report(self.audio_bytes)
            self.turn_index = None
            self.engine_turn = None
            consumers.log.info(
                "turn_finished session=%s connection=%s turn_index=%d trigger=%s words=%d",
                self.session_id, self.connection_id, index, event.trigger, len(event.words),
            )
        if fan_out:
            await self._layer(
                "group_send", self.group,
                {"type": "relay.event", "origin": self.channel_name, "body": body, "turn_index": index, "final": final},
            )

    consumers.TranscriptionConsumer._on_turn_event = _on_turn_event


def _quiet_autobahn() -> None:
    import autobahn.twisted.websocket as twisted_ws
    import autobahn.websocket.protocol as ws_protocol

    def quiet(*args: Any, **kwargs: Any) -> str:
        return ""

    for module in (ws_protocol, twisted_ws):
        module.hltype = quiet
        module.hlval = quiet
    ws_protocol.pformat = quiet


def inbound_stats() -> dict:
    sizes = [q.qsize() for q in list(_queues or [])]
    return {"connections": len(sizes), "queued": sum(sizes), "max": max(sizes, default=0)}


def apply(names: list[str]) -> None:
    global _channels_await_many_dispatch, _bound_inbound, _queues
    _queues = weakref.WeakSet()
    order = ["leansql", "dbpool", "dispatch", "ownfirst"]  # dbpool wraps whatever leansql installed
    for name in sorted(names, key=lambda n: order.index(n) if n in order else len(order)):
        if name == "dispatch":
            import channels.consumer

            _channels_await_many_dispatch = channels.consumer.await_many_dispatch
            channels.consumer.await_many_dispatch = await_many_dispatch
        elif name == "inbound":
            _bound_inbound = True
        elif name == "autobahn":
            _quiet_autobahn()
        elif name == "ownfirst":
            _own_first()
        elif name == "leansql":
            _lean_services()
        elif name == "dbpool":
            from channels.db import database_sync_to_async

            from relay import selectors, services

            for module in (services, selectors):
                for attr in dir(module):
                    fn = getattr(module, attr)
                    if attr.startswith("a") and hasattr(fn, "func") and callable(getattr(module, attr[1:], None)):
                        setattr(module, attr, database_sync_to_async(getattr(module, attr[1:]), thread_sensitive=False))
        else:
            raise ValueError(f"unknown bench patch {name!r}")
