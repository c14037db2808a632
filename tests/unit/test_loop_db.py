"""The turn writes on PostgreSQL connections of their own (relay.store.loop_db: the event loop's,
or a thread's) keep the ORM path's contract: consecutive session-wide indexes, a missing session
failing alone, one upsert per batch (a retried turn written once, last wins), the other live connections read after the
commit (closed ones and those of a process that stopped heartbeating left out), and Django's
exception types, so the group commit and the retry treat errors as before.

Runs on a fresh PostgreSQL database of its own, added as a second database alias.
"""
from __future__ import annotations

import uuid

import dj_database_url
import pytest
from django.db import IntegrityError, OperationalError, connections

from relay.models import Session, Turn
from relay.store import loop_db
from relay.store.services import FinishedTurn
from tests.support.services import postgres_database
from tests.support.turn_writes import batch_with_a_retry, database_alias, event, sessions_with_peers

pytestmark = [pytest.mark.postgres]
ALIAS = "loop_pg"


@pytest.fixture(scope="module")
def pg(django_db_blocker):
    with postgres_database() as url, django_db_blocker.unblock(), database_alias(ALIAS, dj_database_url.parse(url)) as alias:
        yield alias


def test_loop_db_is_chosen_for_postgresql_only_unless_the_orm_is_asked_for(pg, settings):
    assert loop_db.available(pg) and not loop_db.available("default")
    settings.RELAY_TURN_WRITES = "orm"
    assert not loop_db.available(pg)


MODES = pytest.mark.parametrize("mode", ["loop", "thread"])


@MODES
async def test_turn_indexes_are_consecutive_per_session_and_a_missing_session_fails_alone(pg, mode):
    from asgiref.sync import sync_to_async

    tag = uuid.uuid4().hex[:6]
    a, b = f"a{tag}", f"b{tag}"
    await sync_to_async(lambda: (Session.objects.using(pg).create(pk=a), Session.objects.using(pg).create(pk=b, next_turn_index=5)))()
    allocate = loop_db.writer("turn_index", pg, mode)
    got = await allocate([a, b, a, "gone" + tag, a, b])
    assert got[:3] == [0, 5, 1] and isinstance(got[3], Session.DoesNotExist) and got[4:] == [2, 6]
    assert await allocate([a]) == [3]
    assert await sync_to_async(lambda: Session.objects.using(pg).get(pk=b).next_turn_index)() == 7


@MODES
async def test_finished_turns_are_upserted_with_each_sessions_other_live_connections(pg, mode):
    from asgiref.sync import sync_to_async

    tag = uuid.uuid4().hex[:6]

    s1, s2, a, b, c, _dead_peer, _closed = await sync_to_async(sessions_with_peers)(pg, tag)
    record = loop_db.writer("turn_record", pg, mode)
    turns, others = batch_with_a_retry(s1, s2, a, b, c)
    assert await record(turns) == others
    stored = await sync_to_async(lambda: list(
        Turn.objects.using(pg).filter(session_id__in=[s1, s2]).order_by("session_id", "index")
        .values_list("session_id", "index", "transcript", "words", "languages", "trigger", "connection_id")))()
    assert [row[:3] for row in stored] == [(s1, 0, "one"), (s1, 1, "three four"), (s2, 0, "two")]
    assert stored[1][3] == [w.as_dict() for w in event("three four").words] and stored[1][4] == ["en"] and stored[1][5] == "model"
    assert str(stored[1][6]) == b
    # written again (a write retried after its commit): the same rows, no error
    assert await record([FinishedTurn(s2, c, 0, event("two"))]) == [frozenset()]


@MODES
async def test_errors_are_djangos_and_the_connection_recovers(pg, mode):
    from asgiref.sync import sync_to_async

    session = "e" + uuid.uuid4().hex[:6]
    await sync_to_async(lambda: Session.objects.using(pg).create(pk=session))()
    record = loop_db.writer("turn_record", pg, mode)
    with pytest.raises(IntegrityError):  # a connection id with no row: the foreign key refuses it
        await record([FinishedTurn(session, str(uuid.uuid4()), 0, event("lost"))])
    assert await loop_db.writer("turn_index", pg, mode)([session]) == [0]
    conn = loop_db.LoopConnection(pg) if mode == "loop" else loop_db.ThreadConnection(pg)
    await conn.run([("SELECT 1", [])])
    backend = conn._conn.info.backend_pid

    def terminate() -> None:  # the server side goes away (a database restart, say)
        with connections[pg].cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [backend])

    await sync_to_async(terminate)()
    with pytest.raises(OperationalError):
        await conn.run([("SELECT 1", [])])
    assert await conn.run([("SELECT 1", [])]) == [[(1,)]]  # the next call opens a new connection
