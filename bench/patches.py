"""Candidate hot-path changes measured but not in the relay, applied by bench.asgi when
``BENCH_PATCHES`` names them, so a benchmark row can show what each would buy against the relay
as it is, in the same run.

The changes this module used to prototype (one task per connection, database calls on the
thread pool, leaner SQL, autobahn's debug formatting, ``gc.freeze``) are in the relay now; what
is left is the one that was declined:

* ``ownfirst``: the speaker's own EndOfTurn goes to its socket before the turn is written, so it
  does not wait for the database. Declined: an EndOfTurn is the client's receipt (a re-sending
  client drops the audio it covers) and must follow the commit. The benchmark keeps a row for it
  to show what that guarantee costs in latency.
"""
from __future__ import annotations

import contextvars
from typing import Any

_consumer: contextvars.ContextVar[Any] = contextvars.ContextVar("bench_ownfirst_consumer", default=None)


def _own_first() -> None:
    """Send the speaker's EndOfTurn when the turn write starts instead of after it commits.

    Wraps rather than copies the relay's code: ``_on_turn_event`` runs with the consumer in a
    context variable; the turn write (``services.aturn_record``) first sends the body the consumer
    is about to send, and the consumer's own later send of that same body is skipped.
    """
    from relay.live import consumer as consumers
    from relay.flux import protocol
    from relay.store import services

    cls = consumers.TranscriptionConsumer
    on_turn_event, send, record = cls._on_turn_event, cls._send, services.aturn_record

    async def _on_turn_event(self, event):
        token = _consumer.set(self)
        try:
            return await on_turn_event(self, event)
        finally:
            _consumer.reset(token)

    async def _send(self, body_json: str) -> None:
        if body_json == self.__dict__.pop("bench_sent_early", None):
            return
        await send(self, body_json)

    async def aturn_record(*, session_id, connection_id, index, event, **kwargs):
        consumer = _consumer.get()
        if consumer is not None and "bench_sent_early" not in consumer.__dict__:
            body = protocol.turn_info_body(event, turn_index=index, speaker=connection_id)
            await send(consumer, body)
            consumer.bench_sent_early = body
        return await record(session_id=session_id, connection_id=connection_id, index=index, event=event, **kwargs)

    cls._on_turn_event = _on_turn_event
    cls._send = _send
    services.aturn_record = aturn_record


def apply(names: list[str]) -> None:
    for name in names:
        if name == "ownfirst":
            _own_first()
        else:
            raise ValueError(f"unknown bench patch {name!r} (the others are in the relay now)")
