"""What the turn-writer tests share: a database added as a second alias, finished turns, and
live connections to count (tests/unit/test_loop_db.py, tests/unit/test_sqlite_writes.py)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.db import connections
from django.utils import timezone

from relay.engines.base import TurnEvent, Word
from relay.models import Connection, RelayProcess, Session
from relay.store.services import FinishedTurn


@contextmanager
def database_alias(alias: str, config: dict[str, Any]) -> Iterator[str]:
    """``config`` (a ``DATABASES`` entry) usable as ``alias`` until the block ends."""
    connections.settings[alias] = connections.configure_settings({"default": {}, alias: config})[alias]
    try:
        yield alias
    finally:
        connections[alias].close()
        del connections[alias]
        del connections.settings[alias]


def event(words: str) -> TurnEvent:
    """An EndOfTurn saying ``words``, a quarter of a second each."""
    ws = [Word(w, 0.9, i * 0.25, (i + 1) * 0.25) for i, w in enumerate(words.split())]
    return TurnEvent(event="EndOfTurn", turn=0, transcript=words, words=ws, audio_window_start=0.0,
                     audio_window_end=0.25 * len(ws), end_of_turn_confidence=0.9, trigger="model", languages=["en"])


def connection(alias: str, session: Session, process: RelayProcess, **kw: Any) -> str:
    """A new connection row of ``session`` on ``process``; its id as the relay passes it around."""
    return str(Connection.objects.using(alias).create(id=uuid.uuid4(), session=session, process=process, engine="fake", **kw).pk)


def sessions_with_peers(alias: str, tag: str) -> tuple[str, ...]:
    """Two sessions and their connections: three live (a and b on the first session, c on the
    second), one whose process stopped heartbeating an hour ago and one closed (both on the first).
    Returns the two session ids and the five connection ids in that order."""
    now = timezone.now()
    live = RelayProcess.objects.using(alias).create(pk="live" + tag, pid=1, heartbeat_at=now)
    dead = RelayProcess.objects.using(alias).create(pk="dead" + tag, pid=2, heartbeat_at=now - timedelta(hours=1))
    s1, s2 = Session.objects.using(alias).create(pk="s1" + tag), Session.objects.using(alias).create(pk="s2" + tag)
    return (s1.pk, s2.pk, connection(alias, s1, live), connection(alias, s1, live), connection(alias, s2, live),
            connection(alias, s1, dead), connection(alias, s1, live, closed_at=now))


def batch_with_a_retry(s1: str, s2: str, a: str, b: str, c: str) -> tuple[list[FinishedTurn], list[frozenset[str]]]:
    """A batch of finished turns on :func:`sessions_with_peers`' sessions, the last a retry of the
    one before it with more words (written once, last wins), and what the writer must answer for
    each: the session's other live connections."""
    turns = [
        FinishedTurn(s1, a, 0, event("one")),
        FinishedTurn(s2, c, 0, event("two")),
        FinishedTurn(s1, b, 1, event("three")),
        FinishedTurn(s1, b, 1, event("three four")),
    ]
    return turns, [frozenset({b}), frozenset(), frozenset({a}), frozenset({a})]
