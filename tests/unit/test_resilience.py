"""In-process resilience: database blips and channel-layer failures never lose a finished turn."""
from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError

from relay.store import services
from relay.models import Turn
from tests.support.audio import silence, tone
from tests.support.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)


async def test_turn_write_is_retried_through_a_database_outage(monkeypatch, settings):
    settings.RELAY_DB_RETRY_SECONDS = 10
    real = services.aturn_record
    failures = {"left": 3}

    async def flaky(**kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("server closed the connection unexpectedly")
        return await real(**kwargs)

    monkeypatch.setattr(services, "aturn_record", flaky)
    c = Client("/v2/listen?session=db-blip")
    await c.connect()
    await c.send_audio(tone(0.5) + silence(0.7))
    end = await c.recv_turn_end()
    assert end["transcript"] == "one two"
    await c.disconnect()  # waits for the stream's events, the retried write included
    assert failures["left"] == 0
    assert await sync_to_async(Turn.objects.filter(session_id="db-blip").count)() == 1


async def test_database_down_past_the_limit_is_an_error_not_a_crash(monkeypatch, settings):
    settings.RELAY_DB_RETRY_SECONDS = 0.3

    async def down(**kwargs):
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(services, "aturn_index_allocate", down)
    c = Client("/v2/listen?session=db-down")
    await c.connect()
    await c.send_audio(tone(0.5))
    code, seen = await c.expect_close()
    assert code == 4013 and seen[-1]["type"] == "Error" and seen[-1]["code"] == "STORAGE_UNAVAILABLE"


async def test_channel_layer_failure_does_not_take_the_stream_down(monkeypatch):
    from channels.layers import get_channel_layer

    a = Client("/v2/listen?session=layer-down")
    b = Client("/v2/listen?session=layer-down")
    await a.connect()
    await b.connect()
    layer = get_channel_layer()

    async def broken(*args, **kwargs):
        raise ConnectionError("redis went away")

    monkeypatch.setattr(layer, "group_send", broken)
    await a.send_audio(tone(0.5) + silence(0.7))
    end = await a.recv_turn_end()
    assert end["transcript"] == "one two"
    monkeypatch.undo()
    await a.send_audio(tone(0.25) + silence(0.7))
    missed = await b.recv_turn_end()  # the turn the layer lost reaches b from the store, first
    assert (missed["turn_index"], missed["replayed"], missed["transcript"]) == (0, True, "one two")
    assert (await b.recv_turn_end())["turn_index"] == 1  # later events flow again
    assert [m["code"] for m in b.messages if m["type"] == "Warning"] == ["SHARING_INTERRUPTED"]
    await a.disconnect()
    await b.disconnect()
    assert await sync_to_async(Turn.objects.filter(session_id="layer-down").count)() == 2


async def test_a_gap_longer_than_one_page_is_repaired_whole(monkeypatch, settings):
    from channels.layers import get_channel_layer

    settings.RELAY_REPLAY_PAGE_SIZE = 2  # five missed turns: three pages
    a = Client("/v2/listen?session=long-gap")
    b = Client("/v2/listen?session=long-gap")
    await a.connect()
    await b.connect()
    layer = get_channel_layer()

    async def broken(*args, **kwargs):
        raise ConnectionError("redis went away")

    monkeypatch.setattr(layer, "group_send", broken)
    for _ in range(5):
        await a.send_audio(tone(0.5) + silence(0.7))
        await a.recv_turn_end()
    monkeypatch.undo()
    await a.send_audio(tone(0.25) + silence(0.7))
    got = [await b.recv_turn_end() for _ in range(6)]
    assert [m["turn_index"] for m in got] == [0, 1, 2, 3, 4, 5] and all(m["replayed"] for m in got[:5])
    await a.disconnect()
    await b.disconnect()
