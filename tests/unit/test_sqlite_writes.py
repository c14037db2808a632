"""The turn writes on SQLite's connection and thread of their own (relay.store.sqlite_writes) keep
the ORM path's contract: consecutive session-wide indexes, a missing session failing alone, one
upsert per batch (a retried turn written once, last wins), values stored as the ORM stores them
(read back through the ORM), the other live connections read after the commit (closed ones and
those of a process that stopped heartbeating left out), Django's exception types, and waiting for
the ORM's write lock rather than failing on it.

Runs on a migrated SQLite file of its own, added as a second database alias with the options the
settings give SQLite (WAL, IMMEDIATE transactions, a busy timeout).
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import timedelta

import dj_database_url
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.db import IntegrityError, connections, transaction
from django.utils import timezone

from relay.models import Connection, RelayProcess, Session, Turn
from relay.store import sqlite_writes
from relay.store.services import FinishedTurn
from relay.store.turns import turn_fields
from tests.support.services import migrate
from tests.support.turn_writes import batch_with_a_retry, connection, database_alias, event, sessions_with_peers

ALIAS = "writes_sqlite"


@pytest.fixture(scope="module")
def lite(django_db_blocker, tmp_path_factory):
    import os

    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite-writes') / 'relay.sqlite3'}"
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_DEBUG": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    migrate(env)
    with django_db_blocker.unblock():
        config = dj_database_url.parse(url)
        config["OPTIONS"] = dict(django_settings.DATABASES["default"]["OPTIONS"])  # the suite runs on SQLite: the settings' options
        with database_alias(ALIAS, config) as alias:
            yield alias


MODES = pytest.mark.parametrize("mode", ["loop", "thread"])


def test_sqlite_writes_are_chosen_for_sqlite_unless_the_orm_is_asked_for(lite, settings):
    assert sqlite_writes.available(lite) and sqlite_writes.available("default")
    settings.RELAY_TURN_WRITES = "orm"
    assert not sqlite_writes.available(lite)


@MODES
async def test_turn_indexes_are_consecutive_per_session_and_a_missing_session_fails_alone(lite, mode):
    tag = uuid.uuid4().hex[:6]
    a, b = f"a{tag}", f"b{tag}"
    await sync_to_async(lambda: (Session.objects.using(lite).create(pk=a), Session.objects.using(lite).create(pk=b, next_turn_index=5)))()
    before = timezone.now()
    allocate = sqlite_writes.writer("turn_index", lite, mode=mode)
    got = await allocate([a, b, a, "gone" + tag, a, b])
    assert got[:3] == [0, 5, 1] and isinstance(got[3], Session.DoesNotExist) and got[4:] == [2, 6]
    assert await allocate([a]) == [3]
    stored = await sync_to_async(lambda: Session.objects.using(lite).get(pk=b))()
    assert stored.next_turn_index == 7 and stored.last_activity_at >= before - timedelta(seconds=1)


@MODES
async def test_finished_turns_are_upserted_as_the_orm_stores_them_with_each_sessions_other_live_connections(lite, mode):
    tag = uuid.uuid4().hex[:6]

    s1, s2, a, b, c, _dead_peer, _closed = await sync_to_async(sessions_with_peers)(lite, tag)
    before = timezone.now()
    record = sqlite_writes.writer("turn_record", lite, mode=mode)
    turns, others = batch_with_a_retry(s1, s2, a, b, c)
    assert await record(turns) == others
    fields = ("session_id", "index", "transcript", "words", "languages", "trigger", "connection_id", "audio_window_end",
              "end_of_turn_confidence", "created_at")
    stored = await sync_to_async(lambda: list(
        Turn.objects.using(lite).filter(session_id__in=[s1, s2]).order_by("session_id", "index").values(*fields)))()
    assert [(r["session_id"], r["index"], r["transcript"]) for r in stored] == [(s1, 0, "one"), (s1, 1, "three four"), (s2, 0, "two")]
    row = stored[1]
    assert row["words"] == [w.as_dict() for w in event("three four").words] and row["languages"] == ["en"] and row["trigger"] == "model"
    assert str(row["connection_id"]) == b and row["audio_window_end"] == 0.5 and row["end_of_turn_confidence"] == 0.9
    assert before - timedelta(seconds=1) <= row["created_at"] <= timezone.now()
    # The ORM's reverse relation finds it: the connection id is stored in the ORM's own format.
    assert await sync_to_async(lambda: Connection.objects.using(lite).get(pk=b).turns.count())() == 1
    # written again (a write retried after its commit): the same rows, no error
    assert await record([FinishedTurn(s2, c, 0, event("two"))]) == [frozenset()]


@MODES
async def test_a_turn_without_a_connection_and_one_with_unicode_are_stored_whole(lite, mode):
    session = "u" + uuid.uuid4().hex[:6]
    await sync_to_async(lambda: Session.objects.using(lite).create(pk=session))()
    text = 'naïve "quoted" \\ back – 日本語'
    await sqlite_writes.writer("turn_record", lite, mode=mode)([FinishedTurn(session, None, 0, event(text))])
    row = await sync_to_async(lambda: Turn.objects.using(lite).values("transcript", "words", "connection_id").get(session_id=session))()
    assert row == {"transcript": text, "words": [w.as_dict() for w in event(text).words], "connection_id": None}


@MODES
async def test_errors_are_djangos_and_the_connection_recovers(lite, mode):
    session = "e" + uuid.uuid4().hex[:6]
    await sync_to_async(lambda: Session.objects.using(lite).create(pk=session))()
    record = sqlite_writes.writer("turn_record", lite, mode=mode)
    with pytest.raises(IntegrityError):  # a connection id with no row: the foreign key refuses it
        await record([FinishedTurn(session, str(uuid.uuid4()), 0, event("lost"))])
    assert await sqlite_writes.writer("turn_index", lite, mode=mode)([session]) == [0]
    assert await sync_to_async(lambda: Turn.objects.using(lite).filter(session_id=session).count())() == 0


@MODES
async def test_a_write_waits_for_the_orms_write_lock_instead_of_failing(lite, mode):
    session = "w" + uuid.uuid4().hex[:6]
    await sync_to_async(lambda: Session.objects.using(lite).create(pk=session))()
    locked, released = threading.Event(), []

    def hold_the_lock() -> None:  # an ORM transaction (IMMEDIATE: it takes the write lock at BEGIN)
        with transaction.atomic(using=lite):
            Session.objects.using(lite).filter(pk=session).update(end_reason="held")
            locked.set()
            time.sleep(0.3)
            released.append(time.monotonic())
        connections[lite].close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    await asyncio.get_running_loop().run_in_executor(None, locked.wait)
    conn = sqlite_writes.connection_for(lite, mode)
    handed = getattr(conn, "handed_over", 0)
    got = await sqlite_writes.writer("turn_index", lite, mode=mode)([session])
    done = time.monotonic()
    holder.join()
    assert got == [0] and done >= released[0]
    if mode == "loop":  # the loop did not wait for the lock: the thread did
        assert conn.handed_over == handed + 1


async def test_the_loop_connection_leaves_checkpoints_to_the_thread(lite):
    """The loop's connection never copies the write-ahead log into the database (that syncs the
    file); every CHECKPOINT_EVERY batches the thread does, so the log does not grow without end."""
    import os

    session = "c" + uuid.uuid4().hex[:6]
    await sync_to_async(lambda: Session.objects.using(lite).create(pk=session))()
    await sync_to_async(lambda: connections[lite].close())()
    conn = sqlite_writes.SqliteLoop(lite)
    conn.CHECKPOINT_EVERY = 10**9
    conn.SLOW_S = float("inf")  # every batch on the loop's connection, however long this machine takes for one
    wal = connections[lite].settings_dict["NAME"] + "-wal"
    statements = sqlite_writes.TurnStatements(lite)
    rows = (statements.turn_upsert, (statements.turn_rows([FinishedTurn(session, None, i, event("a few words of a turn " * 20)) for i in range(20)]),))
    for _ in range(2000):  # until the log is well past SQLite's own autocheckpoint (1,000 pages), were it on
        await conn.run([rows])
        if os.path.getsize(wal) > 2500 * 4096:
            break
    assert os.path.getsize(wal) > 2500 * 4096
    assert conn.conn._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    [[(busy, log_pages, copied)]] = conn.thread.run_sync([("PRAGMA wal_checkpoint(PASSIVE)", ())])
    assert busy == 0 and copied == log_pages > 2000  # frames of a page and a header each
    conn.CHECKPOINT_EVERY = 1
    conn.thread.conn.close()
    await conn.run([("SELECT 1", ())])
    await asyncio.get_running_loop().run_in_executor(None, lambda: conn.thread._thread.submit(lambda: None).result())
    assert conn.thread.conn._conn is not None  # the thread ran a checkpoint on its connection


async def test_a_batch_that_kept_the_loop_too_long_sends_the_next_ones_to_the_thread_for_a_while(lite, monkeypatch):
    """A slow or stalled disk blocks a statement's write() calls, and on the event loop that holds
    every stream. After one batch over SLOW_S on the loop, the batches of the next OFF_LOOP_S run on
    the thread (the loop goes on meanwhile); then the loop tries again."""
    session = "s" + uuid.uuid4().hex[:6]
    await sync_to_async(lambda: Session.objects.using(lite).create(pk=session))()
    await sync_to_async(lambda: connections[lite].close())()
    conn = sqlite_writes.SqliteLoop(lite)
    where: list[str] = []
    slow_disk = [True]
    execute = conn.conn.execute

    def on_the_loop(statements, done):
        where.append("loop")
        if slow_disk[0]:
            time.sleep(conn.SLOW_S * 2)  # the disk stalls under this batch's write()
        return execute(statements, done)

    monkeypatch.setattr(conn.conn, "execute", on_the_loop)
    run_on_thread = conn.thread.run

    async def on_the_thread(statements, done=None):
        where.append("thread")
        return await run_on_thread(statements, done)

    monkeypatch.setattr(conn.thread, "run", on_the_thread)
    count = [("SELECT count(*) FROM relay_session WHERE id = ?", (session,))]
    assert await conn.run(count) == [[(1,)]]  # the slow batch itself is done, on the loop
    assert where == ["loop"] and conn.slow == 1
    slow_disk[0] = False
    for _ in range(3):
        assert await conn.run(count) == [[(1,)]]
    assert where == ["loop", "thread", "thread", "thread"] and conn.off_loop == 3
    conn._off_loop_until = time.monotonic()  # OFF_LOOP_S later
    assert await conn.run(count) == [[(1,)]]
    assert await conn.run(count) == [[(1,)]]
    assert where[4:] == ["loop", "loop"] and conn.slow == 1  # a fast disk again: the loop keeps them


async def test_an_in_memory_database_goes_through_the_orm(db):
    assert connections["default"].is_in_memory_db()
    calls = []

    async def orm(items):
        calls.append(items)
        return [7] * len(items)

    assert await sqlite_writes.writer("turn_index", "default", orm=orm)(["x", "y"]) == [7, 7] and calls == [["x", "y"]]


def test_the_thread_reopens_when_the_database_is_renamed(lite, tmp_path):
    thread = sqlite_writes.SqliteThread(lite)
    assert thread.run_sync([("SELECT count(*) FROM relay_session", ())])[0][0][0] >= 0
    first = thread.conn._conn
    name = connections[lite].settings_dict["NAME"]
    connections[lite].settings_dict["NAME"] = str(tmp_path / "other.sqlite3")
    try:
        assert thread.run_sync([("SELECT 1", ())]) == [[(1,)]] and thread.conn._conn is not first
    finally:
        connections[lite].settings_dict["NAME"] = name


def test_the_orm_and_this_path_store_the_same_row(lite):
    """A turn written by each path reads back the same through the ORM, each column of the same
    SQLite type (created_at aside)."""
    tag = uuid.uuid4().hex[:6]
    process = RelayProcess.objects.using(lite).create(pk="p" + tag, pid=1)
    one, two = Session.objects.using(lite).create(pk="o" + tag), Session.objects.using(lite).create(pk="t" + tag)
    conn_one, conn_two = connection(lite, one, process), connection(lite, two, process)
    Turn.objects.using(lite).create(session=one, index=0, connection_id=conn_one, **turn_fields(event("same words here")))  # as turns_record
    asyncio.run(sqlite_writes.writer("turn_record", lite)([FinishedTurn(two.pk, conn_two, 0, event("same words here"))]))
    fields = [f.attname for f in Turn._meta.concrete_fields if f.attname not in ("id", "session_id", "connection_id", "created_at")]
    a = Turn.objects.using(lite).values(*fields).get(session=one)
    b = Turn.objects.using(lite).values(*fields).get(session=two)
    assert a == b
    columns = [f.column for f in Turn._meta.concrete_fields if f.column != "id"]
    with connections[lite].cursor() as cursor:
        types = ", ".join(f'typeof("{c}")' for c in columns)
        cursor.execute(f'SELECT {types} FROM relay_turn WHERE session_id IN (%s, %s) ORDER BY session_id', [one.pk, two.pk])
        orm_types, our_types = cursor.fetchall()
    assert orm_types == our_types
