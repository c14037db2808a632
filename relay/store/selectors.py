"""Reads: session history and live membership. Keyword-only, typed, no writes."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from relay.store.db import db_async
from relay.store.turns import ROW_FIELDS, turn_record
from relay.models import Connection, Turn


def turn_page(*, session_id: str, after_index: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` finished turns with index > ``after_index``, oldest first (keyset paging).

    Each is a record as :func:`relay.store.turns.turn_record` makes it.
    """
    rows = Turn.objects.filter(session_id=session_id, index__gt=after_index).order_by("index").values(*ROW_FIELDS)[:limit]
    return [turn_record(row) for row in rows]


def turns_between(*, session_id: str, after_index: int, before_index: int | None, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` finished turns with ``after_index < index < before_index``, oldest first."""
    rows = Turn.objects.filter(session_id=session_id, index__gt=after_index)
    if before_index is not None:
        rows = rows.filter(index__lt=before_index)
    return [turn_record(row) for row in rows.order_by("index").values(*ROW_FIELDS)[:limit]]


def turn_pages(*, session_id: str, after_index: int = -1, page_size: int) -> Iterator[list[dict[str, Any]]]:
    """Every finished turn with index > ``after_index``, a non-empty page at a time, oldest first.

    A page shorter than ``page_size`` is the last; a long history is never held in memory.
    """
    while True:
        page = turn_page(session_id=session_id, after_index=after_index, limit=page_size)
        if page:
            yield page
        if len(page) < page_size:
            return
        after_index = page[-1]["index"]


async def aturn_pages(*, session_id: str, after_index: int = -1, page_size: int) -> AsyncIterator[list[dict[str, Any]]]:
    """:func:`turn_pages` for async code: one thread hop per page."""
    while True:
        page = await aturn_page(session_id=session_id, after_index=after_index, limit=page_size)
        if page:
            yield page
        if len(page) < page_size:
            return
        after_index = page[-1]["index"]


def session_live_connection_count(*, session_id: str) -> int:
    return Connection.objects.live().filter(session_id=session_id).count()


aturn_page = db_async(turn_page)
aturns_between = db_async(turns_between)
asession_live_connection_count = db_async(session_live_connection_count)
