"""Writes: sessions, connections, turns. Keyword-only, typed; the consumer calls the async twins.

No function here is called per audio frame: connection counters are flushed at turn ends and on
close, and a turn is written once, when it ends.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DataError, IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from relay.live import admission as load
from relay.store import access
from relay.store import loop_db, sqlite_writes
from relay.store.batching import Batcher
from relay.store.db import db_async
from relay.store.turns import EVENT_FIELDS, allocated_indexes, turn_fields
from relay.engines.base import TurnEvent
from relay.exceptions import SessionEnded, SessionFull
from relay.models import ROLE_OWNER, ROLE_SPEAKER, ROLE_VIEWER, Connection, Refusal, RelayProcess, Session, Turn, live_cutoff
from relay.ops import metrics
from relay.ops.logs import get_logger

log = get_logger("relay.store.services")


def session_group_name(session_id: str) -> str:
    """Channel-layer group for a session (group names allow only a small alphabet)."""
    return "relay.s." + hashlib.sha1(session_id.encode()).hexdigest()


# --- process heartbeat ---------------------------------------------------------------------------
_process_id: str | None = None


def process_id() -> str:
    global _process_id
    if _process_id is None:
        _process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return _process_id


def process_heartbeat() -> None:
    """Create or refresh this process's row; connections of a stale process are not live."""
    now = timezone.now()
    pid = process_id()
    updated = RelayProcess.objects.filter(pk=pid).update(heartbeat_at=now, stopped_at=None)
    if not updated:
        RelayProcess.objects.update_or_create(
            pk=pid, defaults={"hostname": socket.gethostname(), "pid": os.getpid(), "heartbeat_at": now}
        )


_last_beat = 0.0


def _heartbeat_if_due() -> None:
    """Make sure this process's row exists and is fresh, without an UPDATE on every connect."""
    global _last_beat
    now = time.monotonic()
    if now - _last_beat > settings.RELAY_HEARTBEAT_SECONDS / 3:
        process_heartbeat()
        _last_beat = now


def process_stopped() -> None:
    RelayProcess.objects.filter(pk=process_id()).update(stopped_at=timezone.now())


# --- sessions and connections --------------------------------------------------------------------
@dataclass(slots=True)
class Opened:
    session_id: str
    connection_id: str
    resumed: bool
    others: list[str]
    role: str = ROLE_SPEAKER
    speaker_name: str = ""


def connection_open(
    *,
    session_id: str,
    user: Any,
    engine: str,
    since: int | None,
    client_addr: str = "",
    user_agent: str = "",
    previous: str | None = None,
    admitted: access.ConnectAccess | None = None,
) -> Opened:
    """Join (or create, under the id the client chose) the session and record the connection.

    ``admitted``: the role :func:`relay.store.access.connect_access` gave before the engine
    stream was opened; without it (or when the session appeared meanwhile) the role is decided
    here by :func:`relay.store.access.connection_role`, which refuses strangers to owned sessions.

    The connection row is written before the consumer joins the group and reads history, which
    is what makes replay gap-free (see relay.live.consumer). A connection that asked for no session
    goes through :func:`connections_open_new` instead.

    A connection that resumes one that ended uncleanly (see :func:`_resumed_connection`) gets its
    reconnection time: from the old connection's last frame to now.
    """
    _heartbeat_if_due()
    created = False
    authenticated = _authenticated(user)
    now = timezone.now()
    with transaction.atomic():
        session = Session.objects.filter(pk=session_id).first()
        if session is None:
            try:
                with transaction.atomic():
                    session = Session.objects.create(
                        pk=session_id, owner=user if authenticated else None, engine=engine, created_at=now, last_activity_at=now
                    )
                    created = True
            except IntegrityError:
                session = Session.objects.get(pk=session_id)
        if session.ended_at is not None:
            raise SessionEnded(f"This session was ended{': ' + session.end_reason if session.end_reason else ''}.")
        if created:
            role = ROLE_OWNER if authenticated else ROLE_SPEAKER
        elif admitted is not None and admitted.session_existed:
            role = admitted.role
        else:
            role = access.connection_role(user=user, session=session)
        if admitted is not None and not admitted.may_speak:
            role = ROLE_VIEWER  # it has no engine stream
        others = [str(pk) for pk in Connection.objects.live().filter(session=session).values_list("pk", flat=True)]
        if len(others) >= settings.RELAY_MAX_CONNECTIONS_PER_SESSION:
            raise SessionFull()
        gap = None
        resumed_from = None if created else _resumed_connection(session, previous, since, client_addr[:64], user_agent[:256], now)
        if resumed_from is not None:
            # The old connection stays among the others while its process may still be flushing
            # it: a resuming page waits for its last turn before re-sending audio.
            resumed_from, gap = resumed_from
        connection = Connection.objects.create(
            session=session,
            process_id=process_id(),
            engine=engine,
            resumed=not created,
            since=since,
            gap_seconds=gap,
            previous=resumed_from,
            client_addr=client_addr[:64],
            user_agent=user_agent[:256],
            user=user if authenticated else None,
            role=role,
            speaker_name=_speaker_name(session, user, previous, client_addr[:64], user_agent[:256], created),
        )
        if not created:
            Session.objects.filter(pk=session.pk).update(last_activity_at=now)
    return Opened(session_id=session.pk, connection_id=str(connection.pk), resumed=not created, others=others, role=role,
                  speaker_name=connection.speaker_name)


def _speaker_name(session: Session, user: Any, previous: str | None, client_addr: str, user_agent: str, created: bool) -> str:
    """The label a connection's turns carry: the user's display name; for a guest, the label of the
    connection it resumes (``previous_connection=``, else the same address and browser), so a
    reconnect keeps it, or the next free "Guest N"."""
    if _authenticated(user):
        return access.display_name(user)
    if created:
        return "Guest 1"
    guests = Connection.objects.filter(session=session, user__isnull=True).exclude(speaker_name="")
    if previous and (name := guests.filter(pk=previous).values_list("speaker_name", flat=True).first()):
        return name
    if client_addr:  # a client that reconnects without saying so: a closed label of its browser no open tab uses
        same = guests.filter(client_addr=client_addr, user_agent=user_agent)
        in_use = same.filter(closed_at__isnull=True).values("speaker_name")
        name = same.filter(closed_at__isnull=False).exclude(speaker_name__in=in_use).order_by("-closed_at").values_list("speaker_name", flat=True).first()
        if name:
            return name
    return f"Guest {guests.values('speaker_name').distinct().count() + 1}"


#: A client back within this long of its connection's last frame is reconnecting; later, revisiting.
RECONNECT_WINDOW_SECONDS = 120.0
#: Close codes after which a client is expected to come back: drops, and "try again later".
_CLEAN_ENDS = (1000, 1001, 1005, 4010)


def _resumed_connection(session: Session, previous: str | None, since: int | None, client_addr: str, user_agent: str, now: Any) -> tuple[Any, float] | None:
    """The connection a new one resumes, and the reconnection time; None when it resumes none.

    Exact when the client names it (``previous_connection=``); otherwise the latest connection of
    the same session from the same address and user agent, when the new one asks ``since=`` (a
    resume, not a fresh tab). Only connections that ended uncleanly (or with a retry-later code),
    or never closed (their process died), and were not resumed already, count; and only within
    ``RECONNECT_WINDOW_SECONDS`` of their last frame, so a session revisited an hour later adds
    nothing to the reconnection time.
    """
    fields = ("pk", "last_frame_at", "closed_at", "opened_at", "process__heartbeat_at", "process__stopped_at")
    candidates = Connection.objects.filter(session=session, resumed_after_seconds__isnull=True).exclude(close_code__in=_CLEAN_ENDS)
    if previous:
        old = candidates.filter(pk=previous).values(*fields).first()
    elif since is not None and client_addr:
        old = candidates.filter(client_addr=client_addr, user_agent=user_agent).order_by("-opened_at").values(*fields).first()
    else:
        return None
    if old is None:
        return None
    if old["closed_at"] is not None:
        last = old["last_frame_at"] or old["closed_at"]
    elif old["process__heartbeat_at"] is not None and old["process__stopped_at"] is None and old["process__heartbeat_at"] >= live_cutoff():
        return old["pk"], None  # its process is still closing it: the close computes the time
    else:  # its process died: it was last heard of at the process's last heartbeat
        last = max(old["last_frame_at"] or old["opened_at"], old["process__heartbeat_at"] or old["opened_at"])
    gap = max(0.0, (now - last).total_seconds())
    if gap > RECONNECT_WINDOW_SECONDS:
        return None
    Connection.objects.filter(pk=old["pk"]).update(resumed_after_seconds=gap)
    transaction.on_commit(lambda: metrics.reconnection_paired(gap))
    return old["pk"], gap


def _authenticated(user: Any) -> bool:
    return bool(user is not None and getattr(user, "is_authenticated", False))


@dataclass(slots=True)
class NewConnection:
    """A connection that asked for no session: it gets a fresh one."""

    user: Any
    engine: str
    since: int | None
    client_addr: str = ""
    user_agent: str = ""
    role: str | None = None  # viewer when the client announced it (role=viewer)


def connections_open_new(requests: list[NewConnection]) -> list[Opened]:
    """Create a fresh session and its first connection for each request: two INSERTs, one commit.

    A fresh uuid4 cannot exist yet, so there is nothing to read: no owner or end to check, no
    other connections, no gap.
    """
    _heartbeat_if_due()
    now = timezone.now()
    pid = process_id()
    sessions = []
    connections = []
    for request in requests:
        authenticated = _authenticated(request.user)
        role = request.role or (ROLE_OWNER if authenticated else ROLE_SPEAKER)
        session = Session(
            pk=str(uuid.uuid4()),
            owner=request.user if _authenticated(request.user) else None,
            engine=request.engine,
            created_at=now,
            last_activity_at=now,
        )
        sessions.append(session)
        connections.append(
            Connection(
                id=uuid.uuid4(),
                session=session,
                process_id=pid,
                engine=request.engine,
                opened_at=now,
                resumed=False,
                since=request.since,
                client_addr=request.client_addr[:64],
                user_agent=request.user_agent[:256],
                user=request.user if authenticated else None,
                role=role,
                speaker_name=access.display_name(request.user) if authenticated else "Guest 1",
            )
        )
    with transaction.atomic():
        Session.objects.bulk_create(sessions)
        Connection.objects.bulk_create(connections)
    return [
        Opened(session_id=s.pk, connection_id=str(c.pk), resumed=False, others=[], role=c.role, speaker_name=c.speaker_name)
        for s, c in zip(sessions, connections)
    ]


def turn_indexes_allocate(session_ids: list[str]) -> list[int | Exception]:
    """The next session-wide turn index for each entry, in one statement and one commit.

    One ``UPDATE ... FROM (SELECT ...) RETURNING`` (SQLite 3.33+, PostgreSQL) reserves, for every
    distinct session, as many consecutive indexes as the list asks of it; the row locks serialise
    allocations from any tab on any process. (Two processes locking two common sessions in
    opposite orders would deadlock; PostgreSQL then aborts one, and its callers retry.)
    """
    wanted = Counter(session_ids)
    table = connection.ops.quote_name(Session._meta.db_table)
    rows = " UNION ALL ".join(["SELECT %s AS sid, %s AS n"] * len(wanted))
    params: list[Any] = [timezone.now()]
    for session_id in sorted(wanted):
        params += [session_id, wanted[session_id]]
    with connection.cursor() as cursor:
        cursor.execute(
            f'UPDATE {table} SET "next_turn_index" = {table}."next_turn_index" + wanted.n, "last_activity_at" = %s '
            f'FROM ({rows}) AS wanted WHERE {table}."id" = wanted.sid '
            f'RETURNING {table}."id", {table}."next_turn_index"',  # SQLite returns only the table's own columns
            params,
        )
        first: dict[str, int] = {session_id: after - wanted[session_id] for session_id, after in cursor.fetchall()}
    return allocated_indexes(first, session_ids)


@dataclass(slots=True)
class FinishedTurn:
    session_id: str
    connection_id: str
    index: int
    event: TurnEvent


_TURN_UPDATE_FIELDS = ["connection", *EVENT_FIELDS]


def turns_record(turns: list[FinishedTurn]) -> list[frozenset[str]]:
    """Persist finished turns in one INSERT (an upsert: a retried write is harmless).

    Returns, for each turn, the ids of its session's other live connections, read after the
    commit: a joining connection that is not among them committed its row later, so its history
    read sees the turn (no gap). Connections of processes that stopped heartbeating are not live.
    """
    rows: dict[tuple[str, int], Turn] = {}
    for turn in turns:  # the same turn twice in a batch (a retry) is written once
        rows[(turn.session_id, turn.index)] = Turn(
            session_id=turn.session_id, index=turn.index, connection_id=turn.connection_id, **turn_fields(turn.event)
        )
    Turn.objects.bulk_create(
        list(rows.values()), update_conflicts=True, unique_fields=["session", "index"], update_fields=_TURN_UPDATE_FIELDS
    )
    live: dict[str, set[str]] = defaultdict(set)
    sessions = {turn.session_id for turn in turns}
    for session_id, pk in Connection.objects.live().filter(session_id__in=sessions).values_list("session_id", "pk"):
        live[session_id].add(str(pk))
    return [frozenset(live[turn.session_id] - {turn.connection_id}) for turn in turns]


def connection_flush(
    *,
    connection_id: str,
    session_id: str,
    audio_bytes: int,
    audio_seconds: float,
    messages_received: int,
    messages_sent: int,
    errors: int,
    last_error_code: str = "",
    closed: bool = False,
    close_code: int | None = None,
    close_reason: str = "",
    last_frame_at: Any = None,
) -> None:
    """Write a connection's counters (absolute values) and, when ``closed``, its end."""
    now = timezone.now()
    with transaction.atomic():
        conn = Connection.objects.select_for_update().filter(pk=connection_id).values("audio_seconds", "error_count").first()
        if conn is None:
            return
        fields: dict[str, Any] = {
            "audio_bytes": audio_bytes,
            "audio_seconds": audio_seconds,
            "messages_received": messages_received,
            "messages_sent": messages_sent,
            "error_count": errors,
        }
        if last_error_code:
            fields["last_error_code"] = last_error_code[:64]
        if last_frame_at is not None:
            fields["last_frame_at"] = last_frame_at
        if closed:
            fields.update(closed_at=now, close_code=close_code, close_reason=close_reason[:200])
            # Resumed before this close was recorded: the reconnection time is known only now.
            successor = Connection.objects.filter(previous=connection_id).order_by("opened_at").values("pk", "opened_at").first()
            if successor is not None and close_code not in _CLEAN_ENDS:
                gap = max(0.0, (successor["opened_at"] - (last_frame_at or now)).total_seconds())
                fields["resumed_after_seconds"] = gap
                Connection.objects.filter(pk=successor["pk"]).update(gap_seconds=gap)
                transaction.on_commit(lambda: metrics.reconnection_paired(gap))
        Connection.objects.filter(pk=connection_id).update(**fields)
        Session.objects.filter(pk=session_id).update(
            audio_seconds=F("audio_seconds") + (audio_seconds - conn["audio_seconds"]),
            error_count=F("error_count") + (errors - conn["error_count"]),
            last_activity_at=now,
        )


def session_end(*, session_id: str, reason: str = "Ended by an operator") -> bool:
    """End a session: refuse new connections and close every live one, on every process."""
    updated = Session.objects.filter(pk=session_id, ended_at__isnull=True).update(ended_at=timezone.now(), end_reason=reason[:200])
    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(session_group_name(session_id), {"type": "session.end", "reason": reason[:200]})
    log.info("session_ended", session=session_id, reason=reason)
    return bool(updated)


# Group commit (relay.store.batching): connects that start a session, turn indexes and finished turns
# arriving together share one transaction. Errors one item can cause are retried one by one.
_ITEM_ERRORS = (IntegrityError, DataError)
_new_connections = Batcher("connection_open", db_async(connections_open_new), split_on=_ITEM_ERRORS)


def _turn_writer(name: str, orm: Callable[[list[Any]], list[Any]]) -> Callable[[list[Any]], Awaitable[list[Any]]]:
    """Where the turn writes go: off the ORM, whose Python would hold the GIL against the audio path.
    PostgreSQL: connections of the writers' own (relay.store.loop_db); SQLite: one connection of
    the process's own (relay.store.sqlite_writes); on the event loop unless ``RELAY_TURN_WRITES``
    says ``thread``, or ``orm`` for the ORM."""
    if loop_db.available():
        return loop_db.writer(name)
    if sqlite_writes.available():
        return sqlite_writes.writer(name, orm=db_async(orm))
    return db_async(orm)


_turn_indexes = Batcher("turn_index", _turn_writer("turn_index", turn_indexes_allocate), split_on=_ITEM_ERRORS)
_finished_turns = Batcher("turn_record", _turn_writer("turn_record", turns_record), split_on=_ITEM_ERRORS)
_aconnection_open_existing = db_async(connection_open)


async def aconnection_open(
    *, session_id: str | None, user: Any, engine: str, since: int | None, client_addr: str = "", user_agent: str = "", previous: str | None = None,
    admitted: access.ConnectAccess | None = None,
) -> Opened:
    if session_id is None:
        viewer = admitted is not None and not admitted.may_speak
        return await _new_connections.submit(
            NewConnection(user=user, engine=engine, since=since, client_addr=client_addr, user_agent=user_agent, role=ROLE_VIEWER if viewer else None)
        )
    return await _aconnection_open_existing(
        session_id=session_id, user=user, engine=engine, since=since, client_addr=client_addr, user_agent=user_agent, previous=previous,
        admitted=admitted,
    )


def refusals_record(counts: dict[tuple[Any, str], int]) -> None:
    """Add refused attempts per (minute, code) to the aggregate rows, whichever process wrote first."""
    for (minute, code), n in counts.items():
        with transaction.atomic():
            if not Refusal.objects.filter(minute=minute, code=code).update(count=F("count") + n):
                try:
                    with transaction.atomic():
                        Refusal.objects.create(minute=minute, code=code, count=n)
                except IntegrityError:  # another process created it meanwhile
                    Refusal.objects.filter(minute=minute, code=code).update(count=F("count") + n)


arefusals_record = db_async(refusals_record)


# The latency of the turn writes of open streams feeds the admission check (relay.live.admission): those
# streams wait on them. A burst of connects, or the flush of streams that are closing (a mass
# disconnect), queues its own writes without being a lasting load, so those do not count.
async def aturn_index_allocate(*, session_id: str) -> int:
    started = time.monotonic()
    index = await _turn_indexes.submit(session_id)
    load.note_write(time.monotonic() - started)
    metrics.db_write("index", time.monotonic() - started)
    return index


async def aturn_record(*, session_id: str, connection_id: str, index: int, event: TurnEvent, timed: bool = True) -> frozenset[str]:
    started = time.monotonic()
    others = await _finished_turns.submit(FinishedTurn(session_id=session_id, connection_id=connection_id, index=index, event=event))
    metrics.db_write("turn", time.monotonic() - started)
    if timed:
        load.note_write(time.monotonic() - started)
    return others


aconnection_flush = db_async(connection_flush)
aprocess_heartbeat = db_async(process_heartbeat)
aprocess_stopped = db_async(process_stopped)
