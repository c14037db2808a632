"""relay.live: a refused key from the Authorization header is an HTTP 401 where the server can send one.

The live half (real daphne, status line and body on the wire) is tests/live/test_handshake_refusal.py.
"""
from __future__ import annotations

import json
import uuid

import pytest

from relay.live import heartbeat
from relay.ops import metrics
from tests.support.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)

DENIAL = {"websocket.http.response": {}}  # what relay.server.denial_response advertises under daphne


def refusals() -> float:
    return metrics.REFUSALS.labels(code="UNAUTHORIZED")._value.get()


def with_denial(client: Client) -> Client:
    client.comm.scope["extensions"] = DENIAL  # the application reads the scope when it first runs
    return client


async def test_a_refused_header_key_gets_401_and_a_deepgram_shaped_body(settings, caplog):
    settings.RELAY_REQUIRE_AUTH = True
    before, pending = refusals(), sum(count for (_, code), count in heartbeat._refusals.items() if code == "UNAUTHORIZED")
    c = with_denial(Client("/v2/listen", headers=[(b"authorization", b"Token dg-not-a-relay-key")]))
    await c.comm.send_input({"type": "websocket.connect"})
    start = await c.comm.receive_output(10)
    assert start == {"type": "websocket.http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]}
    body = await c.comm.receive_output(10)
    assert body["type"] == "websocket.http.response.body" and not body.get("more_body")
    payload = json.loads(body["body"])
    assert (payload["err_code"], payload["err_msg"]) == ("INVALID_AUTH", "The API token is not valid.")
    uuid.UUID(payload["request_id"])
    await c.comm.send_input({"type": "websocket.disconnect", "code": 1006})  # the server dropped the TCP connection
    await c.comm.wait(10)
    assert refusals() == before + 1
    assert sum(count for (_, code), count in heartbeat._refusals.items() if code == "UNAUTHORIZED") == pending + 1
    assert "stream_refused" in caplog.text and "dg-not-a-relay-key" not in caplog.text


@pytest.mark.parametrize("how", ["subprotocol", "query", "none"])
async def test_browser_credentials_keep_the_readable_error_and_close(settings, how):
    settings.RELAY_REQUIRE_AUTH = True
    client = {
        "subprotocol": lambda: Client("/v2/listen", subprotocols=["token", "nope"]),
        "query": lambda: Client("/v2/listen?token=nope"),
        "none": lambda: Client("/v2/listen"),
    }[how]()
    c = with_denial(client)
    connected, subprotocol = await c.comm.connect(timeout=10)
    assert connected and subprotocol == ("token" if how == "subprotocol" else None)
    code, seen = await c.expect_close()
    assert (code, seen[-1]["type"], seen[-1]["code"]) == (4001, "Error", "UNAUTHORIZED")


async def test_without_the_extension_a_header_key_gets_the_error_and_close(settings):
    """A server without ASGI's denial response (Channels' test communicator here): today's refusal."""
    settings.RELAY_REQUIRE_AUTH = True
    c = Client("/v2/listen", headers=[(b"authorization", b"Token nope")])
    connected, _ = await c.comm.connect(timeout=10)
    assert connected
    code, seen = await c.expect_close()
    assert (code, seen[-1]["code"]) == (4001, "UNAUTHORIZED")
