"""Turn writes on PostgreSQL without the ORM's pool threads: fixed statements on connections of their own.

Why: a turn write through the ORM in a pool thread (``database_sync_to_async``) spends most of
its time in Python (query compilation, cursor wrappers, psycopg's send/wait loop) while holding
the GIL the event loop needs for the audio frames; at a turn per second per stream on 300
streams that contention, not the database, set the EndOfTurn latency (docs/benchmarks.md). Here
each statement is built once from the models' metadata, takes its batch as arrays, and goes out
on a connection one writer (turn indexes, finished turns) owns. ``RELAY_TURN_WRITES`` chooses
where that connection lives:

* ``loop`` (the default): a psycopg ``AsyncConnection`` on the event loop itself, no thread and
  no GIL handover at all; one loop iteration per statement and network wait, so a saturated
  loop delays the commit's answer (docs/benchmarks.md, round three).
* ``thread``: a psycopg connection on a thread of the writer's own. The loop hands it a batch and
  gets one callback when it is committed; the thread waits for PostgreSQL in C, GIL released.
* ``orm``: neither; ``relay.store.services`` keeps the ORM in the pool threads.

The guarantees are those of the ORM path, unchanged: a batch is committed (autocommit, one
statement each) before its callers' futures resolve, so a finished turn is stored before anyone
hears of it; turn indexes come from the same single ``UPDATE ... RETURNING`` with its row
locks; the live connections are read after the turns' commit. Errors are raised as Django's
database exceptions (``IntegrityError``, ``OperationalError`` ...), so the group commit's
one-by-one retry and :func:`relay.store.retry.with_db_retry` treat them as before; a connection
that failed is dropped and the next write opens a new one. No statement is prepared on the
server, so PgBouncer in transaction mode is fine.

SQLite has its own way off the ORM, on one connection per process: ``relay.store.sqlite_writes``.
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from collections import Counter, defaultdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from django.conf import settings
from django.db import connections
from django.utils import timezone

from relay.models import Session, Turn, live_cutoff
from relay.store.db import django_error
from relay.store.turns import allocated_indexes, live_connections_sql, turn_fields

if TYPE_CHECKING:
    from relay.store.services import FinishedTurn


def available(alias: str = "default") -> bool:
    """Whether turn writes go this way: the database is PostgreSQL (the only backend here) and
    ``RELAY_TURN_WRITES`` is ``loop`` or ``thread``, not ``orm``."""
    return connections[alias].vendor == "postgresql" and settings.RELAY_TURN_WRITES in ("loop", "thread")


class LoopConnection:
    """One autocommit connection owned by the running event loop, opened on first use."""

    def __init__(self, alias: str = "default") -> None:
        self.alias = alias
        self._conn: psycopg.AsyncConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connection(self) -> psycopg.AsyncConnection:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): the old loop's connection is unusable here
            self._conn, self._loop = None, loop
        if self._conn is None or self._conn.closed:
            params = connections[self.alias].get_connection_params()
            params.pop("cursor_factory", None)  # Django's sync cursor class
            params.setdefault("connect_timeout", 5)
            self._conn = await psycopg.AsyncConnection.connect(autocommit=True, **params)
        return self._conn

    async def run(self, statements: list[tuple[str, list[Any]]]) -> list[list[tuple]]:
        """Execute each statement in order (each its own transaction); the rows of each."""
        try:
            conn = await self._connection()
            out = []
            async with conn.cursor() as cursor:
                for sql, params in statements:
                    await cursor.execute(sql, params)
                    out.append(await cursor.fetchall() if cursor.description else [])
            return out
        except psycopg.Error as exc:
            if not isinstance(exc, (psycopg.IntegrityError, psycopg.DataError)):
                await self.close()
            raise django_error(exc, psycopg) from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # already broken: nothing to release
                pass


class ThreadConnection:
    """One autocommit connection used by one thread of its own, fed one batch at a time.

    The loop hands a batch over and gets one callback when it is committed: the waits for
    PostgreSQL happen in C with the GIL released, and the loop spends one iteration per batch
    instead of one per statement and network wait.
    """

    def __init__(self, alias: str = "default") -> None:
        self.alias = alias
        self._conn: psycopg.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-turn-writes")

    def _run(self, statements: list[tuple[str, list[Any]]]) -> list[list[tuple]]:
        try:
            if self._conn is None or self._conn.closed:
                params = connections[self.alias].get_connection_params()
                params.pop("cursor_factory", None)  # Django's cursor class wraps its own connection's
                params.setdefault("connect_timeout", 5)
                self._conn = psycopg.connect(autocommit=True, **params)
            out = []
            with self._conn.cursor() as cursor:
                for sql, params in statements:
                    cursor.execute(sql, params)
                    out.append(cursor.fetchall() if cursor.description else [])
            return out
        except psycopg.Error as exc:
            if not isinstance(exc, (psycopg.IntegrityError, psycopg.DataError)) and self._conn is not None:
                self._conn.close()
                self._conn = None
            raise django_error(exc, psycopg) from exc

    async def run(self, statements: list[tuple[str, list[Any]]]) -> list[list[tuple]]:
        """Execute each statement in order (each its own transaction) on the thread; the rows of each."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, statements)




class TurnStatements:
    """The SQL of the turn writes, built once from the models' metadata.

    Each statement's text is the same whatever the batch size, so psycopg parses it once. The
    turns of a batch travel as one JSON document read back by ``json_populate_recordset`` against
    the turn table's own row type: one text parameter encoded by the standard library's C
    encoder, where a parameter per column made psycopg dump every value of every row in Python.
    """

    def __init__(self, alias: str = "default") -> None:
        self.alias = alias
        django_conn = connections[alias]
        _q = django_conn.ops.quote_name
        self.session = _q(Session._meta.db_table)
        self.turn_fields = [f for f in Turn._meta.concrete_fields if not f.primary_key]
        assert all(f.column == f.attname for f in self.turn_fields), "turn columns are named as their fields"
        columns = ", ".join(_q(f.column) for f in self.turn_fields)
        keys = ", ".join(_q(Turn._meta.get_field(name).column) for name in ("session", "index"))
        update = [Turn._meta.get_field(name).column for name in ("connection", "transcript", "words", "audio_window_start", "audio_window_end",
                                                                  "end_of_turn_confidence", "trigger", "languages")]
        self.turn_upsert = (f"INSERT INTO {_q(Turn._meta.db_table)} ({columns}) "
                            f"SELECT {columns} FROM json_populate_recordset(NULL::{_q(Turn._meta.db_table)}, %s::json) "
                            f"ON CONFLICT ({keys}) DO UPDATE SET " + ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in update))
        # services.turn_indexes_allocate's statement, with the wanted counts as two arrays.
        s = self.session
        self.index_update = (f'UPDATE {s} SET "next_turn_index" = {s}."next_turn_index" + wanted.n, "last_activity_at" = %s '
                             f'FROM unnest(%s::text[], %s::integer[]) AS wanted(sid, n) WHERE {s}."id" = wanted.sid '
                             f'RETURNING {s}."id", {s}."next_turn_index"')
        self.live = live_connections_sql(_q, "{} = ANY(%s::text[])", "%s")

    def turn_rows(self, turns: list[FinishedTurn], now: datetime) -> list[str]:
        """The statement's parameter: the turns as a JSON array of rows, keyed by column."""
        created_at = now.isoformat()
        rows = [{"session_id": t.session_id, "index": t.index, "connection_id": t.connection_id, "created_at": created_at,
                 **turn_fields(t.event)} for t in turns]
        return [json.dumps(rows, separators=(",", ":"))]


def writer(name: str, alias: str = "default", mode: str | None = None) -> Any:
    """The ``write_many`` for the batcher ``name`` (``turn_index`` or ``turn_record``); ``mode``
    (``RELAY_TURN_WRITES`` by default): ``loop``, a connection of the event loop's; ``thread``, a
    connection on a thread of its own."""
    conn = LoopConnection(alias) if (mode or settings.RELAY_TURN_WRITES) == "loop" else ThreadConnection(alias)
    built: list[TurnStatements] = []

    def statements() -> TurnStatements:  # on first use: the models are loaded by then
        if not built:
            built.append(TurnStatements(alias))
        return built[0]

    async def turn_indexes_allocate(session_ids: list[str]) -> list[int | Exception]:
        # Same statement and row locks as services.turn_indexes_allocate, on the loop's connection.
        wanted = Counter(session_ids)
        ids = sorted(wanted)
        (found,) = await conn.run([(statements().index_update, [timezone.now(), ids, [wanted[i] for i in ids]])])
        first = {session_id: after - wanted[session_id] for session_id, after in found}
        return allocated_indexes(first, session_ids)

    async def turns_record(turns: list[FinishedTurn]) -> list[frozenset[str]]:
        # services.turns_record on the loop: one upsert (committed), then the live connections.
        s = statements()
        rows = list({(t.session_id, t.index): t for t in turns}.values())  # the same turn twice in a batch (a retry) is written once
        sessions = sorted({t.session_id for t in turns})
        _, found = await conn.run([(s.turn_upsert, s.turn_rows(rows, timezone.now())), (s.live, [sessions, live_cutoff()])])
        live: dict[str, set[str]] = defaultdict(set)
        for session_id, pk in found:
            live[session_id].add(str(pk))
        return [frozenset(live[t.session_id] - {t.connection_id}) for t in turns]

    return {"turn_index": turn_indexes_allocate, "turn_record": turns_record}[name]
