"""Webhooks: events derived from rows the relay already writes, kept in a database outbox
(:class:`WebhookDelivery`), sent by the worker with retries and exponential backoff.

Why an outbox and not a task queue (Celery, RQ, dramatiq): the events are facts already in the
database (a session's connections all closed; a turn row exists), so the worker finds them by
scanning past a cursor, and nothing on the WebSocket path enqueues anything. The outbox needs no
broker: ``make run`` (SQLite, no Redis) delivers with the worker in a daphne thread, production
runs ``manage.py relay_worker`` under systemd; the rows are the record the API and the admin show.

* ``session.ended``: every connection of a session ended, the last one at least
  ``RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS`` ago (a reconnect within that time cancels it), and
  none is open on a live process. A connection ends when its close is recorded, or, when its
  process died first (kill -9, a crash), when that process was last heard of; that one is seen
  once the process has been silent three heartbeats (:mod:`relay.api.lost`). The body carries the session and its turns (up to
  ``RELAY_WEBHOOK_MAX_TURNS``; past that a link). A session that is resumed later and ends again
  sends another, naming the last connection in ``data.last_connection_id``.
* ``turn.finished``: every finished turn, opt-in per endpoint.

Delivery is at least once: a receiver dedupes by ``X-Relay-Delivery`` (or ``id`` in the body).
"""
from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Max, Q
from django.urls import reverse
from django.utils import timezone

from relay.api import lost, signing
from relay.api.models import (
    EVENT_PING, EVENT_SESSION_ENDED, EVENT_TURN_FINISHED, ConnectionUsage, WebhookDelivery, WebhookEndpoint, WorkerCursor, new_secret,
)
from relay.models import Connection, Session, Turn
from relay.ops.logs import get_logger
from relay.store import selectors

log = get_logger("relay.api.webhooks")

SESSION_CURSOR = "webhooks.session_ended"
#: The second cursor of session.ended: the last heartbeat of processes that went silent.
LOST_CURSOR = "webhooks.session_ended.lost"
#: Gone processes looked at per scan (each brings all its open connections' sessions).
LOST_PROCESS_LIMIT = 100
TURN_CURSOR = "webhooks.turn_finished"
#: A turn row this young may have neighbours with smaller ids still committing; it waits a tick.
TURN_SETTLE_SECONDS = 1.0
#: An idle scan moves its cursor at most this often: an idle worker reads, it does not write
#: (on SQLite every write takes the lock the turn writes need).
IDLE_CURSOR_SECONDS = 60.0
USER_AGENT = "Relay-Webhooks/1"


# --- endpoints ----------------------------------------------------------------------------------
def secret_generate() -> str:
    return new_secret()


def endpoint_create(*, user: Any, url: str, events: list[str], token: Any = None, secret: str = "", description: str = "") -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(
        user=user, token=token, url=url, events=sorted(set(events)), secret=secret or secret_generate(), description=description
    )


def endpoint_enable(*, endpoint: WebhookEndpoint) -> None:
    """Turn an endpoint back on (after the relay disabled it): its failure count starts over."""
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(is_active=True, disabled_at=None, disabled_reason="", consecutive_failures=0)


def delivery_redeliver(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send a delivery again (the same body, a fresh signature): pending now, with a new round of attempts."""
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        status=WebhookDelivery.PENDING, attempts=0, next_attempt_at=timezone.now(), claimed_until=None
    )
    delivery.refresh_from_db()
    return delivery


def ping_enqueue(*, endpoint: WebhookEndpoint) -> WebhookDelivery:
    """A ``ping`` event, to check a receiver and its signature check."""
    event_id = uuid.uuid4()
    return WebhookDelivery.objects.create(
        id=event_id, endpoint=endpoint, event=EVENT_PING, event_key=f"ping:{event_id}",
        payload=_envelope(event_id, EVENT_PING, {"endpoint_id": endpoint.pk}),
    )


# --- bodies -------------------------------------------------------------------------------------
def _envelope(event_id: uuid.UUID, event: str, data: dict[str, Any]) -> dict[str, Any]:
    body = {"id": str(event_id), "type": event, "created_at": timezone.now().isoformat(), "data": data}
    return json.loads(json.dumps(body, cls=DjangoJSONEncoder))  # JSON-ready for the JSONField


def _session_data(session: Session) -> dict[str, Any]:
    from relay.api.serializers import SessionSerializer

    return dict(SessionSerializer(session, context={"user": None, "roles": {session.pk: None}}).data)


def _turns_data(session_id: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
    from relay.api.views import turns_as_dicts

    records = selectors.turn_page(session_id=session_id, after_index=-1, limit=limit + 1)
    return turns_as_dicts(records[:limit]), len(records) > limit


def session_ended_body(event_id: uuid.UUID, session: Session, last_connection_id: str, *, ended_at: datetime | None = None,
                       connection_lost: bool = False) -> dict[str, Any]:
    """``connection_lost``: the last connection never closed, its process died; ``ended_at`` is then
    when that process was last heard of (a receiver may want to tell a crash from a goodbye)."""
    turns, truncated = _turns_data(session.pk, settings.RELAY_WEBHOOK_MAX_TURNS)
    data = {
        "session": _session_data(session),
        "last_connection_id": last_connection_id,
        "last_connection_lost": connection_lost,
        "ended_at": ended_at,
        "turns": turns,
        "turns_truncated": truncated,
        "turns_url": settings.RELAY_PUBLIC_URL + reverse("relay_api:session-turns", args=[session.pk]),
    }
    return _envelope(event_id, EVENT_SESSION_ENDED, data)


def turn_finished_body(event_id: uuid.UUID, session: Session, record: dict[str, Any]) -> dict[str, Any]:
    from relay.api.views import turns_as_dicts

    data = {"session": {"id": session.pk, "title": session.title,
                        "owner": session.owner.get_username() if session.owner_id and session.owner else None},
            "turn": turns_as_dicts([record])[0]}
    return _envelope(event_id, EVENT_TURN_FINISHED, data)


# --- routing: which endpoints hear of a session ---------------------------------------------------
def endpoints_for(*, session: Session, event: str, active: list[WebhookEndpoint], happened_at: datetime) -> list[WebhookEndpoint]:
    """The active endpoints that subscribe ``event``, may see ``session``, and existed when it happened."""
    wanting = [e for e in active if e.wants(event) and e.created_at <= happened_at]
    if not wanting:
        return []
    users: set[int] = set()
    tokens: set[int] = set()
    if any(e.user_id is not None for e in wanting):
        users = {session.owner_id} if session.owner_id else set()
        if any(f.name == "user" for f in Connection._meta.get_fields()):
            users |= set(Connection.objects.filter(session=session, user__isnull=False).values_list("user_id", flat=True))
        users |= set(ConnectionUsage.objects.filter(connection__session=session, user__isnull=False).values_list("user_id", flat=True))
    if any(e.token_id is not None for e in wanting):
        tokens = set(ConnectionUsage.objects.filter(connection__session=session, token__isnull=False).values_list("token_id", flat=True))
    chosen = []
    for endpoint in wanting:
        if endpoint.token_id is not None:
            ok = endpoint.token_id in tokens
        elif endpoint.user_id is not None:
            ok = endpoint.user_id in users
        else:
            ok = True  # made by staff, for every session
        if ok:
            chosen.append(endpoint)
    return chosen


def _enqueue(*, endpoints: list[WebhookEndpoint], event: str, key: str, session_id: str, body: Any) -> int:
    """One delivery per endpoint; an event already enqueued (a rescan) adds nothing."""
    existing = set(WebhookDelivery.objects.filter(event_key=key, endpoint__in=endpoints).values_list("endpoint_id", flat=True))
    rows = []
    for endpoint in endpoints:
        if endpoint.pk in existing:
            continue
        event_id = uuid.uuid4()
        rows.append(WebhookDelivery(id=event_id, endpoint=endpoint, event=event, event_key=key, session_id=session_id, payload=body(event_id)))
    WebhookDelivery.objects.bulk_create(rows, ignore_conflicts=True)
    return len(rows)


def _cursor(name: str, **defaults: Any) -> WorkerCursor:
    return WorkerCursor.objects.get_or_create(name=name, defaults=defaults)[0]


# --- scans (the worker) ---------------------------------------------------------------------------
def session_ended_scan(*, limit: int = 500) -> int:
    """Enqueue ``session.ended`` for sessions whose last connection ended a debounce ago.

    A connection ends when its close is recorded, or, if its process died before writing it, when
    that process was last heard of (:mod:`relay.api.lost`). Two cursors find the candidates: closes
    recorded (``closed_at``) and processes gone silent (their last heartbeat, three heartbeats
    plus the debounce ago). Either scan decides the same way for a session, naming the connection
    that ended last, so when both see it the unique event key keeps one delivery per endpoint.
    """
    now = timezone.now()
    delay = timedelta(seconds=settings.RELAY_WEBHOOK_SESSION_ENDED_DELAY_SECONDS)
    until = now - delay
    until_lost = until - lost.lost_after()  # its process silent for three heartbeats, then the debounce
    active = list(WebhookEndpoint.objects.filter(is_active=True))
    wanting = [e for e in active if e.wants(EVENT_SESSION_ENDED)]
    # The first scan starts when the first endpoint that wants the event was made, so a worker
    # started after daphne (a deploy) still sends what happened meanwhile.
    first = min([e.created_at for e in wanting], default=None)
    cursor = _cursor(SESSION_CURSOR, at=first or until)
    lost_cursor = _cursor(LOST_CURSOR, at=first or until_lost)
    closed: list[dict[str, Any]] = []
    gone: list[dict[str, Any]] = []
    if wanting:
        closed = list(
            Connection.objects.filter(closed_at__gt=cursor.at, closed_at__lte=until).order_by("closed_at").values("session_id", "closed_at")[:limit]
        )
        gone = lost.processes_gone(after=lost_cursor.at, until=until_lost, limit=LOST_PROCESS_LIMIT)
    session_ids = {row["session_id"] for row in closed}
    if gone:
        session_ids |= set(
            Connection.objects.filter(process_id__in=[p["pk"] for p in gone], closed_at__isnull=True).values_list("session_id", flat=True).distinct()
        )
    enqueued = _sessions_ended(sorted(session_ids), until=until, until_lost=until_lost, active=active) if session_ids else 0
    _cursor_advance(SESSION_CURSOR, at=cursor.at, to=closed[-1]["closed_at"] if len(closed) == limit else until, found=bool(closed), now=now)
    _cursor_advance(LOST_CURSOR, at=lost_cursor.at, to=gone[-1]["heartbeat_at"] if len(gone) >= LOST_PROCESS_LIMIT else until_lost,
                    found=bool(gone), now=now)
    if enqueued:
        log.info("webhook_events", kind=EVENT_SESSION_ENDED, deliveries=enqueued)
    return enqueued


def _cursor_advance(name: str, *, at: datetime, to: datetime, found: bool, now: datetime) -> None:
    """Move a time cursor to ``to``; when the scan found nothing, at most once a minute (an idle worker only reads)."""
    if found or at < to - timedelta(seconds=IDLE_CURSOR_SECONDS):
        WorkerCursor.objects.filter(name=name).update(at=to, updated_at=now)


def _sessions_ended(session_ids: list[str], *, until: datetime, until_lost: datetime, active: list[WebhookEndpoint]) -> int:
    """Enqueue ``session.ended`` for each of ``session_ids`` that has ended; returns the deliveries added.

    A session has ended when none of its connections is open on a live process and the one that
    ended last did so long enough ago: closed by ``until``, or lost with a process last heard of
    by ``until_lost``. Otherwise the scan that will see that last connection brings the event.
    """
    still_open = set(Connection.objects.live().filter(session_id__in=session_ids).values_list("session_id", flat=True))
    last_close = dict(
        Connection.objects.filter(session_id__in=session_ids).values("session_id").annotate(last=Max("closed_at")).values_list("session_id", "last")
    )
    last_lost: dict[str, tuple[datetime, str, datetime]] = {}  # session -> (ended at, connection, its process's heartbeat)
    orphans = (Connection.objects.filter(session_id__in=session_ids, closed_at__isnull=True, process__isnull=False)
               .exclude(session_id__in=still_open).values("pk", "session_id", "opened_at", "process__heartbeat_at", "process__stopped_at"))
    for row in orphans:
        at = lost.lost_at(opened_at=row["opened_at"], heartbeat_at=row["process__heartbeat_at"], stopped_at=row["process__stopped_at"])
        candidate = (at, str(row["pk"]), row["process__heartbeat_at"])
        if row["session_id"] not in last_lost or candidate[:2] > last_lost[row["session_id"]][:2]:
            last_lost[row["session_id"]] = candidate
    enqueued = 0
    for session in Session.objects.filter(pk__in=session_ids).exclude(pk__in=still_open).select_related("owner"):
        closed_at, orphan = last_close.get(session.pk), last_lost.get(session.pk)
        if orphan is not None and (closed_at is None or orphan[0] > closed_at):
            ended_at, last, was_lost = orphan[0], orphan[1], True
            if orphan[2] > until_lost:
                continue  # its process went silent too recently: the scan of gone processes brings it
        elif closed_at is not None:
            if closed_at > until:
                continue  # a reconnect: the connection that closes last brings the event
            ended_at, was_lost = closed_at, False
            last = str(Connection.objects.filter(session=session, closed_at=closed_at).values_list("pk", flat=True).first())
        else:
            continue
        endpoints = endpoints_for(session=session, event=EVENT_SESSION_ENDED, active=active, happened_at=ended_at)
        if endpoints:
            enqueued += _enqueue(
                endpoints=endpoints, event=EVENT_SESSION_ENDED, key=f"session.ended:{session.pk}:{last}", session_id=session.pk,
                body=lambda event_id, s=session, c=last, at=ended_at, g=was_lost: session_ended_body(event_id, s, c, ended_at=at, connection_lost=g),
            )
    return enqueued


def turn_finished_scan(*, limit: int = 500) -> int:
    """Enqueue ``turn.finished`` for turn rows past the cursor, when any endpoint wants them."""
    now = timezone.now()
    active = [e for e in WebhookEndpoint.objects.filter(is_active=True) if e.wants(EVENT_TURN_FINISHED)]
    top = Turn.objects.aggregate(top=Max("pk"))["top"] or 0
    start = top
    if active:  # the first scan starts at the turns made after the first subscribing endpoint
        start = Turn.objects.filter(created_at__lt=min(e.created_at for e in active)).aggregate(top=Max("pk"))["top"] or 0
    cursor = _cursor(TURN_CURSOR, position=start)
    if not active:  # nobody listens: keep up with the present, a write a minute at most
        if top > cursor.position and cursor.updated_at < now - timedelta(seconds=IDLE_CURSOR_SECONDS):
            WorkerCursor.objects.filter(name=TURN_CURSOR).update(position=top, updated_at=now)
        return 0
    settled = now - timedelta(seconds=TURN_SETTLE_SECONDS)
    rows = list(Turn.objects.filter(pk__gt=cursor.position).order_by("pk").values("pk", "session_id", "index", "created_at")[:limit])
    done = cursor.position
    enqueued = 0
    sessions = {s.pk: s for s in Session.objects.filter(pk__in={r["session_id"] for r in rows}).select_related("owner")}
    for row in rows:
        if row["created_at"] > settled:
            break
        done = row["pk"]
        session = sessions.get(row["session_id"])
        if session is None:
            continue
        endpoints = endpoints_for(session=session, event=EVENT_TURN_FINISHED, active=active, happened_at=row["created_at"])
        if not endpoints:
            continue
        record = selectors.turns_between(session_id=session.pk, after_index=row["index"] - 1, before_index=row["index"] + 1, limit=1)
        if record:
            enqueued += _enqueue(endpoints=endpoints, event=EVENT_TURN_FINISHED, key=f"turn.finished:{session.pk}:{row['index']}",
                                 session_id=session.pk, body=lambda event_id, s=session, r=record[0]: turn_finished_body(event_id, s, r))
    if done > cursor.position:
        WorkerCursor.objects.filter(name=TURN_CURSOR).update(position=done, updated_at=now)
    return enqueued


# --- delivery -------------------------------------------------------------------------------------
class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer that is not 2xx: the delivery failed


_opener = urllib.request.build_opener(_NoRedirects)


def backoff_seconds(attempts: int) -> float:
    """Delay before retry number ``attempts`` (1 = the first retry): doubling, capped, with +-10% jitter."""
    base = settings.RELAY_WEBHOOK_BACKOFF_SECONDS * (2 ** max(0, attempts - 1))
    return min(settings.RELAY_WEBHOOK_BACKOFF_MAX_SECONDS, base) * random.uniform(0.9, 1.1)


def post(*, endpoint: WebhookEndpoint, delivery: WebhookDelivery, now: datetime | None = None) -> tuple[int | None, str]:
    """POST one delivery; returns (HTTP status or None, error text ("" on success))."""
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = int((now or timezone.now()).timestamp())
    request = urllib.request.Request(endpoint.url, data=body, method="POST", headers={
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        signing.EVENT_HEADER: delivery.event,
        signing.DELIVERY_HEADER: str(delivery.pk),
        signing.TIMESTAMP_HEADER: str(timestamp),
        signing.SIGNATURE_HEADER: signing.signature(secret=endpoint.secret, timestamp=timestamp, body=body),
    })
    try:
        with _opener.open(request, timeout=settings.RELAY_WEBHOOK_TIMEOUT_SECONDS) as response:
            response.read(65536)
            return response.status, ""
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace").strip()
        return exc.code, f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
    except Exception as exc:  # refused, timed out, TLS, DNS: all retried the same way
        return None, f"{type(exc).__name__}: {exc}"[:500]


def _claim(delivery_id: Any, now: datetime) -> bool:
    """Take a due delivery for this worker (an UPDATE that only one worker can win)."""
    lease = now + timedelta(seconds=settings.RELAY_WEBHOOK_TIMEOUT_SECONDS + 30)
    return bool(
        WebhookDelivery.objects.filter(pk=delivery_id, status=WebhookDelivery.PENDING)
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        .update(claimed_until=lease)
    )


def deliver_due(*, limit: int = 50) -> int:
    """Send the deliveries that are due; returns how many were attempted."""
    now = timezone.now()
    due = list(WebhookDelivery.objects.due(now).order_by("next_attempt_at").values_list("pk", flat=True)[:limit])
    attempted = 0
    for delivery_id in due:
        if not _claim(delivery_id, timezone.now()):
            continue
        delivery = WebhookDelivery.objects.select_related("endpoint", "endpoint__user", "endpoint__token__user").get(pk=delivery_id)
        if not delivery.endpoint.is_active:  # disabled by an earlier attempt of this batch
            WebhookDelivery.objects.filter(pk=delivery_id).update(claimed_until=None)
            continue
        attempt(delivery)
        attempted += 1
    return attempted


def attempt(delivery: WebhookDelivery) -> bool:
    """One attempt at a claimed delivery, recorded; True when the receiver took it."""
    endpoint = delivery.endpoint
    status, error = post(endpoint=endpoint, delivery=delivery)
    now = timezone.now()
    attempts = delivery.attempts + 1
    fields: dict[str, Any] = {"attempts": attempts, "last_attempt_at": now, "last_status_code": status, "claimed_until": None}
    ok = not error and status is not None and 200 <= status < 300
    if ok:
        fields.update(status=WebhookDelivery.DELIVERED, delivered_at=now, last_error="")
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(consecutive_failures=0)
    else:
        fields["last_error"] = error or f"HTTP {status}"
        if attempts >= settings.RELAY_WEBHOOK_MAX_ATTEMPTS:
            fields["status"] = WebhookDelivery.FAILED
        else:
            fields["next_attempt_at"] = now + timedelta(seconds=backoff_seconds(attempts))
    WebhookDelivery.objects.filter(pk=delivery.pk).update(**fields)
    log.info("webhook_attempt", delivery=str(delivery.pk), kind=delivery.event, endpoint=endpoint.pk, status=status, ok=ok, attempts=attempts,
             error=fields.get("last_error", ""))
    if not ok:
        _failed(endpoint, fields["last_error"])
    return ok


def _failed(endpoint: WebhookEndpoint, error: str) -> None:
    """Count a failed attempt; past ``RELAY_WEBHOOK_DISABLE_AFTER`` in a row, disable and tell the owner."""
    from django.db.models import F

    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(consecutive_failures=F("consecutive_failures") + 1)
    failures = WebhookEndpoint.objects.filter(pk=endpoint.pk).values_list("consecutive_failures", flat=True).first() or 0
    if failures < settings.RELAY_WEBHOOK_DISABLE_AFTER:
        return
    reason = f"Disabled after {failures} failed attempts in a row; the last: {error}"[:300]
    if not WebhookEndpoint.objects.filter(pk=endpoint.pk, is_active=True).update(is_active=False, disabled_at=timezone.now(), disabled_reason=reason):
        return  # disabled already (another worker, or its owner)
    log.warning("webhook_endpoint_disabled", endpoint=endpoint.pk, url=endpoint.url, failures=failures)
    owner = endpoint.user or (endpoint.token.user if endpoint.token_id and endpoint.token else None)
    if owner is not None and owner.email:
        try:
            send_mail(
                subject="Relay: a webhook endpoint was disabled",
                message=(f"The relay disabled your webhook endpoint {endpoint.url} after {failures} failed deliveries in a row.\n\n"
                         f"Last error: {error}\n\nFix the receiver, then turn the endpoint back on (PATCH /api/v1/webhooks/{endpoint.pk}/ "
                         f'with {{"is_active": true}}, or in the admin); deliveries that were pending are sent then.\n'),
                from_email=None, recipient_list=[owner.email], fail_silently=False,
            )
        except Exception as exc:
            log.warning("webhook_disable_mail_failed", endpoint=endpoint.pk, error=repr(exc))
