"""Relay A's deepgram engine pointed at relay B's /v2/listen: two real daphne processes.

B runs the fake engine and requires nothing but accepts (and checks) an API token, so A signs in
with a token minted in B's database. A client of A gets B's turns, numbered and stored by A.
"""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys

import pytest
import websockets

from tests.support.audio import chunks, silence, tone
from tests.support.live import ROOT, LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]

FAST = {
    "RELAY_UPSTREAM_STALL_SECONDS": "2",
    "RELAY_UPSTREAM_BACKOFF_INITIAL_SECONDS": "0.05",
    "RELAY_UPSTREAM_BACKOFF_MAX_SECONDS": "0.2",
    "RELAY_UPSTREAM_FALLBACK_AFTER_SECONDS": "1",
    "RELAY_UPSTREAM_FALLBACK_ENGINE": "fake",
}


def database(tmp_path, name: str) -> dict[str, str]:
    path = tmp_path / name
    path.mkdir()
    return sqlite_env(path)


def mint_token(env: dict[str, str]) -> str:
    """An API token in relay B's database (the key is printed once, like the admin shows it)."""
    full = {**os.environ, "DJANGO_DEBUG": "1", **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    code = "from relay.live.auth import token_create; print(token_create(name='relay-a')[1])"
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def relay_a(b: LiveServer, env: dict[str, str], key: str) -> LiveServer:
    return LiveServer(
        {**env, **FAST, "RELAY_ENGINE": "deepgram", "DEEPGRAM_URL": b.ws_url + "/v2/listen", "DEEPGRAM_API_KEY": key},
        log_name="relay-a",
    )


async def stream(url: str, audio: bytes, *, close: bool = True) -> tuple[list[dict], int | None]:
    """Send ``audio`` (then CloseStream if ``close``) and read until the relay closes."""
    messages = []
    async with websockets.connect(url, max_size=None) as ws:
        messages.append(json.loads(await ws.recv()))
        try:
            for chunk in chunks(audio):
                await ws.send(chunk)
            if close:
                await ws.send(json.dumps({"type": "CloseStream"}))
            async for raw in ws:
                messages.append(json.loads(raw))
        except websockets.ConnectionClosedError:
            pass  # an Error close (4xxx); the code is checked by the caller
    return messages, ws.close_code


def rows(env: dict[str, str], sql: str) -> list[tuple]:
    return sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite:///")).execute(sql).fetchall()


def test_a_client_of_relay_a_gets_relay_b_turns(tmp_path):
    env_a, env_b = database(tmp_path, "a"), database(tmp_path, "b")
    key = mint_token(env_b)
    audio = (tone(0.75) + silence(0.7)) * 2 + tone(0.5)
    with LiveServer(env_b, log_name="relay-b") as b, relay_a(b, env_a, key) as a:
        messages, code = asyncio.run(stream(a.ws_url + "/v2/listen?session=chain", audio))
        assert code == 1000 and messages[0]["type"] == "Connected" and messages[0]["engine"] == "deepgram"
        ends = [m for m in messages if m.get("event") == "EndOfTurn"]
        assert [(e["turn_index"], e["transcript"], e["trigger"]) for e in ends] == [
            (0, "one two three", "model"),
            (1, "one two three", "model"),
            (2, "one two", "end_of_stream"),  # B ends its open turn on CloseStream; A relays that
        ]
        assert not [m for m in messages if m["type"] in ("Warning", "Error")]
        assert key not in a.output()
    assert rows(env_a, 'select "index", transcript, trigger from relay_turn where session_id=\'chain\' order by "index"') == [
        (0, "one two three", "model"), (1, "one two three", "model"), (2, "one two", "end_of_stream"),
    ]
    assert rows(env_b, "select engine from relay_connection") == [("fake",)]
    assert [r[0] for r in rows(env_b, 'select transcript from relay_turn order by "index"')] == ["one two three", "one two three", "one two"]


def test_relay_b_refusing_relay_a_key_is_upstream_auth_failed(tmp_path):
    env_a, env_b = database(tmp_path, "a"), database(tmp_path, "b")
    mint_token(env_b)
    # Without RELAY_REQUIRE_AUTH, B would serve an unknown key as anonymous. A sends the key in the
    # Authorization header, so B refuses at the handshake with HTTP 401, as Deepgram does, and A
    # says so instead of Connected.
    with LiveServer({**env_b, "RELAY_REQUIRE_AUTH": "1"}, log_name="relay-b") as b, relay_a(b, env_a, "rly_not-a-token-of-b") as a:
        messages, code = asyncio.run(stream(a.ws_url + "/v2/listen", tone(0.5), close=False))
        assert code == 4011 and [m["type"] for m in messages] == ["Error"] and messages[0]["code"] == "UPSTREAM_AUTH_FAILED"
        assert "rly_not-a-token-of-b" not in json.dumps(messages) and "rly_not-a-token-of-b" not in a.output()
        assert "event=stream_refused code=UNAUTHORIZED status=401" in b.output()


def test_relay_b_killed_mid_turn_relay_a_falls_back_and_finishes_the_turn(tmp_path):
    env_a, env_b = database(tmp_path, "a"), database(tmp_path, "b")
    key = mint_token(env_b)

    async def run(a: LiveServer, b: LiveServer) -> tuple[list[dict], int | None]:
        messages = []
        async with websockets.connect(a.ws_url + "/v2/listen?session=crash", max_size=None) as ws:
            messages.append(json.loads(await ws.recv()))
            for chunk in chunks(tone(1.0)):
                await ws.send(chunk)
            while not (messages[-1].get("event") == "Update" and messages[-1]["transcript"] == "one two three four"):
                messages.append(json.loads(await ws.recv()))
            await asyncio.to_thread(b.kill)  # B crashes with A's turn open
            for chunk in chunks(silence(0.8)):
                await ws.send(chunk)
            while not messages[-1].get("event") == "EndOfTurn":
                messages.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "CloseStream"}))
            async for raw in ws:
                messages.append(json.loads(raw))
        return messages, ws.close_code

    with LiveServer(env_b, log_name="relay-b") as b, relay_a(b, env_a, key) as a:
        messages, code = asyncio.run(run(a, b))
    assert code == 1000
    codes = [m["code"] for m in messages if m["type"] == "Warning"]
    assert codes[0] == "UPSTREAM_RECONNECTING" and "UPSTREAM_FALLBACK" in codes
    end = messages[-1] if messages[-1].get("event") == "EndOfTurn" else [m for m in messages if m.get("event") == "EndOfTurn"][-1]
    assert (end["turn_index"], end["transcript"], end["trigger"]) == (0, "one two three four", "model")
    assert rows(env_a, "select transcript from relay_turn where session_id='crash'") == [("one two three four",)]
