"""Webhooks and the REST API against a real daphne: a receiver started by the test (a real local
HTTP server) gets ``session.ended`` with a valid signature a few seconds after the last close of
a real WebSocket session; a receiver that fails twice gets it on the third attempt; the API token
that streamed fetches its own transcript; the external worker (``manage.py relay_worker``) does
the same job when daphne runs with ``RELAY_WORKER=external``; a session whose daphne was killed
(``kill -9``) still gets ``session.ended``."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support.audio import silence, tone
from tests.support.live import ROOT, LiveServer, sqlite_env
from tests.support.receiver import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.live]

FAST = {"RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS": "1", "RELAY_WORKER_POLL_SECONDS": "0.2", "RELAY_WEBHOOK_BACKOFF_SECONDS": "0.5"}


def make_user_and_token(env: dict[str, str], username: str) -> str:
    """A user and an API token in the live server's database; returns the key."""
    code = (
        "from django.contrib.auth.models import User; from relay.live.auth import token_create; "
        f"u = User.objects.create_user({username!r}, email='{username}@example.com'); print(token_create(name='backend', user=u)[1])"
    )
    full = {**os.environ, **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def api(server: LiveServer, key: str, method: str, path: str, body: dict | None = None) -> dict | list:
    request = urllib.request.Request(server.http_url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


async def speak(url: str, key: str) -> str:
    """One real WebSocket session signed in with the token: two turns, CloseStream; its id."""
    import websockets

    async with websockets.connect(url, additional_headers={"Authorization": f"Token {key}"}, max_size=None) as ws:
        connected = json.loads(await ws.recv())
        audio = (tone(0.75) + silence(0.7)) * 2
        for i in range(0, len(audio), 2560):
            await ws.send(audio[i:i + 2560])
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for _ in ws:
            pass
    return connected["session_id"]


def test_session_ended_reaches_a_real_receiver_signed_and_a_failing_one_after_retries(tmp_path):
    env = {**sqlite_env(tmp_path), **FAST}
    key = make_user_and_token(env, "olive")
    with LiveServer(env) as server, Receiver() as good, Receiver(statuses=[500, 502]) as flaky:
        made = api(server, key, "POST", "/api/v1/webhooks/", {"url": good.url, "events": ["session.ended"]})
        good.secret = made["secret"]
        flaky_hook = api(server, key, "POST", "/api/v1/webhooks/", {"url": flaky.url, "events": ["session.ended"]})
        flaky.secret = flaky_hook["secret"]
        session_id = asyncio.run(speak(server.ws_url + "/v2/listen?session=hooked", key))
        closed_at = time.monotonic()
        got = good.wait_for(lambda r: len(r) >= 1, timeout=30)[0]
        took = time.monotonic() - closed_at
        assert got.signature_ok is True and got.headers["x-relay-event"] == "session.ended"
        data = got.json["data"]
        assert data["session"]["id"] == session_id == "hooked" and data["session"]["owner"] == "olive"
        assert [t["transcript"] for t in data["turns"]] == ["one two three", "one two three"]
        assert "worker_started" in server.output()  # RELAY_WORKER=inline (the default): a thread of daphne
        print(f"session.ended received {took:.2f} s after the close (debounce 1 s, poll 0.2 s)")

        flaky.wait_for(lambda r: len(r) == 3, timeout=30)
        assert [r.status for r in flaky.received] == [500, 502, 200] and all(r.signature_ok for r in flaky.received)
        deliveries = api(server, key, "GET", f"/api/v1/webhooks/{flaky_hook['id']}/deliveries/")["results"]
        for _ in range(50):  # the receiver answered before the worker recorded it
            if deliveries[0]["status"] == "delivered":
                break
            time.sleep(0.1)
            deliveries = api(server, key, "GET", f"/api/v1/webhooks/{flaky_hook['id']}/deliveries/")["results"]
        assert len(deliveries) == 1 and deliveries[0]["status"] == "delivered" and deliveries[0]["attempts"] == 3

        # The token that streamed reads its own session's transcript.
        turns = api(server, key, "GET", "/api/v1/sessions/hooked/turns/")
        assert [t["transcript"] for t in turns["results"]] == ["one two three", "one two three"]
        with urllib.request.urlopen(urllib.request.Request(server.http_url + "/api/v1/sessions/hooked/transcript/?fmt=txt",
                                                           headers={"Authorization": f"Token {key}"}), timeout=10) as response:
            assert response.read().decode() == "one two three\none two three\n"
        # And its usage is counted, per user and per token.
        for _ in range(100):
            counted = api(server, key, "GET", "/api/v1/usage/")
            if counted["totals"]["connections"]:
                break
            time.sleep(0.1)
        assert counted["totals"]["sessions"] == 1 and counted["totals"]["turns"] == 2 and counted["totals"]["audio_minutes"] > 0
        assert [t["token_name"] for t in counted["tokens"]] == ["backend"]


def test_the_external_worker_command_delivers(tmp_path):
    env = {**sqlite_env(tmp_path), **FAST, "RELAY_WORKER": "external"}
    key = make_user_and_token(env, "walt")
    full = {**os.environ, **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    with LiveServer(env) as server, Receiver() as receiver:
        receiver.secret = api(server, key, "POST", "/api/v1/webhooks/", {"url": receiver.url, "events": ["session.ended"]})["secret"]
        asyncio.run(speak(server.ws_url + "/v2/listen?session=external", key))
        # Nothing in daphne delivers (RELAY_WORKER=external); the worker, started only now, must.
        worker = subprocess.Popen([sys.executable, "manage.py", "relay_worker", "--poll", "0.2"], cwd=ROOT, env=full,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            got = receiver.wait_for(lambda r: len(r) >= 1, timeout=30)[0]
        finally:
            worker.terminate()
            out, _ = worker.communicate(timeout=20)
        assert got.signature_ok and got.json["data"]["session"]["id"] == "external"
        assert worker.returncode == 0, out
        assert "worker_started" not in server.output()  # daphne ran no worker thread
        assert "worker_stopped" in out


@pytest.mark.postgres
def test_two_daphne_processes_with_inline_workers_send_each_event_once():
    """Two workers at once (the inline thread of each process) on one PostgreSQL: every
    session.ended reaches the receiver once; deliveries are claimed before they are sent."""
    from tests.support.services import postgres_database

    with postgres_database() as db_url:
        env = {"DATABASE_URL": db_url, **FAST}
        key = make_user_and_token(env, "pat")
        with LiveServer(env, log_name="w1") as p1, LiveServer(env, log_name="w2") as p2, Receiver() as receiver:
            receiver.secret = api(p1, key, "POST", "/api/v1/webhooks/", {"url": receiver.url, "events": ["session.ended"]})["secret"]

            async def four() -> None:
                await asyncio.gather(*(speak((p1 if n % 2 else p2).ws_url + f"/v2/listen?session=pg-{n}", key) for n in range(4)))

            asyncio.run(four())
            receiver.wait_for(lambda r: len({x.json["data"]["session"]["id"] for x in r}) == 4, timeout=60)
            hook = api(p1, key, "GET", "/api/v1/webhooks/")["results"][0]
            for _ in range(100):
                deliveries = api(p2, key, "GET", f"/api/v1/webhooks/{hook['id']}/deliveries/")["results"]
                if len(deliveries) == 4 and all(d["status"] == "delivered" for d in deliveries):
                    break
                time.sleep(0.1)
            assert sorted(d["session_id"] for d in deliveries) == [f"pg-{n}" for n in range(4)]
            assert all(d["attempts"] == 1 for d in deliveries)
            assert len(receiver.received) == 4 and all(r.signature_ok for r in receiver.received)
            assert "worker_started" in p1.output() and "worker_started" in p2.output()


def test_session_ended_arrives_when_the_daphne_serving_it_is_killed(tmp_path):
    """kill -9 of the daphne serving the session's only connection, after a turn: nothing writes
    its close, yet the worker (``manage.py relay_worker``, which survives the kill) sends
    ``session.ended`` once the process has been silent three heartbeats plus the debounce, marked
    lost, and counts the connection in usage."""
    import websockets

    env = {**sqlite_env(tmp_path), **FAST, "RELAY_WORKER": "external", "RELAY_HEARTBEAT_SECONDS": "1"}
    key = make_user_and_token(env, "kim")
    full = {**os.environ, **env}
    full.pop("DJANGO_SETTINGS_MODULE", None)
    with LiveServer(env) as server, Receiver() as receiver:
        receiver.secret = api(server, key, "POST", "/api/v1/webhooks/", {"url": receiver.url, "events": ["session.ended"]})["secret"]
        worker = subprocess.Popen([sys.executable, "manage.py", "relay_worker", "--poll", "0.2"], cwd=ROOT, env=full,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        async def speak_then_die() -> dict:
            async with websockets.connect(server.ws_url + "/v2/listen?session=killed", additional_headers={"Authorization": f"Token {key}"}) as ws:
                connected = json.loads(await ws.recv())
                audio = tone(0.75) + silence(0.7)
                for i in range(0, len(audio), 2560):
                    await ws.send(audio[i:i + 2560])
                async for raw in ws:  # the turn is stored before its EndOfTurn is sent
                    if isinstance(raw, str) and json.loads(raw).get("event") == "EndOfTurn":
                        break
                server.kill()
                try:
                    await asyncio.wait_for(ws.recv(), timeout=10)
                except (websockets.ConnectionClosed, asyncio.TimeoutError):
                    pass
            return connected

        try:
            connected = asyncio.run(speak_then_die())
            killed_at = time.monotonic()
            got = receiver.wait_for(lambda r: len(r) >= 1, timeout=60)[0]
            took = time.monotonic() - killed_at
            code = ("from relay.api.models import ConnectionUsage; "
                    f"u = ConnectionUsage.objects.filter(connection_id={connected['connection_id']!r}, counted_at__isnull=False).first(); "
                    "print(u.turns if u else None)")
            for _ in range(50):  # usage is counted in the same pass or the next one
                out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=full, capture_output=True, text=True, check=True)
                counted_turns = out.stdout.strip().splitlines()[-1]
                if counted_turns != "None":
                    break
                time.sleep(0.2)
            time.sleep(1.5)  # a second delivery (a rescan, the other cursor) would come within a few polls
        finally:
            worker.terminate()
            output, _ = worker.communicate(timeout=20)
        assert got.signature_ok is True and got.headers["x-relay-event"] == "session.ended", output
        data = got.json["data"]
        assert data["session"]["id"] == "killed" and data["last_connection_id"] == connected["connection_id"]
        assert data["last_connection_lost"] is True
        assert [t["transcript"] for t in data["turns"]] == ["one two three"]
        assert counted_turns == "1"
        assert len(receiver.received) == 1
        print(f"session.ended received {took:.2f} s after kill -9 (heartbeat 1 s, debounce 1 s, poll 0.2 s)")
