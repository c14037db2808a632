"""Turn writes on SQLite without the ORM: fixed statements on a connection of their own.

Why: on SQLite every ORM call of the process queues on one thread (``relay.store.db``), and a turn
write there spends most of its time in Django's Python (query compilation, model instances,
cursor wrappers) holding the GIL the event loop needs for the audio frames. At a turn per second
on 300 streams that put SQLite's ForceEndTurn -> EndOfTurn p99 at 112-137 ms against 29-41 ms
for PostgreSQL's own writer (docs/benchmarks.md). Here both turn writers (turn indexes, finished
turns) share one ``sqlite3`` connection per process: each statement is built once from the
models' metadata and takes its whole batch as one JSON parameter (read back with ``json_each``),
so the Python per batch is a ``json.dumps`` and one ``execute``. ``RELAY_TURN_WRITES`` chooses
where it runs:

* ``loop`` (the default): :class:`SqliteLoop`, on the event loop itself. It never waits for the
  write lock: when the ORM's thread holds it, the batch goes on to the thread below. After a
  batch that kept the loop too long (a slow or stalled disk), the next batches go to the thread
  for a while.
* ``thread``: :class:`SqliteThread`, on a thread of its own, waiting for the lock in C.
* ``orm``: neither; ``relay.store.services`` keeps the ORM's thread.

The guarantees are the ORM path's, as in ``relay.store.loop_db`` for PostgreSQL: each statement is
its own transaction and is committed before its callers' futures resolve, so a finished turn is
stored before anyone hears of it; turn indexes come from the same single ``UPDATE ... RETURNING``
(the database's write lock serialises allocations); the live connections are read after the
turns' commit; errors are raised as Django's exception classes, so the group commit's one-by-one
retry and :func:`relay.store.retry.with_db_retry` treat them as before.

SQLite has one writer at a time: this connection and the ORM's thread take turns on the write lock.
The ORM's transactions take it up front (``transaction_mode`` ``IMMEDIATE`` in settings) and
wait for it (``timeout``), so neither side fails on the other. An in-memory database (the test
suite's default) cannot be shared by a second connection; there the ORM path is used.
"""
from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import connections
from django.utils import timezone

from relay.models import Session, Turn, live_cutoff
from relay.ops.logs import get_logger
from relay.store.db import django_error
from relay.store.turns import allocated_indexes, live_connections_sql, turn_fields

if TYPE_CHECKING:
    from relay.store.services import FinishedTurn

log = get_logger("relay.store")

def available(alias: str = "default") -> bool:
    """Whether turn writes on ``alias`` can go this way: SQLite, and ``RELAY_TURN_WRITES`` is not
    ``orm``. (Whether the database is in memory is checked per batch: the test runner renames it.)"""
    return connections[alias].vendor == "sqlite" and settings.RELAY_TURN_WRITES in ("loop", "thread")


class _SqliteConnection:
    """One autocommit ``sqlite3`` connection, opened on first use with the Django connection's
    parameters (file, the ``init_command`` pragmas) and ``foreign_keys`` on, as Django opens its
    own; reopened when the database's name changes (the test runner) or after an error that may
    have broken it."""

    def __init__(self, alias: str, busy_timeout: float | None, pragmas: tuple[str, ...] = ()) -> None:
        self.alias = alias
        self.busy_timeout = busy_timeout  # None: the settings' timeout
        self.pragmas = pragmas
        self._conn: sqlite3.Connection | None = None
        self._name: str | None = None

    def connection(self) -> sqlite3.Connection:
        wrapper = connections[self.alias]
        name = wrapper.settings_dict["NAME"]
        if self._conn is not None and self._name != name:
            self.close()
        if self._conn is None:
            params = wrapper.get_connection_params()
            timeout = params.get("timeout", 5) if self.busy_timeout is None else self.busy_timeout
            conn = sqlite3.connect(params["database"], timeout=timeout, uri=params.get("uri", False), isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA foreign_keys = ON")
                for command in [*(getattr(wrapper, "init_commands", None) or []), *self.pragmas]:
                    if command := command.strip():
                        conn.execute(command)
            except sqlite3.Error:
                conn.close()
                raise
            self._conn, self._name = conn, name
        return self._conn

    def execute(self, statements: list[tuple[str, tuple[Any, ...]]], done: list[list[tuple]]) -> list[list[tuple]]:
        """Execute the statements from ``len(done)`` on, each its own transaction, appending the rows
        of each to ``done``. A sqlite3 error is left to the caller, this connection closed first
        unless the error was the data's own."""
        try:
            conn = self.connection()
            for sql, params in statements[len(done):]:
                done.append(conn.execute(sql, params).fetchall())
            return done
        except sqlite3.Error as exc:
            if not isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError)) and not _busy(exc):
                self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:  # already broken: nothing to release
                pass


def _busy(exc: sqlite3.Error) -> bool:
    """The write lock was taken (another connection is writing): nothing was done, try again later."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


class SqliteThread:
    """The connection on a thread of its own, fed one batch at a time; it waits for the write lock
    (the settings' ``timeout``) in C with the GIL released."""

    def __init__(self, alias: str = "default") -> None:
        self.alias = alias
        self.conn = _SqliteConnection(alias, busy_timeout=None)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-sqlite-turns")

    def _run(self, statements: list[tuple[str, tuple[Any, ...]]], done: list[list[tuple]] | None = None) -> list[list[tuple]]:
        try:
            return self.conn.execute(statements, list(done or []))
        except sqlite3.Error as exc:
            raise django_error(exc, sqlite3) from exc

    async def run(self, statements: list[tuple[str, tuple[Any, ...]]], done: list[list[tuple]] | None = None) -> list[list[tuple]]:
        """Execute each statement in order (each its own transaction) on the thread; the rows of
        each. ``done``: the rows of the statements already executed elsewhere."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, statements, done)

    def run_sync(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[list[tuple]]:
        """The same, from a thread that may block (tests, tools)."""
        return self._thread.submit(self._run, statements).result()

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database in the background, without blocking writers."""
        self._thread.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            self.conn.execute([("PRAGMA wal_checkpoint(PASSIVE)", ())], [])
        except sqlite3.Error as exc:  # the next one will do; the ORM's commits checkpoint too
            log.warning("sqlite_checkpoint_failed", error=repr(exc))


class SqliteLoop:
    """The connection on the event loop itself: no thread to hand the batch to and back.

    ``sqlite3`` releases the GIL around every ``sqlite3_step`` (every row returned). From a
    thread, each step must then win the GIL back from the busy loop, which can take a switch
    interval (5 ms): at 300 streams that, not SQLite, set the EndOfTurn latency. On the loop
    the GIL usually comes straight back, as the relay's other threads are mostly idle. Here a
    batch's statements run to the end on the loop (a batch of turns is a fraction of a
    millisecond of SQLite's work; no fsync in WAL mode with ``synchronous=NORMAL``). The loop must never wait
    on a lock, so this connection does not wait for one (busy timeout 0): a statement that finds
    the write lock taken (the ORM's thread is writing) goes to the :class:`SqliteThread`, which
    waits. Nor does it checkpoint the write-ahead log, which syncs the database file: every
    :attr:`CHECKPOINT_EVERY` batches it asks the thread to.

    **A slow disk moves the writes off the loop.** A statement's ``write()`` calls block while the
    disk is slow or stalled, and on the loop that holds every stream of the process, not only the
    turns being written (``python -m bench.stall``: 300 ms stalls put the Updates' p99 at 455 ms on
    the loop, 72 ms on the thread). So a batch that kept the loop longer than :attr:`SLOW_S` sends
    the batches of the next :attr:`OFF_LOOP_S` to the thread, which blocks only the writes; then the
    loop tries again. On a healthy disk no batch comes near it, and nothing changes.
    """

    CHECKPOINT_EVERY = 200
    SLOW_S = 0.020  # well under the 50 ms a turn's EndOfTurn should take end to end
    OFF_LOOP_S = 10.0

    def __init__(self, alias: str = "default", thread: SqliteThread | None = None) -> None:
        self.alias = alias
        self.thread = thread or SqliteThread(alias)
        self.conn = _SqliteConnection(alias, busy_timeout=0, pragmas=("PRAGMA wal_autocheckpoint = 0",))
        self.batches = 0
        self.handed_over = 0  # batches the loop found the write lock taken for
        self.slow = 0  # batches that kept the loop longer than SLOW_S
        self.off_loop = 0  # batches sent to the thread after a slow one
        self._off_loop_until = 0.0

    async def run(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[list[tuple]]:
        """Execute each statement in order (each its own transaction); the rows of each."""
        self.batches += 1
        if self.batches % self.CHECKPOINT_EVERY == 0:
            self.thread.checkpoint()
        if time.monotonic() < self._off_loop_until:
            self.off_loop += 1
            return await self.thread.run(statements)
        done: list[list[tuple]] = []
        started = time.monotonic()
        try:
            return self.conn.execute(statements, done)
        except sqlite3.Error as exc:
            if not _busy(exc):
                raise django_error(exc, sqlite3) from exc
        finally:
            if (took := time.monotonic() - started) > self.SLOW_S:
                self.slow += 1
                self._off_loop_until = time.monotonic() + self.OFF_LOOP_S
                log.warning("sqlite_turn_writes_slow", ms=round(took * 1000, 1), off_loop_s=self.OFF_LOOP_S)
        self.handed_over += 1
        return await self.thread.run(statements, done)


class TurnStatements:
    """The SQL of the turn writes, built once from the models' metadata.

    Each batch is one JSON text parameter, encoded by the standard library's C encoder and read
    back by ``json_each``, so a statement's text is the same whatever the batch size and SQLite
    prepares it once (the connection's statement cache). Values are stored as Django stores them
    on SQLite: a connection's UUID as 32 hex digits, datetimes as naive UTC text, JSON fields as
    JSON text.
    """

    def __init__(self, alias: str = "default") -> None:
        django_conn = connections[alias]
        self.ops = django_conn.ops
        _q = self.ops.quote_name
        turn_fields_ = [f for f in Turn._meta.concrete_fields if not f.primary_key]
        assert all(f.column == f.attname for f in turn_fields_), "turn columns are named as their fields"
        self.turn_columns = [f.column for f in turn_fields_]
        json_columns = {f.column for f in turn_fields_ if f.get_internal_type() == "JSONField"}
        # json_extract gives JSON fields back as (minified) JSON text, the others as SQL values.
        values = ", ".join(f"json_extract(value, '$.{c}')" for c in self.turn_columns)
        keys = ", ".join(_q(Turn._meta.get_field(name).column) for name in ("session", "index"))
        update = [Turn._meta.get_field(name).column for name in ("connection", "transcript", "words", "audio_window_start", "audio_window_end",
                                                                  "end_of_turn_confidence", "trigger", "languages")]
        assert json_columns <= set(update), "every JSON column is one the upsert replaces"
        # "WHERE true": without it SQLite would read ON CONFLICT as the SELECT's join constraint.
        self.turn_upsert = (f"INSERT INTO {_q(Turn._meta.db_table)} ({', '.join(_q(c) for c in self.turn_columns)}) "
                            f"SELECT {values} FROM json_each(?) WHERE true "
                            f"ON CONFLICT ({keys}) DO UPDATE SET " + ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in update))
        s = _q(Session._meta.db_table)
        self.index_update = (f'UPDATE {s} SET "next_turn_index" = {s}."next_turn_index" + wanted.n, "last_activity_at" = ? '
                             f"FROM (SELECT json_extract(value, '$[0]') AS sid, json_extract(value, '$[1]') AS n FROM json_each(?)) AS wanted "
                             f'WHERE {s}."id" = wanted.sid RETURNING "id", "next_turn_index"')
        self.live = live_connections_sql(_q, "{} IN (SELECT value FROM json_each(?))", "?")

    def when(self, value: Any) -> str:
        return self.ops.adapt_datetimefield_value(value)

    def turn_rows(self, turns: list[FinishedTurn]) -> str:
        """The upsert's parameter: the turns as a JSON array of rows, keyed by column."""
        created_at = self.when(timezone.now())
        rows = [{"session_id": t.session_id, "index": t.index, "connection_id": uuid.UUID(t.connection_id).hex if t.connection_id else None, "created_at": created_at,
                 **turn_fields(t.event)} for t in turns]
        return json.dumps(rows, separators=(",", ":"))


_writers: dict[tuple[str, str], SqliteLoop | SqliteThread] = {}
_writers_lock = threading.Lock()


def connection_for(alias: str = "default", mode: str | None = None) -> SqliteLoop | SqliteThread:
    """The connection ``mode`` (``RELAY_TURN_WRITES`` by default: ``loop``, on the event loop with
    a thread for lock waits; ``thread``, on the thread) of ``alias``, one per process and shared by
    both writers: a second connection would only wait for the first one's write lock."""
    mode = "thread" if (mode or settings.RELAY_TURN_WRITES) == "thread" else "loop"
    with _writers_lock:
        thread = _writers.get((alias, "thread"))
        if thread is None:
            thread = _writers[(alias, "thread")] = SqliteThread(alias)
        if mode == "loop" and (alias, "loop") not in _writers:
            _writers[(alias, "loop")] = SqliteLoop(alias, thread)  # type: ignore[arg-type]
        return _writers[(alias, mode)]


def writer(name: str, alias: str = "default", orm: Callable[[list[Any]], Awaitable[list[Any]]] | None = None,
           mode: str | None = None) -> Callable[[list[Any]], Awaitable[list[Any]]]:
    """The ``write_many`` for the batcher ``name`` (``turn_index`` or ``turn_record``) on the
    connection ``mode`` (:func:`connection_for`); ``orm``, the ORM path's, is used while the
    database is in memory."""
    conn = connection_for(alias, mode)
    statements = functools.cache(lambda: TurnStatements(alias))  # on first use: the models are loaded by then

    async def turn_indexes_allocate(session_ids: list[str]) -> list[int | Exception]:
        if orm is not None and connections[alias].is_in_memory_db():
            return await orm(session_ids)
        wanted = Counter(session_ids)
        s = statements()
        (found,) = await conn.run([(s.index_update, (s.when(timezone.now()), json.dumps(list(wanted.items()))))])
        first = {session_id: after - wanted[session_id] for session_id, after in found}
        return allocated_indexes(first, session_ids)

    async def turns_record(turns: list[FinishedTurn]) -> list[frozenset[str]]:
        if orm is not None and connections[alias].is_in_memory_db():
            return await orm(turns)
        s = statements()
        rows = list({(t.session_id, t.index): t for t in turns}.values())  # the same turn twice in a batch (a retry) is written once
        sessions = json.dumps(sorted({t.session_id for t in turns}))
        _, found = await conn.run([(s.turn_upsert, (s.turn_rows(rows),)), (s.live, (sessions, s.when(live_cutoff())))])
        live: dict[str, set[str]] = defaultdict(set)
        for session_id, pk in found:
            live[session_id].add(str(uuid.UUID(pk)))  # stored as Django stores it on SQLite: 32 hex digits
        return [frozenset(live[t.session_id] - {t.connection_id}) for t in turns]

    return {"turn_index": turn_indexes_allocate, "turn_record": turns_record}[name]
