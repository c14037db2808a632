"""A real daphne and a plain `websockets` client: how a refused key is answered, by where it came from.

A key from the ``Authorization`` header (SDKs, server programs) is refused at the handshake with
HTTP 401 and Deepgram's JSON error shape, as Deepgram does (relay/server/denial_response.py); a
key from the subprotocols, a ``token=`` query parameter or no key at all (browsers, which cannot
read a handshake status) gets the socket, ``Error UNAUTHORIZED`` and close 4001.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.support.live import ROOT, LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]

KEY = "dg-made-up-0123456789abcdef0123456789abcdef"  # not a relay token
QUERY = "/v2/listen?model=flux-general-en&encoding=linear16&sample_rate=16000"


def refused_at_handshake(url: str, headers: dict[str, str]) -> InvalidStatus:
    async def connect() -> None:
        async with websockets.connect(url, additional_headers=headers):
            raise AssertionError("the handshake succeeded")

    with pytest.raises(InvalidStatus) as info:
        asyncio.run(connect())
    return info.value


def refused_after_accept(url: str, subprotocols: list[str] | None = None) -> tuple[list[dict], int | None, str, str | None]:
    """Connect, read until the relay closes: (messages, close code, close reason, subprotocol)."""

    async def connect() -> tuple[list[dict], int | None, str, str | None]:
        messages = []
        async with websockets.connect(url, subprotocols=subprotocols) as ws:
            try:
                async for raw in ws:
                    messages.append(json.loads(raw))
            except websockets.ConnectionClosed:
                pass
        return messages, ws.close_code, ws.close_reason, ws.subprotocol

    return asyncio.run(connect())


def refusal_counts(server: LiveServer) -> dict[str, float]:
    text = urllib.request.urlopen(server.http_url + "/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^relay_refusals_total\{code="([A-Z_]+)"\} ([0-9.e+]+)$', text, re.M)}


def check_401(refusal: InvalidStatus, err_msg: str) -> str:
    """The response Deepgram gives a bad key; returns its request_id."""
    response = refusal.response
    assert (response.status_code, response.reason_phrase) == (401, "Unauthorized")
    assert response.headers["content-type"] == "application/json"
    body = json.loads(bytes(response.body))
    assert set(body) == {"err_code", "err_msg", "request_id"}, body
    assert (body["err_code"], body["err_msg"]) == ("INVALID_AUTH", err_msg)
    return str(uuid.UUID(body["request_id"]))


def refusal_rows(database_url: str, code: str, expected: int) -> int:
    """The Refusal rows' count for ``code`` once the heartbeat wrote ``expected`` (or the last seen)."""
    path = database_url.removeprefix("sqlite:///")
    total = 0
    for _ in range(300):  # the heartbeat writes every RELAY_HEARTBEAT_SECONDS (1 s here)
        with sqlite3.connect(path) as db:
            total = db.execute("SELECT COALESCE(SUM(count), 0) FROM relay_refusal WHERE code = ?", (code,)).fetchone()[0]
        if total >= expected:
            break
        time.sleep(0.1)
    return total


def test_a_header_key_gets_401_and_a_browser_key_gets_error_4001(tmp_path):
    env = {**sqlite_env(tmp_path), "RELAY_REQUIRE_AUTH": "1", "RELAY_HEARTBEAT_SECONDS": "1"}
    with LiveServer(env, log_name="daphne-refusal") as server:
        url = server.ws_url + QUERY
        request_ids = [
            check_401(refused_at_handshake(url, {"Authorization": f"Token {KEY}"}), "The API token is not valid."),
            check_401(refused_at_handshake(url, {"Authorization": f"Bearer {KEY}"}), "The API token is not valid."),
        ]
        assert len(set(request_ids)) == 2
        check_401(refused_at_handshake(url, {"Authorization": "Basic dXNlcjpwdw=="}), "The API token is not valid.")  # unreadable: refused too

        # The ways a browser can present a key, and none at all: the readable Error and close.
        for target, subprotocols, description in [
            (url, ["token", KEY], "The API token is not valid."),
            (url + f"&token={KEY}", None, "A valid API token or login is required."),
            (url, None, "A valid API token or login is required."),
        ]:
            messages, code, reason, chosen = refused_after_accept(target, subprotocols)
            assert [(m["type"], m["code"], m["description"]) for m in messages] == [("Error", "UNAUTHORIZED", description)]
            assert (code, reason) == (4001, "UNAUTHORIZED")
            assert chosen == ("token" if subprotocols else None)

        # Every refusal is counted (relay_refusals, Refusal rows via the heartbeat), header or not.
        assert refusal_counts(server).get("UNAUTHORIZED") == 6
        assert refusal_rows(env["DATABASE_URL"], "UNAUTHORIZED", 6) == 6
        log = open(server.log.name).read()
        for request_id in request_ids:
            (line,) = [line for line in log.splitlines() if request_id in line]
            assert "event=stream_refused" in line and "code=UNAUTHORIZED" in line and "status=401" in line, line
        assert KEY not in log


def mint_revoked_token(env: dict[str, str]) -> str:
    full = {**os.environ, "DJANGO_DEBUG": "1", **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    code = ("from django.utils import timezone; from relay.live.auth import token_create; "
            "token, key = token_create(name='gone'); token.revoked_at = timezone.now(); token.save(); print(key)")
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_a_revoked_token_is_refused_at_the_handshake_even_with_auth_off(tmp_path):
    env = sqlite_env(tmp_path)
    key = mint_revoked_token(env)
    with LiveServer({**env, "RELAY_REQUIRE_AUTH": "0"}, log_name="daphne-revoked") as server:
        url = server.ws_url + QUERY
        check_401(refused_at_handshake(url, {"Authorization": f"Token {key}"}), "The API token was revoked.")
        messages, code, reason, _ = refused_after_accept(url, ["token", key])
        assert [m["code"] for m in messages] == ["UNAUTHORIZED"] and (code, reason) == (4001, "UNAUTHORIZED")
        # An unknown key in the header is still served with auth off (UNKNOWN_CREDENTIALS_IGNORED).
        async def served() -> str:
            async with websockets.connect(url, additional_headers={"Authorization": f"Token {KEY}"}) as ws:
                return json.loads(await ws.recv())["type"]

        assert asyncio.run(served()) == "Connected"
        assert refusal_counts(server).get("UNAUTHORIZED") == 2
        assert key not in open(server.log.name).read()


def test_too_many_attempts_get_429_with_a_header_and_error_4029_without(tmp_path):
    """Deepgram answers too many requests with 429 at the handshake (its JS SDK then does not retry,
    as it retries a 4029 close); a browser still reads Error RATE_LIMITED."""
    env = {**sqlite_env(tmp_path), "RELAY_CONNECTS_PER_MINUTE": "2"}
    with LiveServer(env, log_name="daphne-rate") as server:
        url = server.ws_url + QUERY
        headers = {"Authorization": f"Token {KEY}"}  # unknown, served as anonymous: auth is off

        async def served() -> str:
            async with websockets.connect(url, additional_headers=headers) as ws:
                return json.loads(await ws.recv())["type"]

        assert [asyncio.run(served()) for _ in range(2)] == ["Connected", "Connected"]
        response = refused_at_handshake(url, headers).response
        assert (response.status_code, response.reason_phrase) == (429, "Too Many Requests")
        body = json.loads(bytes(response.body))
        assert (body["err_code"], body["err_msg"]) == ("RATE_LIMITED", "Too many connection attempts from this address; try again in a minute.")
        messages, code, reason, _ = refused_after_accept(url)
        assert [m["code"] for m in messages] == ["RATE_LIMITED"] and (code, reason) == (4029, "RATE_LIMITED")
        assert refusal_counts(server).get("RATE_LIMITED") == 2
