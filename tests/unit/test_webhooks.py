"""Webhooks: events derived from closed connections and turn rows, routing to endpoints, real HTTP
deliveries to a local receiver with valid signatures, retries with backoff, failure, disabling
(with the owner told by e-mail), redelivery, and several workers at once."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from relay.api import signing, webhooks, worker
from relay.api.models import ConnectionUsage, WebhookDelivery, WebhookEndpoint, WorkerCursor
from relay.live.auth import token_create
from relay.models import Connection
from tests.support import histories
from tests.support.receiver import Receiver

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "whsec_test-secret-0123456789"


@pytest.fixture(autouse=True)
def _fast(settings):
    settings.RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS = 0.0
    settings.RELAY_WEBHOOK_BACKOFF_SECONDS = 0.0
    settings.RELAY_WEBHOOK_TIMEOUT_SECONDS = 5.0
    settings.RELAY_PUBLIC_URL = "https://relay.example"
    hour_ago = timezone.now() - timedelta(hours=1)
    for name in (webhooks.SESSION_CURSOR, "usage.closed_connections"):
        WorkerCursor.objects.create(name=name, at=hour_ago)
    WorkerCursor.objects.create(name=webhooks.TURN_CURSOR, position=0)


@pytest.fixture
def owner():
    return User.objects.create_user("olive", email="olive@example.com")


def ended(sid: str, *, owner=None, minutes_ago: float = 1.0, texts=("hello there", "bye")):
    s = histories.session(sid, owner=owner, created=timezone.now() - timedelta(minutes=minutes_ago + 1))
    c = histories.connection(s, opened=s.created_at, duration=60)
    histories.turns(s, c, list(texts))
    return s, c


def endpoint(user=None, url="https://hooks.example/x", events=("session.ended",), **fields) -> WebhookEndpoint:
    """An endpoint made an hour ago: it hears of the sessions the tests end "a minute ago"."""
    fields.setdefault("created_at", timezone.now() - timedelta(hours=1))
    return WebhookEndpoint.objects.create(user=user, url=url, secret=SECRET, events=list(events), **fields)


# --- signatures ---------------------------------------------------------------------------------
def test_signature_covers_timestamp_and_body_and_refuses_replays():
    body = b'{"type":"session.ended"}'
    header = signing.signature(secret=SECRET, timestamp=1_800_000_000, body=body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert signing.verify(secret=SECRET, header=header, timestamp="1800000000", body=body, now=1_800_000_010)
    assert not signing.verify(secret=SECRET, header=header, timestamp="1800000000", body=body + b" ", now=1_800_000_010)
    assert not signing.verify(secret=SECRET, header=header, timestamp="1800000001", body=body, now=1_800_000_010)
    assert not signing.verify(secret="other-secret-0123", header=header, timestamp="1800000000", body=body, now=1_800_000_010)
    assert not signing.verify(secret=SECRET, header=header, timestamp="1800000000", body=body, now=1_800_000_000 + 301)  # a replay


# --- session.ended ------------------------------------------------------------------------------
def test_session_ended_is_enqueued_once_with_the_session_and_its_turns(owner):
    hook = endpoint(owner)
    s, c = ended("s1", owner=owner)
    assert webhooks.session_ended_scan() == 1
    delivery = WebhookDelivery.objects.get()
    body = delivery.payload
    assert body["type"] == "session.ended" and body["id"] == str(delivery.pk) and delivery.endpoint == hook
    assert body["data"]["session"]["id"] == "s1" and body["data"]["session"]["owner"] == "olive"
    assert [t["transcript"] for t in body["data"]["turns"]] == ["hello there", "bye"] and not body["data"]["turns_truncated"]
    assert body["data"]["turns_url"] == "https://relay.example/api/v1/sessions/s1/turns/"
    assert body["data"]["last_connection_id"] == str(c.pk)
    WorkerCursor.objects.filter(name=webhooks.SESSION_CURSOR).update(at=timezone.now() - timedelta(hours=1))  # a rescan
    assert webhooks.session_ended_scan() == 0 and WebhookDelivery.objects.count() == 1


def test_long_sessions_carry_a_link_instead_of_every_turn(owner, settings):
    settings.RELAY_WEBHOOK_MAX_TURNS = 2
    endpoint(owner)
    ended("long", owner=owner, texts=["one", "two", "three"])
    webhooks.session_ended_scan()
    data = WebhookDelivery.objects.get().payload["data"]
    assert len(data["turns"]) == 2 and data["turns_truncated"] is True


def test_no_event_while_a_connection_is_live_or_within_the_reconnect_delay(owner, settings):
    endpoint(owner)
    s, _ = ended("busy", owner=owner)
    live = histories.process("test-host:9:live")
    other = histories.connection(s, opened=timezone.now(), duration=None, proc=live)
    assert webhooks.session_ended_scan() == 0
    # It closes now: with a 60 s debounce nothing yet; the reconnect window passes; then the event.
    Connection.objects.filter(pk=other.pk).update(closed_at=timezone.now(), close_code=1000)
    settings.RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS = 60.0
    assert webhooks.session_ended_scan() == 0
    settings.RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS = 0.0
    assert webhooks.session_ended_scan() == 1
    assert WebhookDelivery.objects.get().payload["data"]["last_connection_id"] == str(other.pk)


# --- session.ended for a connection lost with its process (kill -9, a crash) ----------------------
HEARTBEAT = 15.0  # RELAY_HEARTBEAT_SECONDS in these tests: a process is gone after 45 s of silence


def lost_session(sid: str, *, owner=None, silent_for: float = 120.0, pid: str = "test-host:66:killed"):
    """A session whose only connection never closed: its process stopped heartbeating ``silent_for`` ago."""
    proc = histories.process(pid, heartbeat_age=silent_for)
    s = histories.session(sid, owner=owner, created=timezone.now() - timedelta(seconds=silent_for + 60))
    c = histories.connection(s, opened=s.created_at, duration=None, proc=proc, user=owner)
    histories.turns(s, c, ["stored before the crash", "and this one"])
    return s, c, proc


@pytest.fixture
def heartbeat(settings):
    settings.RELAY_HEARTBEAT_SECONDS = HEARTBEAT


def test_a_session_lost_with_its_process_ends_once_and_is_counted_once(owner, heartbeat):
    """The process died (no close written): the worker sends session.ended once, ended at the
    process's last heartbeat and marked lost, and counts the connection in usage once; several
    workers (modelled by scans that start again from old cursors) add nothing."""
    from relay.api import usage
    from relay.api.models import UsageDaily

    with Receiver(secret=SECRET) as receiver:
        endpoint(owner, url=receiver.url)
        s, c, proc = lost_session("crashed", owner=owner)
        receiver.wait_for(lambda got: len(got) == 1, poll=worker.tick)
        for _ in range(2):  # two more workers whose cursors lag: rescans
            WorkerCursor.objects.filter(name__in=[webhooks.SESSION_CURSOR, webhooks.LOST_CURSOR, usage.CURSOR, usage.LOST_CURSOR]).update(
                at=timezone.now() - timedelta(hours=1))
            assert worker.tick().enqueued == 0 and worker.tick().counted == 0
        assert len(receiver.received) == 1
    got = receiver.received[0]
    assert got.signature_ok and got.headers["x-relay-event"] == "session.ended"
    data = got.json["data"]
    assert data["last_connection_id"] == str(c.pk) and data["last_connection_lost"] is True
    ended_at = datetime.fromisoformat(data["ended_at"].replace("Z", "+00:00"))
    assert abs(ended_at - proc.heartbeat_at) < timedelta(milliseconds=1)  # JSON keeps milliseconds
    assert [t["transcript"] for t in data["turns"]] == ["stored before the crash", "and this one"]
    counted = ConnectionUsage.objects.get(connection=c)
    assert counted.counted_at is not None and counted.turns == 2 and counted.audio_seconds == 3.5  # the last turn's audio_window_end
    row = UsageDaily.objects.get(kind="user", user=owner)
    assert (row.connections, row.sessions, row.turns, row.audio_seconds) == (1, 1, 2, 3.5)
    c.refresh_from_db()
    assert c.closed_at is None and c.close_code is None  # no close is invented: the metrics still see a process lost


def test_a_lost_connection_waits_three_heartbeats_and_the_debounce(owner, heartbeat, settings):
    endpoint(owner)
    lost_session("quiet", owner=owner, silent_for=HEARTBEAT + 5, pid="test-host:1:quiet")  # silent one beat: still live
    _, c, _ = lost_session("gone", owner=owner, silent_for=3 * HEARTBEAT + 30)  # gone, 30 s ago
    settings.RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS = 60.0
    assert webhooks.session_ended_scan() == 0  # within the debounce
    settings.RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS = 20.0
    assert webhooks.session_ended_scan() == 1  # past it; the process still heartbeating sends nothing
    assert WebhookDelivery.objects.get().payload["data"]["last_connection_id"] == str(c.pk)


def test_a_lost_connection_then_a_reconnect_that_closes_names_the_last_one(owner, heartbeat):
    """Killed, then the client reconnected to another process and closed normally: one event, for
    the connection that ended last, whichever scan (closed or lost) sees the session first."""
    endpoint(owner)
    s, lost_conn, _ = lost_session("resumed", owner=owner, silent_for=300)
    later = histories.connection(s, opened=timezone.now() - timedelta(seconds=200), duration=100, resumed=True)
    assert webhooks.session_ended_scan() == 1
    data = WebhookDelivery.objects.get().payload["data"]
    assert data["last_connection_id"] == str(later.pk) and data["last_connection_lost"] is False
    # And the other way round: a connection closed, then one lost later ends the session.
    s2, _, _ = lost_session("closed-then-lost", owner=owner, silent_for=60, pid="test-host:67:killed")
    histories.connection(s2, opened=s2.created_at - timedelta(seconds=300), duration=100)
    WorkerCursor.objects.filter(name__in=[webhooks.SESSION_CURSOR, webhooks.LOST_CURSOR]).update(at=timezone.now() - timedelta(hours=1))
    assert webhooks.session_ended_scan() == 1
    data = WebhookDelivery.objects.get(session_id="closed-then-lost").payload["data"]
    assert data["last_connection_lost"] is True


def test_a_lost_connection_beside_a_live_one_sends_nothing(owner, heartbeat):
    endpoint(owner)
    s, _, _ = lost_session("still-going", owner=owner)
    histories.connection(s, opened=timezone.now(), duration=None, proc=histories.process("test-host:9:live"))
    assert webhooks.session_ended_scan() == 0 and WebhookDelivery.objects.count() == 0


def test_routing_user_token_and_staff_wide_endpoints(owner):
    other = User.objects.create_user("oscar")
    token, _ = token_create(name="backend", user=owner)
    mine = endpoint(owner)
    theirs = endpoint(other)
    by_token = endpoint(owner, token=token)
    everything = endpoint(None)
    turns_only = endpoint(owner, events=["turn.finished"])
    _, c1 = ended("by-token", owner=owner)
    ConnectionUsage.objects.create(connection=c1, token=token, user=owner)
    ended("by-login", owner=owner)
    webhooks.session_ended_scan()
    got = {(d.endpoint_id, d.session_id) for d in WebhookDelivery.objects.all()}
    assert got == {(mine.pk, "by-token"), (mine.pk, "by-login"), (by_token.pk, "by-token"),
                   (everything.pk, "by-token"), (everything.pk, "by-login")}
    assert not WebhookDelivery.objects.filter(endpoint__in=[theirs, turns_only]).exists()


def test_an_endpoint_hears_only_of_what_ended_after_it_was_made(owner):
    endpoint(owner, created_at=timezone.now())
    ended("before", owner=owner)
    assert webhooks.session_ended_scan() == 0


def test_disabled_endpoints_get_nothing(owner):
    endpoint(owner, is_active=False)
    ended("s", owner=owner)
    assert webhooks.session_ended_scan() == 0


# --- turn.finished ------------------------------------------------------------------------------
def test_turn_finished_is_opt_in_and_only_for_turns_after_the_endpoint(owner):
    from relay.models import Turn

    s0, _ = ended("before", owner=owner, texts=["old turn"])
    Turn.objects.filter(session=s0).update(created_at=timezone.now() - timedelta(seconds=120))
    assert webhooks.turn_finished_scan() == 0  # nobody listens
    endpoint(owner, events=["turn.finished"], created_at=timezone.now() - timedelta(seconds=30))
    endpoint(owner, events=["session.ended"])  # not subscribed to turns
    s, c = ended("after", owner=owner, texts=["first", "second"])
    Turn.objects.filter(session=s).update(created_at=timezone.now() - timedelta(seconds=5))
    assert webhooks.turn_finished_scan() == 2
    bodies = sorted((d.payload for d in WebhookDelivery.objects.all()), key=lambda b: b["data"]["turn"]["index"])
    assert [b["data"]["turn"]["transcript"] for b in bodies] == ["first", "second"]
    assert {b["type"] for b in bodies} == {"turn.finished"} and bodies[0]["data"]["session"]["id"] == "after"
    assert webhooks.turn_finished_scan() == 0


# --- delivery ------------------------------------------------------------------------------------
def test_delivery_reaches_a_real_receiver_with_a_valid_signature(owner):
    with Receiver(secret=SECRET) as receiver:
        endpoint(owner, url=receiver.url)
        ended("s1", owner=owner)
        receiver.wait_for(lambda got: len(got) == 1, poll=worker.tick)
    got = receiver.received[0]
    assert got.signature_ok is True
    assert got.headers["x-relay-event"] == "session.ended" and got.headers["content-type"] == "application/json"
    delivery = WebhookDelivery.objects.get()
    assert got.headers["x-relay-delivery"] == str(delivery.pk) and got.json["data"]["session"]["id"] == "s1"
    assert delivery.status == "delivered" and delivery.attempts == 1 and delivery.last_status_code == 200 and delivery.delivered_at


def test_retries_against_a_receiver_that_fails_twice(owner):
    with Receiver(secret=SECRET, statuses=[500, 503]) as receiver:
        hook = endpoint(owner, url=receiver.url)
        ended("s1", owner=owner)
        receiver.wait_for(lambda got: len(got) == 3, poll=worker.tick)
    assert [r.status for r in receiver.received] == [500, 503, 200]
    assert len({r.headers["x-relay-delivery"] for r in receiver.received}) == 1 and all(r.signature_ok for r in receiver.received)
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "delivered" and delivery.attempts == 3
    hook.refresh_from_db()
    assert hook.consecutive_failures == 0


def test_backoff_doubles_and_is_capped(settings):
    settings.RELAY_WEBHOOK_BACKOFF_SECONDS = 10.0
    settings.RELAY_WEBHOOK_BACKOFF_MAX_SECONDS = 300.0
    for attempts, expected in [(1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (12, 300)]:
        assert expected * 0.9 <= webhooks.backoff_seconds(attempts) <= expected * 1.1


def test_a_failed_attempt_records_the_error_and_schedules_the_next(owner, settings):
    settings.RELAY_WEBHOOK_BACKOFF_SECONDS = 60.0
    with Receiver(statuses=[500]) as receiver:
        endpoint(owner, url=receiver.url)
        ended("s1", owner=owner)
        worker.tick()
        worker.tick()  # not due yet: nothing sent
    assert len(receiver.received) == 1
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "pending" and delivery.attempts == 1 and delivery.last_status_code == 500
    assert "HTTP 500" in delivery.last_error and delivery.next_attempt_at > timezone.now() + timedelta(seconds=50)


def test_retries_exhausted_then_redeliver(owner, settings):
    settings.RELAY_WEBHOOK_MAX_ATTEMPTS = 2
    with Receiver(statuses=[500, 500]) as receiver:
        endpoint(owner, url=receiver.url)
        ended("s1", owner=owner)
        receiver.wait_for(lambda got: len(got) == 2, poll=worker.tick)
        delivery = WebhookDelivery.objects.get()
        for _ in range(3):
            worker.tick()
        delivery.refresh_from_db()
        assert delivery.status == "failed" and delivery.attempts == 2 and len(receiver.received) == 2
        webhooks.delivery_redeliver(delivery=delivery)
        receiver.wait_for(lambda got: len(got) == 3, poll=worker.tick)
    delivery.refresh_from_db()
    assert delivery.status == "delivered" and receiver.received[2].body == receiver.received[0].body


def test_unreachable_receiver_is_a_failed_attempt(owner):
    endpoint(owner, url="http://127.0.0.1:9/closed")  # the discard port: nothing listens
    ended("s1", owner=owner)
    worker.tick()
    delivery = WebhookDelivery.objects.get()
    assert delivery.attempts == 1 and delivery.last_status_code is None and delivery.last_error


def test_a_dead_endpoint_is_disabled_and_its_owner_told(owner, settings, mailoutbox):
    settings.RELAY_WEBHOOK_DISABLE_AFTER = 3
    settings.RELAY_WEBHOOK_MAX_ATTEMPTS = 2
    with Receiver(statuses=[500] * 10) as receiver:
        hook = endpoint(owner, url=receiver.url)
        ended("s1", owner=owner)
        ended("s2", owner=owner)
        receiver.wait_for(lambda got: len(got) == 3, poll=worker.tick)
        for _ in range(3):
            worker.tick()
    hook.refresh_from_db()
    assert not hook.is_active and hook.disabled_at and "3 failed attempts" in hook.disabled_reason and "HTTP 500" in hook.disabled_reason
    assert len(receiver.received) == 3  # nothing more once disabled
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["olive@example.com"] and receiver.url in mailoutbox[0].body
    webhooks.endpoint_enable(endpoint=hook)
    hook.refresh_from_db()
    assert hook.is_active and hook.consecutive_failures == 0


def test_a_claimed_delivery_is_not_sent_by_another_worker(owner):
    """Two workers (inline threads of two processes, or a unit and a thread) pick the same due row:
    one conditional UPDATE decides; the claim lapses if its worker dies mid-request."""
    hook = endpoint(owner)
    ended("s1", owner=owner)
    webhooks.session_ended_scan()
    delivery = WebhookDelivery.objects.get()
    now = timezone.now()
    assert webhooks._claim(delivery.pk, now) is True
    assert webhooks._claim(delivery.pk, now) is False  # the second worker loses
    assert webhooks.deliver_due() == 0  # and its scan skips the claimed row
    later = now + timedelta(seconds=webhooks.settings.RELAY_WEBHOOK_TIMEOUT_SECONDS + 31)
    assert list(WebhookDelivery.objects.due(later)) == [delivery]  # the first one died: it is due again
    assert webhooks._claim(delivery.pk, later) is True



def test_ping(owner):
    with Receiver(secret=SECRET) as receiver:
        hook = endpoint(owner, url=receiver.url)
        webhooks.ping_enqueue(endpoint=hook)
        receiver.wait_for(lambda got: len(got) == 1, poll=worker.tick)
    assert receiver.received[0].json["type"] == "ping" and receiver.received[0].signature_ok


def test_an_idle_worker_backs_off_to_five_polls_and_a_busy_tick_resets_it(monkeypatch):
    assert [worker.idle_wait(1.0, n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    # the loop: two idle ticks, a busy one, an idle one; then stop
    results = iter([False, False, True, False])
    waits: list[float] = []

    class Stop:
        def is_set(self) -> bool:
            return len(waits) >= 3

        def wait(self, seconds: float) -> None:
            waits.append(seconds)

    monkeypatch.setattr(worker, "tick", lambda: worker.TickResult(counted=int(next(results))))
    worker.run(Stop(), poll_seconds=0.5)  # type: ignore[arg-type]
    assert waits == [0.5, 1.0, 0.5]
