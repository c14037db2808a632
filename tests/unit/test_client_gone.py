"""A client that is gone when the relay writes to it is a normal close, whenever it goes.

daphne raises autobahn's ``Disconnected`` from ``send`` when the socket closed under the relay
(a health check that leaves after the handshake, a laptop lid closing mid-turn). The wrapper
below raises it exactly there, deterministically.
"""
from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from autobahn.exception import Disconnected
from channels.testing import WebsocketCommunicator

from relay.models import Connection, Turn
from tests.support.audio import silence, tone
from transcription_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def gone_at(marker: str):
    """The ASGI app, whose ``send`` raises Disconnected from the first message containing ``marker`` on."""

    async def app(scope, receive, send):
        gone = False

        async def guarded(message):
            nonlocal gone
            if message["type"] == "websocket.send" and (gone or marker in message.get("text", "")):
                gone = True
                raise Disconnected("Attempt to send on a closed protocol")
            await send(message)

        return await application(scope, receive, guarded)

    return app


async def test_a_client_gone_before_connected_is_a_normal_close(caplog):
    comm = WebsocketCommunicator(gone_at('"Connected"'), "/v2/listen?session=gone-early")
    connected, _ = await comm.connect(timeout=10)
    assert connected
    await comm.send_input({"type": "websocket.disconnect", "code": 1006})
    await comm.wait(timeout=10)
    conn = await sync_to_async(Connection.objects.get)(session_id="gone-early")
    assert conn.closed_at is not None and conn.error_count == 0 and conn.last_error_code == ""
    assert "Traceback" not in caplog.text and "connect_failed" not in caplog.text and "stream_error" not in caplog.text
    assert "client_gone" in caplog.text


async def test_a_client_gone_mid_turn_stores_the_turn_and_counts_no_error(caplog):
    comm = WebsocketCommunicator(gone_at('"EndOfTurn"'), "/v2/listen?session=gone-mid")
    await comm.connect(timeout=10)
    audio = tone(0.5) + silence(0.7)
    for i in range(0, len(audio), 2560):
        await comm.send_to(bytes_data=audio[i : i + 2560])
    for _ in range(200):  # the EndOfTurn is written, then its send finds the socket gone
        if await sync_to_async(Turn.objects.filter(session_id="gone-mid").exists)():
            break
        await asyncio.sleep(0.02)
    await comm.send_input({"type": "websocket.disconnect", "code": 1006})
    await comm.wait(timeout=10)
    conn = await sync_to_async(Connection.objects.get)(session_id="gone-mid")
    assert conn.error_count == 0 and conn.last_error_code == "" and conn.close_code == 1006
    assert await sync_to_async(Turn.objects.filter(session_id="gone-mid").count)() == 1
    assert "Traceback" not in caplog.text and "engine_failed" not in caplog.text and "ENGINE_ERROR" not in caplog.text
