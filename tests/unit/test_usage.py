"""Usage analytics: each closed connection counted once into its user's and its token's day, from
the rows the relay writes anyway; the consumer's one hook (API-token connections); the usage
page; the dashboard's top users and tokens; the worker command."""
from __future__ import annotations

from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone

from relay.api import usage
from relay.api.models import ConnectionUsage, UsageDaily, WebhookEndpoint, WorkerCursor
from relay.live.auth import token_create
from relay.ops import dashboard
from tests.support import histories
from tests.support.audio import silence, tone

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _cursor():
    WorkerCursor.objects.create(name=usage.CURSOR, at=timezone.now() - timedelta(hours=1))


@pytest.fixture
def owner():
    return User.objects.create_user("olive", password="pw-olive-123")


def closed(sid, *, user=None, token=None, resumed=False, audio=30.0, errors=0, texts=("a", "b"), ago=60.0, session=None):
    s = session or histories.session(sid, owner=user, created=timezone.now() - timedelta(seconds=ago + 100))
    c = histories.connection(s, opened=timezone.now() - timedelta(seconds=ago + 30), duration=30, user=user, resumed=resumed,
                             audio_seconds=audio, error_count=errors)
    histories.turns(s, c, list(texts), start_index=s.turns.count())
    if token is not None:
        usage.connection_token_note(connection_id=str(c.pk), token_id=token.pk, user_id=user.pk if user else None)
    return s, c


def test_closed_connections_are_counted_once_per_user_token_and_day(owner):
    token, _ = token_create(name="backend", user=owner)
    s, _ = closed("s1", user=owner, token=token, audio=90.0, errors=1, texts=["one", "two", "three"])
    closed("s1", user=owner, resumed=True, audio=30.0, texts=["four"], session=s)  # a reconnect: no new session
    closed("anon", audio=600.0)  # anonymous: in nobody's usage
    live = histories.session("open", owner=owner)
    histories.connection(live, opened=timezone.now(), duration=None, user=owner, audio_seconds=5.0)
    assert usage.usage_count_closed() == 3
    today = timezone.localdate()
    row = UsageDaily.objects.get(kind="user", user=owner, day=today)
    assert (row.audio_seconds, row.sessions, row.connections, row.turns, row.errors) == (120.0, 1, 2, 4, 1)
    row = UsageDaily.objects.get(kind="token", token=token, day=today)
    assert (row.audio_seconds, row.sessions, row.connections, row.turns, row.errors) == (90.0, 1, 1, 3, 1)
    WorkerCursor.objects.filter(name=usage.CURSOR).update(at=timezone.now() - timedelta(hours=1))
    assert usage.usage_count_closed() == 0  # a rescan counts nothing twice
    assert UsageDaily.objects.get(kind="user", user=owner).connections == 2


def test_a_close_is_counted_in_the_day_it_closed(owner):
    closed("yesterday", user=owner, ago=86400 * 1.0 + 60)
    WorkerCursor.objects.filter(name=usage.CURSOR).update(at=timezone.now() - timedelta(days=2))
    usage.usage_count_closed()
    days = list(UsageDaily.objects.filter(user=owner).values_list("day", flat=True))
    assert days == [timezone.localdate(timezone.now() - timedelta(seconds=86400 + 60))]


def test_a_connection_lost_with_its_process_is_counted_once_when_its_process_is_gone(owner, settings):
    """kill -9: the row never closes. Counted once its process has been silent three heartbeats,
    in the day of its last heartbeat, with the audio its stored turns prove the engine heard
    (the row's counters are written at close); one on a live process waits."""
    settings.RELAY_HEARTBEAT_SECONDS = 15.0
    token, _ = token_create(name="backend", user=owner)
    dead = histories.process("test-host:66:killed", heartbeat_age=86400 + 60)
    beating = histories.process("test-host:67:live", heartbeat_age=20)
    s = histories.session("lost", owner=owner, created=dead.heartbeat_at - timedelta(minutes=5))
    c = histories.connection(s, opened=s.created_at, duration=None, proc=dead, user=owner)
    histories.turns(s, c, ["one", "two", "three"])  # audio windows end at 1.5, 3.5, 5.5 s
    usage.connection_token_note(connection_id=str(c.pk), token_id=token.pk, user_id=owner.pk)
    other = histories.session("going", owner=owner)
    histories.connection(other, opened=timezone.now(), duration=None, proc=beating, user=owner)
    histories.connection(other, opened=timezone.now(), duration=None, user=owner)  # its process row deleted: unknowable
    WorkerCursor.objects.create(name=usage.LOST_CURSOR, at=timezone.now() - timedelta(days=2))
    assert usage.usage_count_lost() == 1
    WorkerCursor.objects.filter(name=usage.LOST_CURSOR).update(at=timezone.now() - timedelta(days=3))
    assert usage.usage_count_lost() == 0 and usage.usage_count_closed() == 0  # counted once, by either scan
    row = UsageDaily.objects.get(kind="user", user=owner)
    assert row.day == timezone.localdate(dead.heartbeat_at)
    assert (row.audio_seconds, row.sessions, row.connections, row.turns) == (5.5, 1, 1, 3)
    assert UsageDaily.objects.get(kind="token", token=token).connections == 1


def test_usage_for_user_and_top():
    a = User.objects.create_user("alice")
    b = User.objects.create_user("bob")
    token, _ = token_create(name="heavy", user=b)
    closed("a1", user=a, audio=60.0)
    closed("b1", user=b, token=token, audio=600.0)
    usage.usage_count_closed()
    top = usage.usage_top(days=1)
    assert [u["name"] for u in top["users"]] == ["bob", "alice"] and top["users"][0]["audio_minutes"] == 10.0
    assert top["tokens"][0]["name"].startswith("heavy (rly_") and top["tokens"][0]["owner"] == "bob"
    mine = usage.usage_for_user(user=a, period=usage.Period.last_days(7))
    assert mine["totals"]["audio_minutes"] == 1.0 and mine["tokens"] == []


def test_the_dashboard_shows_top_users_and_tokens(client):
    staff = User.objects.create_user("root", password="pw-root-123", is_staff=True, is_superuser=True)
    token, _ = token_create(name="heavy", user=staff)
    closed("s", user=staff, token=token, audio=120.0)
    usage.usage_count_closed()
    assert dashboard.dashboard_data(window_key="24h").top_usage["users"][0]["name"] == "root"
    client.login(username="root", password="pw-root-123")
    html = client.get("/admin/relay/session/dashboard/").content.decode()
    assert 'id="top-users"' in html and 'id="top-tokens"' in html and "heavy (rly_" in html


def test_usage_page(client, owner):
    token, _ = token_create(name="backend", user=owner)
    closed("s", user=owner, token=token, audio=150.0)
    usage.usage_count_closed()
    WebhookEndpoint.objects.create(user=owner, url="https://dead.example/", secret="x" * 20, events=["session.ended"], is_active=False,
                                   disabled_at=timezone.now(), disabled_reason="Disabled after 20 failed attempts in a row")
    assert client.get("/account/usage/").status_code == 302  # sign in first
    client.login(username="olive", password="pw-olive-123")
    response = client.get("/account/usage/", {"days": 7})
    html = response.content.decode()
    assert response.status_code == 200 and "relay/demo.css" in html
    assert "2.5 min" in html and "backend" in html and 'id="disabled-webhooks"' in html and "https://dead.example/" in html


def test_admin_lists_usage_endpoints_and_deliveries(client):
    User.objects.create_user("root", password="pw-root-123", is_staff=True, is_superuser=True)
    client.login(username="root", password="pw-root-123")
    for path in ("/admin/relay_api/usagedaily/", "/admin/relay_api/webhookendpoint/", "/admin/relay_api/webhookdelivery/"):
        assert client.get(path).status_code == 200, path


def test_worker_command_once(owner, capsys):
    closed("s", user=owner)
    call_command("relay_worker", "--once")
    assert "counted 1 connections" in capsys.readouterr().out
    assert UsageDaily.objects.filter(user=owner).exists()


async def test_the_consumer_notes_the_api_token_of_a_connection():
    """In-process WebSocket with a relay token: its connection is attributed to the token."""
    from tests.support.wsclient import Client

    user = await sync_to_async(User.objects.create_user)("tok")
    _, key = await sync_to_async(token_create)(name="sdk", user=user)
    client = Client(headers=[(b"authorization", f"Token {key}".encode())])
    connected = await client.connect()
    await client.send_audio(tone(0.6) + silence(0.8))
    await client.recv_turn_end()
    await client.disconnect()

    def noted():
        return ConnectionUsage.objects.filter(connection_id=connected["connection_id"], token__name="sdk", user=user).exists()

    for _ in range(100):
        if await sync_to_async(noted)():
            break
        import asyncio
        await asyncio.sleep(0.05)
    assert await sync_to_async(noted)()
    anonymous = Client()
    other = await anonymous.connect()
    await anonymous.disconnect()
    assert not await sync_to_async(ConnectionUsage.objects.filter(connection_id=other["connection_id"]).exists)()
