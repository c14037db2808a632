"""A finished turn's fields, defined once: the engine's EndOfTurn to a ``Turn`` row and back.

The writer (``services.turns_record``), the reader (``selectors.turn_page``), the replayed
``TurnInfo`` (``relay.flux.protocol.turn_info_from_record``) and the JSON export all go through
these functions, so a field added to ``TurnEvent`` and ``Turn`` is stored, replayed and exported
by adding it here. No ORM calls: rows are plain dicts from ``.values()``.
"""
from __future__ import annotations

from typing import Any

from relay.engines.base import TurnEvent, Word
from relay.models import Connection, RelayProcess, Session

#: ``Turn`` fields that come from the engine's event; each is named as on ``TurnEvent``.
EVENT_FIELDS = (
    "transcript",
    "words",
    "audio_window_start",
    "audio_window_end",
    "end_of_turn_confidence",
    "trigger",
    "languages",
)
#: What a history read loads per turn: the event's fields and where the turn sits.
ROW_FIELDS = ("index", *EVENT_FIELDS, "connection_id", "created_at", "connection__speaker_name")


def turn_fields(event: TurnEvent) -> dict[str, Any]:
    """The ``Turn`` field values (JSON-ready) of a finished turn's event."""
    return {
        "transcript": event.transcript,
        "words": [w.as_dict() for w in event.words],
        "audio_window_start": event.audio_window_start,
        "audio_window_end": event.audio_window_end,
        "end_of_turn_confidence": event.end_of_turn_confidence,
        "trigger": event.trigger or "model",
        "languages": list(event.languages or ()),
    }


def turn_record(row: dict[str, Any]) -> dict[str, Any]:
    """A ``.values(*ROW_FIELDS)`` row as the record replay and exports read.

    ``index``, ``connection_id`` and ``created_at`` as stored; ``speaker``, the connection id as
    a string ("" when that connection's row is gone); ``speaker_name``, that connection's label
    (a user's display name, or "Guest N"); ``event``, the turn as the EndOfTurn
    :class:`TurnEvent` it was, so a replayed body is built by the same code as a live one.
    """
    fields = {name: row[name] for name in EVENT_FIELDS}
    fields["words"] = [Word(**w) for w in fields["words"]]
    fields["languages"] = fields["languages"] or None
    return {
        "index": row["index"],
        "connection_id": row["connection_id"],
        "speaker": str(row["connection_id"]) if row["connection_id"] else "",
        "speaker_name": row.get("connection__speaker_name") or "",
        "created_at": row["created_at"],
        "event": TurnEvent(event="EndOfTurn", turn=row["index"], **fields),
    }


def allocated_indexes(first: dict[str, int], session_ids: list[str]) -> list[int | Exception]:
    """Each request's turn index, in request order, from each session's first newly allocated one
    (one locked ``UPDATE ... RETURNING`` per batch); ``Session.DoesNotExist`` for a session that
    was not found. Shared by the ORM writer and relay.store.loop_db's."""
    first = dict(first)
    results: list[int | Exception] = []
    for session_id in session_ids:
        index = first.get(session_id)
        if index is None:
            results.append(Session.DoesNotExist(session_id))
        else:
            results.append(index)
            first[session_id] = index + 1
    return results


def live_connections_sql(quote_name: Any, sessions: str, cutoff: str) -> str:
    """``Connection.objects.live()`` of a batch of sessions as one SQL statement for the turn
    writers that bypass the ORM: (session, connection id) of each open connection whose process
    heartbeated at or after the ``cutoff`` placeholder and has not stopped. ``sessions`` is the
    condition on the session column, with ``{}`` where that column goes."""
    conn, proc = quote_name(Connection._meta.db_table), quote_name(RelayProcess._meta.db_table)
    c = lambda name: f"{conn}.{quote_name(Connection._meta.get_field(name).column)}"  # noqa: E731
    p = lambda name: f"{proc}.{quote_name(RelayProcess._meta.get_field(name).column)}"  # noqa: E731
    return (f"SELECT {c('session')}, {c('id')} FROM {conn} JOIN {proc} ON {p('id')} = {c('process')} "
            f"WHERE {sessions.format(c('session'))} AND {c('closed_at')} IS NULL AND {p('heartbeat_at')} >= {cutoff} AND {p('stopped_at')} IS NULL")
