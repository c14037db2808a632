"""Reads: session history and live membership. Keyword-only, typed, no writes."""
from __future__ import annotations

from typing import Any

from relay.store.db import db_async
from relay.models import Connection, Turn

TURN_FIELDS = (
    "index",
    "transcript",
    "words",
    "audio_window_start",
    "audio_window_end",
    "end_of_turn_confidence",
    "trigger",
    "connection_id",
    "created_at",
)


def _record(row: dict[str, Any]) -> dict[str, Any]:
    row["speaker"] = str(row["connection_id"]) if row["connection_id"] else ""
    return row


def turn_page(*, session_id: str, after_index: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` finished turns with index > ``after_index``, oldest first (keyset paging)."""
    rows = Turn.objects.filter(session_id=session_id, index__gt=after_index).order_by("index").values(*TURN_FIELDS)[:limit]
    return [_record(row) for row in rows]


def session_live_connection_count(*, session_id: str) -> int:
    return Connection.objects.live().filter(session_id=session_id).count()


aturn_page = db_async(turn_page)
asession_live_connection_count = db_async(session_live_connection_count)
