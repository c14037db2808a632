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

from typing import Any


def _own_first() -> None:
    """Send the speaker's EndOfTurn when the turn write starts instead of after it commits.

    Wraps the stream core's public methods rather than copying them: when an event's actions
    end with the turn's store, the speaker's EndOfTurn is put in front of it, and the copy the
    core sends once the store answers is dropped (its sequence id given back).
    """
    from relay.flux import protocol
    from relay.live import session as core

    cls = core.StreamSession
    engine_event, index_allocated, turn_stored = cls.engine_event, cls.turn_index_allocated, cls.turn_stored

    def early(self: Any, actions: list) -> list:
        if actions and isinstance(actions[-1], core.StoreTurn) and not self.client_gone:
            store = actions[-1]
            body = protocol.turn_info_body(store.event, turn_index=store.index, speaker=self.connection_id)
            actions.insert(-1, core.SendClient(protocol.stamp(body, sequence_id=self.sequence_id, request_id=self.connection_id)))
            self.sequence_id += 1
            self.messages_sent += 1
            self.bench_sent_early = True
        return actions

    def stored(self: Any, others: int):
        finished, actions = turn_stored(self, others)
        if self.__dict__.pop("bench_sent_early", False) and actions and isinstance(actions[0], core.SendClient):
            actions = actions[1:]
            self.sequence_id -= 1
            self.messages_sent -= 1
        return finished, actions

    cls.engine_event = lambda self, event: early(self, engine_event(self, event))
    cls.turn_index_allocated = lambda self, index: early(self, index_allocated(self, index))
    cls.turn_stored = stored


def apply(names: list[str]) -> None:
    for name in names:
        if name == "ownfirst":
            _own_first()
        else:
            raise ValueError(f"unknown bench patch {name!r} (the others are in the relay now)")
