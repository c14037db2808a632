"""Group commit (relay/store/batching.py) and the batched writes in relay/store/services.py."""
from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from relay.store import services
from relay.store.batching import Batcher
from relay.engines.base import TurnEvent, Word
from relay.models import Connection, Session, Turn
from tests.support.wsclient import Client


class Recorder:
    """write_many that takes a while, records every batch, and fails on request."""

    def __init__(self, fail_on: object = None, error: type[Exception] = ValueError) -> None:
        self.batches: list[list] = []
        self.fail_on, self.error = fail_on, error

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        await asyncio.sleep(0.01)
        if self.fail_on in items:
            raise self.error(f"bad item {self.fail_on}")
        return [item * 10 for item in items]


async def test_calls_made_while_a_batch_is_written_go_together_in_the_next():
    write = Recorder()
    batcher = Batcher("t", write)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.001)  # its batch is being written
    results = [await first] + await asyncio.gather(*(batcher.submit(i) for i in range(1, 50)))
    assert results == [i * 10 for i in range(50)]
    assert [len(b) for b in write.batches] == [1, 49]  # the first alone, the rest while it was written
    assert sorted(i for b in write.batches for i in b) == list(range(50))


async def test_calls_made_in_the_next_pass_of_the_loop_join_the_first():
    # The batch is taken one pass of the event loop after the first call: calls that callbacks
    # already due make meanwhile (here: tasks the first call's caller starts right after it) go
    # in the same statement instead of the next one.
    write = Recorder()
    batcher = Batcher("t", write)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0)  # the first call is made and its batch is due
    later = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 5)]
    assert [await first] + [await call for call in later] == [0, 10, 20, 30, 40]
    assert write.batches == [[0, 1, 2, 3, 4]]


async def test_batches_are_capped():
    write = Recorder()
    batcher = Batcher("t", write, max_batch=20)
    await asyncio.gather(*(batcher.submit(i) for i in range(50)))
    assert [len(b) for b in write.batches] == [20, 20, 10]


async def test_an_item_error_fails_only_that_item():
    write = Recorder(fail_on=7)
    batcher = Batcher("t", write, split_on=(ValueError,))
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)), return_exceptions=True)
    assert isinstance(results[7], ValueError)
    assert [r for i, r in enumerate(results) if i != 7] == [i * 10 for i in range(10) if i != 7]


async def test_a_database_wide_error_fails_the_whole_batch_at_once():
    write = Recorder(fail_on=7, error=ConnectionError)
    batcher = Batcher("t", write, split_on=(ValueError,))
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.001)  # its batch is being written
    results = await asyncio.gather(*(batcher.submit(i) for i in range(1, 10)), return_exceptions=True)
    assert await first == 0
    assert all(isinstance(r, ConnectionError) for r in results)
    assert len(write.batches) == 2  # not retried one by one


async def test_a_caller_that_gives_up_does_not_disturb_the_others():
    write = Recorder()
    batcher = Batcher("t", write)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.001)  # its batch is being written
    gone = asyncio.ensure_future(batcher.submit(1))
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 5)]
    await asyncio.sleep(0)
    gone.cancel()
    assert await first == 0 and [await r for r in rest] == [20, 30, 40]
    assert gone.cancelled()


@pytest.mark.django_db(transaction=True)
def test_turn_indexes_are_consecutive_per_session_and_a_missing_session_fails_alone():
    Session.objects.create(pk="a")
    Session.objects.create(pk="b", next_turn_index=5)
    got = services.turn_indexes_allocate(["a", "b", "a", "gone", "a", "b"])
    assert got[:3] == [0, 5, 1] and isinstance(got[3], Session.DoesNotExist) and got[4:] == [2, 6]
    assert services.turn_indexes_allocate(["a"]) == [3]
    assert Session.objects.get(pk="b").next_turn_index == 7


def event(words: str) -> TurnEvent:
    ws = [Word(w, 0.9, i * 0.25, (i + 1) * 0.25) for i, w in enumerate(words.split())]
    return TurnEvent(event="EndOfTurn", turn=0, transcript=words, words=ws, audio_window_start=0.0,
                     audio_window_end=0.25 * len(ws), end_of_turn_confidence=0.9, trigger="model")


@pytest.mark.django_db(transaction=True)
def test_finished_turns_are_written_in_one_upsert_with_each_sessions_other_connections():
    a = services.connection_open(session_id="s1", user=None, engine="fake", since=None)
    b = services.connection_open(session_id="s1", user=None, engine="fake", since=None)
    c = services.connection_open(session_id="s2", user=None, engine="fake", since=None)
    others = services.turns_record([
        services.FinishedTurn("s1", a.connection_id, 0, event("one")),
        services.FinishedTurn("s2", c.connection_id, 0, event("two")),
        services.FinishedTurn("s1", b.connection_id, 1, event("three")),
        services.FinishedTurn("s1", b.connection_id, 1, event("three four")),  # a retry: written once, last wins
    ])
    assert [len(o) for o in others] == [1, 0, 1, 1]
    assert others[0] == {b.connection_id} and others[2] == {a.connection_id}
    assert list(Turn.objects.order_by("session_id", "index").values_list("session_id", "index", "transcript")) == [
        ("s1", 0, "one"), ("s1", 1, "three four"), ("s2", 0, "two"),
    ]


@pytest.mark.django_db(transaction=True)
def test_new_sessions_are_created_together():
    opened = services.connections_open_new([services.NewConnection(user=None, engine="fake", since=None, client_addr="10.0.0.1") for _ in range(3)])
    assert len({o.session_id for o in opened}) == 3 and all(not o.resumed and o.others == [] for o in opened)
    rows = Connection.objects.filter(pk__in=[o.connection_id for o in opened])
    assert sorted(str(r.session_id) for r in rows) == sorted(o.session_id for o in opened)
    assert [r.client_addr for r in rows] == ["10.0.0.1"] * 3
    assert Connection.objects.live().filter(pk__in=[o.connection_id for o in opened]).count() == 3


@pytest.mark.django_db(transaction=True)
async def test_connects_arriving_together_share_commits():
    before = (services._new_connections.batches, services._new_connections.items)
    clients = [Client("/v2/listen") for _ in range(20)]
    hellos = await asyncio.gather(*(c.connect() for c in clients))
    assert len({h["session_id"] for h in hellos}) == 20
    batches = services._new_connections.batches - before[0]
    items = services._new_connections.items - before[1]
    assert items == 20 and batches < 20
    assert await sync_to_async(Session.objects.filter(pk__in=[h["session_id"] for h in hellos]).count)() == 20
    for c in clients:
        await c.disconnect()
