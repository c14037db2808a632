"""Usage analytics: audio minutes, sessions, connections, turns and errors per user, per API token
and per day, kept as :class:`UsageDaily` aggregate rows.

The worker counts each connection once, after it closed (:func:`usage_count_closed`) or its
process died without closing it (:func:`usage_count_lost`), from the ``Connection`` row the relay
wrote anyway: nothing is added to the stream's path, and a page view reads a few aggregate rows
instead of every connection. The only write tied to a connection is
:func:`aconnection_token_note`, for connections signed in with an API token (the ``Connection``
row does not say which token), done in the background after the connection opened.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F, Max, Q, Sum
from django.utils import timezone

from relay.api import lost
from relay.api.models import ConnectionUsage, UsageDaily, WorkerCursor
from relay.models import ApiToken, Connection, Turn
from relay.ops.logs import get_logger
from relay.store.db import db_async

log = get_logger("relay.api.usage")

#: Connections closed up to this long before the cursor are looked at again (commits that landed late).
RESCAN_SECONDS = 120.0
CURSOR = "usage.closed_connections"
#: Connections lost with their process, by the process's last heartbeat.
LOST_CURSOR = "usage.lost_connections"


# --- the one hook on the WebSocket side ------------------------------------------------------
def connection_token_note(*, connection_id: str, token_id: int, user_id: int | None) -> None:
    ConnectionUsage.objects.update_or_create(connection_id=connection_id, defaults={"token_id": token_id, "user_id": user_id})


_anote = db_async(connection_token_note)
_pending: set[asyncio.Task] = set()


def connection_opened(*, connection_id: str, credentials: Any) -> None:
    """Remember which API token a connection used; a no-op for every other connection.

    Called by the consumer once per connection, after it is ready: the insert runs as a background
    task (the stream does not wait for it), and a failure only loses that connection's token
    attribution (its user's usage is still counted).
    """
    token_id = getattr(credentials, "token_id", None)
    if token_id is None:
        return
    user = getattr(credentials, "user", None)
    user_id = user.pk if getattr(user, "is_authenticated", False) else None

    async def note() -> None:
        try:
            await _anote(connection_id=connection_id, token_id=token_id, user_id=user_id)
        except Exception as exc:  # the database may be restarting: usage loses only the token
            log.warning("usage_token_not_noted", connection=connection_id, error=repr(exc))

    task = asyncio.ensure_future(note())
    _pending.add(task)
    task.add_done_callback(_pending.discard)


# --- counting (the worker) -------------------------------------------------------------------
def _add(*, day: date, kind: str, subject: dict[str, Any], amounts: dict[str, Any]) -> None:
    """Add ``amounts`` to one aggregate row, creating it if this is the day's first."""
    rows = UsageDaily.objects.filter(day=day, kind=kind, **subject)
    increments = {name: F(name) + value for name, value in amounts.items()}
    if rows.update(updated_at=timezone.now(), **increments):
        return
    try:
        with transaction.atomic():
            UsageDaily.objects.create(day=day, kind=kind, **subject, **amounts)
    except IntegrityError:  # another worker created it meanwhile
        rows.update(updated_at=timezone.now(), **increments)


def _count_one(conn: dict[str, Any], now: datetime) -> bool:
    """Count one closed connection in its user's and its token's day; False if already counted."""
    with transaction.atomic():
        usage, _ = ConnectionUsage.objects.get_or_create(connection_id=conn["pk"])
        turns = Turn.objects.filter(connection_id=conn["pk"]).count()
        user_id = conn["user_id"] or usage.user_id
        claimed = ConnectionUsage.objects.filter(pk=conn["pk"], counted_at__isnull=True).update(
            counted_at=now, user_id=user_id, audio_seconds=conn["audio_seconds"], turns=turns, errors=conn["error_count"],
            created_session=not conn["resumed"],
        )
        if not claimed:  # another worker counted it
            return False
        amounts = {"audio_seconds": conn["audio_seconds"] or 0.0, "sessions": 0 if conn["resumed"] else 1, "connections": 1,
                   "turns": turns, "errors": conn["error_count"] or 0}
        day = timezone.localdate(conn["closed_at"])
        if user_id is not None:
            _add(day=day, kind=UsageDaily.USER, subject={"user_id": user_id}, amounts=amounts)
        if usage.token_id is not None:
            _add(day=day, kind=UsageDaily.TOKEN, subject={"token_id": usage.token_id}, amounts=amounts)
    return True


def _fields() -> list[str]:
    user_field = "user_id" if any(f.name == "user" for f in Connection._meta.get_fields()) else None
    return ["pk", "audio_seconds", "error_count", "resumed"] + ([user_field] if user_field else [])


def _uncounted() -> Q:
    return Q(usage__isnull=True) | Q(usage__counted_at__isnull=True)


def _cursor_advance(cursor: WorkerCursor, *, newest: datetime, found: bool, now: datetime) -> None:
    # Idle, the cursor moves once a minute at most: an idle worker only reads.
    if cursor.at is None or (found and newest > cursor.at) or newest > cursor.at + timedelta(seconds=60):
        WorkerCursor.objects.filter(name=cursor.name).update(at=newest, updated_at=now)


def usage_count_closed(*, settle_seconds: float = 2.0, limit: int = 500) -> int:
    """Count the connections that closed since the last run (and were not counted); returns how many.

    ``settle_seconds``: a connection that closed this recently waits for the next run, so the
    background token note of a very short connection has landed.
    """
    now = timezone.now()
    # A first run (a new deployment, or a worker started after daphne) counts the last day too.
    cursor, _ = WorkerCursor.objects.get_or_create(name=CURSOR, defaults={"at": now - timedelta(days=1)})
    since = (cursor.at or now) - timedelta(seconds=RESCAN_SECONDS)
    until = now - timedelta(seconds=settle_seconds)
    rows = list(
        Connection.objects.filter(closed_at__gt=since, closed_at__lte=until).filter(_uncounted())
        .order_by("closed_at").values("closed_at", *_fields())[:limit]
    )
    counted = 0
    for row in rows:
        row.setdefault("user_id", None)
        counted += _count_one(row, now)
    newest = rows[-1]["closed_at"] if len(rows) == limit else until
    _cursor_advance(cursor, newest=newest, found=bool(rows), now=now)
    return counted


def usage_count_lost(*, settle_seconds: float = 2.0, limit: int = 500) -> int:
    """Count the connections lost with their process (never closed; the process silent for three
    heartbeats, or stopped), each in the day it ended: when its process was last heard of.

    Their row's counters are written at close, so a lost connection's audio is the end of its last
    stored turn's audio window (what the engine had heard at least), or its row's figure if larger.
    A process that comes back after all and closes the connection adds nothing: it is counted.
    """
    now = timezone.now()
    cursor, _ = WorkerCursor.objects.get_or_create(name=LOST_CURSOR, defaults={"at": now - timedelta(days=1)})
    since = (cursor.at or now) - timedelta(seconds=RESCAN_SECONDS)
    until = now - lost.lost_after() - timedelta(seconds=settle_seconds)
    rows = list(
        Connection.objects.filter(closed_at__isnull=True, process__heartbeat_at__gt=since, process__heartbeat_at__lte=until)
        .filter(_uncounted()).order_by("process__heartbeat_at", "pk")
        .values("opened_at", "process__heartbeat_at", "process__stopped_at", *_fields())[:limit]
    )
    heard = dict(
        Turn.objects.filter(connection_id__in=[row["pk"] for row in rows]).values("connection_id")
        .annotate(end=Max("audio_window_end")).values_list("connection_id", "end")
    )
    counted = 0
    for row in rows:
        row.setdefault("user_id", None)
        row["closed_at"] = lost.lost_at(opened_at=row["opened_at"], heartbeat_at=row["process__heartbeat_at"], stopped_at=row["process__stopped_at"])
        row["audio_seconds"] = max(row["audio_seconds"] or 0.0, heard.get(row["pk"]) or 0.0)
        counted += _count_one(row, now)
    newest = rows[-1]["process__heartbeat_at"] if len(rows) == limit else until
    _cursor_advance(cursor, newest=newest, found=bool(rows), now=now)
    if counted:
        log.info("usage_lost_connections_counted", connections=counted)
    return counted


# --- reading ----------------------------------------------------------------------------------
_SUMS = {"audio_seconds": Sum("audio_seconds"), "sessions": Sum("sessions"), "connections": Sum("connections"),
         "turns": Sum("turns"), "errors": Sum("errors")}


def _row(values: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "audio_minutes": round((values.get("audio_seconds") or 0.0) / 60.0, 3),
        "sessions": values.get("sessions") or 0,
        "connections": values.get("connections") or 0,
        "turns": values.get("turns") or 0,
        "errors": values.get("errors") or 0,
    }


@dataclass(frozen=True, slots=True)
class Period:
    start: date
    end: date

    @classmethod
    def last_days(cls, days: int, today: date | None = None) -> "Period":
        today = today or timezone.localdate()
        return cls(start=today - timedelta(days=days - 1), end=today)


def usage_for_user(*, user: Any, period: Period, token_id: int | None = None) -> dict[str, Any]:
    """A user's usage over ``period``: totals, per day, per token, per token and day.

    With ``token_id``, everything is that token's (one of the user's).
    """
    rows = UsageDaily.objects.filter(day__gte=period.start, day__lte=period.end)
    tokens = rows.filter(kind=UsageDaily.TOKEN, token__user=user)
    own = tokens.filter(token_id=token_id) if token_id is not None else rows.filter(kind=UsageDaily.USER, user=user)
    if token_id is not None:
        tokens = own
    names = dict(ApiToken.objects.filter(user=user).values_list("pk", "name"))
    return {
        "start": period.start,
        "end": period.end,
        "totals": _row(own.aggregate(**_SUMS)),
        "days": [_row(r, day=r["day"]) for r in own.values("day").annotate(**_SUMS).order_by("-day")],
        "tokens": [_row(r, token_id=r["token_id"], token_name=names.get(r["token_id"]))
                   for r in tokens.values("token_id").annotate(**_SUMS).order_by("-audio_seconds")],
        "token_days": [_row(r, day=r["day"], token_id=r["token_id"], token_name=names.get(r["token_id"]))
                       for r in tokens.values("day", "token_id").annotate(**_SUMS).order_by("-day", "token_id")],
        "pending_note": "Usage is counted by the relay's worker a few seconds after each connection closes; open connections are not in it yet.",
    }


def usage_top(*, days: int = 30, limit: int = 10) -> dict[str, list[dict[str, Any]]]:
    """The heaviest users and tokens over the last ``days`` days (the dashboard's view)."""
    period = Period.last_days(days)
    rows = UsageDaily.objects.filter(day__gte=period.start, day__lte=period.end)
    users = (rows.filter(kind=UsageDaily.USER).values("user_id", "user__username").annotate(**_SUMS)
             .order_by("-audio_seconds", "-turns")[:limit])
    tokens = (rows.filter(kind=UsageDaily.TOKEN).values("token_id", "token__name", "token__prefix", "token__user__username")
              .annotate(**_SUMS).order_by("-audio_seconds", "-turns")[:limit])
    return {
        "users": [_row(r, user_id=r["user_id"], name=r["user__username"]) for r in users],
        "tokens": [_row(r, token_id=r["token_id"], name=f'{r["token__name"]} ({r["token__prefix"]}...)', owner=r["token__user__username"] or "")
                   for r in tokens],
        "days": days,
    }
