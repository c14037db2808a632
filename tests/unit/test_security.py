"""Security and limits: API tokens, required auth, Origin, rate limits, caps, production settings."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model

from relay.live import admission as load
from relay.live import auth
from relay.models import ApiToken, Session
from tests.support.audio import silence, tone
from tests.support.clock import FakeClock
from tests.support.live import ROOT
from tests.support.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)


async def refused(client: Client) -> tuple[int, str]:
    await client.comm.connect()
    code, seen = await client.expect_close()
    return code, seen[-1]["code"]


async def test_token_in_header_or_subprotocol_and_required_auth(settings):
    settings.RELAY_REQUIRE_AUTH = True
    user = await sync_to_async(get_user_model().objects.create_user)("svc", password="x-Relay-123")
    token, key = await sync_to_async(auth.token_create)(name="ci", user=user)
    assert key not in str(await sync_to_async(lambda: list(ApiToken.objects.values()))())  # only the digest is stored

    assert await refused(Client("/v2/listen")) == (4001, "UNAUTHORIZED")
    assert await refused(Client("/v2/listen", headers=[(b"authorization", b"Token nope")])) == (4001, "UNAUTHORIZED")

    c = Client("/v2/listen?session=tok", headers=[(b"authorization", f"Token {key}".encode())])
    assert (await c.connect())["type"] == "Connected"
    await c.disconnect()
    assert (await sync_to_async(Session.objects.get)(pk="tok")).owner_id == user.pk

    browser = Client("/v2/listen?session=tok", subprotocols=["token", key])
    connected, subprotocol = await browser.comm.connect()
    assert connected and subprotocol == "token"
    await browser.disconnect()

    await sync_to_async(ApiToken.objects.filter(pk=token.pk).update)(revoked_at="2026-01-01T00:00:00Z")
    assert await refused(Client("/v2/listen", headers=[(b"authorization", f"Bearer {key}".encode())])) == (4001, "UNAUTHORIZED")


async def test_connection_attempts_per_address_are_limited(settings):
    settings.RELAY_CONNECTS_PER_MINUTE = 3
    for _ in range(3):
        c = Client()
        await c.connect()
        await c.disconnect()
    assert await refused(Client()) == (4029, "RATE_LIMITED")


async def test_streams_per_process_are_capped_and_existing_ones_unharmed(settings):
    settings.RELAY_MAX_STREAMS_PER_PROCESS = 1
    first = Client("/v2/listen?session=cap-a")
    await first.connect()
    assert await refused(Client("/v2/listen?session=cap-b")) == (4013, "CAPACITY")
    await first.send_audio(tone(0.5) + silence(0.7))
    assert (await first.recv_turn_end())["transcript"] == "one two"
    await first.disconnect()
    again = Client("/v2/listen?session=cap-b")
    assert (await again.connect())["type"] == "Connected"
    await again.disconnect()


async def block_loop(seconds: float, times: int) -> None:
    """Keep the event loop busy, as a process with more work than CPU would."""
    for _ in range(times):
        time.sleep(seconds)
        await asyncio.sleep(0.11)  # let the lag watcher take a (late) sample


@pytest.fixture
def clock():
    """The admission measurements' clock, moved by hand (restored afterwards)."""
    fake = FakeClock()
    load.use_clock(fake)
    yield fake
    load.use_clock(time.monotonic)


async def test_a_process_whose_event_loop_runs_late_refuses_new_streams_only(settings, clock):
    settings.RELAY_MAX_LOOP_LAG_MS = 50
    settings.RELAY_MAX_WRITE_LATENCY_MS = 0  # this test is about the loop
    first = Client("/v2/listen?session=lag-a")
    await first.connect()  # starts the watch
    assert not load.overloaded()
    await block_loop(0.3, 4)
    assert load.lag_ms() > 50 and load.overloaded()
    code, seen = await refused_with(Client("/v2/listen?session=lag-b"))
    assert (code, seen["code"]) == (4013, "CAPACITY") and "overloaded" in seen["description"]
    await first.send_audio(tone(0.5) + silence(0.7))  # the open stream goes on
    assert (await first.recv_turn_end())["transcript"] == "one two"
    settings.RELAY_MAX_LOOP_LAG_MS = 0  # off: the same lag refuses no one
    assert load.lag_ms() > 50 and not load.overloaded()
    settings.RELAY_MAX_LOOP_LAG_MS = 50
    clock.advance(load.WINDOW + 0.3)  # the late samples age out
    assert not load.overloaded()
    again = Client("/v2/listen?session=lag-b")
    assert (await again.connect())["type"] == "Connected"
    await again.disconnect()
    await first.disconnect()


async def test_a_process_whose_database_writes_lag_refuses_new_streams_only(settings, clock):
    settings.RELAY_MAX_LOOP_LAG_MS = 0
    settings.RELAY_MAX_WRITE_LATENCY_MS = 100
    first = Client("/v2/listen")
    await first.connect()
    assert load.write_latency_ms() == 0  # a connect's own rows do not count (a burst is served)
    await first.send_audio(tone(0.5) + silence(0.7))
    await first.recv_turn_end()
    assert 0 < load.write_latency_ms() < 100  # the turn's index and row were timed
    for _ in range(20):  # turn writes that waited a quarter second behind a saturated process
        load.note_write(0.25)
    assert "database writes" in load.overloaded()
    code, seen = await refused_with(Client("/v2/listen"))
    assert (code, seen["code"]) == (4013, "CAPACITY") and "database writes take" in seen["description"]
    await first.send_audio(tone(0.5) + silence(0.7))  # the open stream goes on
    assert (await first.recv_turn_end())["transcript"] == "one two"
    clock.advance(load.WINDOW + load.BUCKET + 0.1)  # the slow writes age out
    assert load.overloaded() == ""
    again = Client("/v2/listen")
    assert (await again.connect())["type"] == "Connected"
    await again.disconnect()
    await first.disconnect()


async def test_the_flush_of_closing_streams_is_not_counted_as_load(settings, clock):
    """A mass disconnect stores every open turn at once; that queue must not refuse the reconnects."""
    timed_writes = load.writes_counted

    c = Client("/v2/listen")
    await c.connect()
    await c.send_audio(tone(0.5))  # a turn opens (its index write is timed) and stays open
    await c.recv_until(lambda m: m.get("event") == "Update")
    assert timed_writes() == 1
    await c.disconnect()  # the open turn is stored on the way out: untimed
    await asyncio.sleep(0.2)
    assert timed_writes() == 1
    again = Client("/v2/listen")
    await again.connect()
    await again.send_audio(tone(0.5) + silence(0.7))
    await again.recv_turn_end()
    assert timed_writes() == 3  # an open stream's index and finished turn count
    await again.disconnect()


async def refused_with(client: Client) -> tuple[int, dict]:
    await client.comm.connect()
    code, seen = await client.expect_close()
    return code, seen[-1]


async def test_configure_rate_is_limited(settings):
    settings.RELAY_CONFIGURES_PER_MINUTE = 2
    c = Client()
    await c.connect()
    for _ in range(2):
        await c.send_json({"type": "Configure", "thresholds": {"eot_threshold": 0.8}})
        assert (await c.recv())["type"] == "ConfigureSuccess"
    await c.send_json({"type": "Configure", "thresholds": {"eot_threshold": 0.8}})
    code, seen = await c.expect_close()
    assert code == 4029 and seen[-1]["code"] == "RATE_LIMITED"


@pytest.mark.parametrize(
    "env,message",
    [
        ({"DJANGO_DEBUG": "0", "DJANGO_ALLOWED_HOSTS": "relay.example"}, "DJANGO_SECRET_KEY"),
        ({"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "k" * 50}, "DJANGO_ALLOWED_HOSTS"),
    ],
)
def test_production_settings_refuse_to_start_without_secrets(env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True
    )
    assert result.returncode != 0 and message in result.stderr


def test_production_settings_start_with_them_and_set_tls_headers():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env = {**clean, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "k" * 50, "DJANGO_ALLOWED_HOSTS": "relay.example", "RELAY_BEHIND_TLS": "1"}
    code = "from django.conf import settings as s; print(s.SESSION_COOKIE_SECURE, s.SECURE_HSTS_SECONDS > 0, s.DEBUG)"
    result = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["True", "True", "False"]


def test_admin_is_staff_only(client, django_user_model):
    assert client.get("/admin/").status_code == 302
    django_user_model.objects.create_user("plain", password="x-Relay-123")
    client.login(username="plain", password="x-Relay-123")
    assert client.get("/admin/").status_code == 302


async def test_connects_without_a_login_cookie_skip_the_user_lookup(monkeypatch):
    import channels.auth

    looked_up = []
    real = channels.auth.get_user

    async def counting(scope):
        looked_up.append(scope.get("cookies"))
        return await real(scope)

    monkeypatch.setattr(channels.auth, "get_user", counting)
    c = Client("/v2/listen")
    assert (await c.connect())["type"] == "Connected"
    await c.disconnect()
    assert looked_up == []  # anonymous without a database hop
    c = Client("/v2/listen", headers=[(b"cookie", b"sessionid=not-a-real-session")])
    assert (await c.connect())["type"] == "Connected"
    await c.disconnect()
    assert len(looked_up) == 1  # a login cookie is still resolved the usual way


async def test_with_auth_off_an_unknown_key_is_served_as_anonymous_and_told(settings, caplog):
    settings.RELAY_REQUIRE_AUTH = False
    key = "dg-made-up-key-0123456789"
    c = Client("/v2/listen?session=anon-key", headers=[(b"authorization", f"Token {key}".encode())])
    assert (await c.connect())["type"] == "Connected"
    warning = await c.recv()
    assert (warning["type"], warning["code"]) == ("Warning", "UNKNOWN_CREDENTIALS_IGNORED")
    await c.disconnect()
    assert (await sync_to_async(Session.objects.get)(pk="anon-key")).owner_id is None
    assert "unknown_credentials_ignored" in caplog.text and key not in caplog.text


async def test_with_auth_off_a_relay_token_signs_in_and_a_revoked_one_is_refused(settings):
    settings.RELAY_REQUIRE_AUTH = False
    user = await sync_to_async(get_user_model().objects.create_user)("svc2", password="x-Relay-123")
    token, key = await sync_to_async(auth.token_create)(name="ci", user=user)
    c = Client("/v2/listen?session=tok-off", headers=[(b"authorization", f"Token {key}".encode())])
    assert (await c.connect())["type"] == "Connected"
    await c.send_json({"type": "KeepAlive"})
    await c.disconnect()
    assert not [m for m in c.messages if m.get("code") == "UNKNOWN_CREDENTIALS_IGNORED"]
    assert (await sync_to_async(Session.objects.get)(pk="tok-off")).owner_id == user.pk
    await sync_to_async(ApiToken.objects.filter(pk=token.pk).update)(revoked_at="2026-01-01T00:00:00Z")
    assert await refused(Client("/v2/listen", headers=[(b"authorization", f"Token {key}".encode())])) == (4001, "UNAUTHORIZED")
