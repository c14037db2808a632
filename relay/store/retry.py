"""Database writes that outlast a database restart: retried while the database is unreachable.

A finished turn must not be lost to a database blip, so its write is retried, and the stream's
later events wait meanwhile. After ``RELAY_DB_RETRY_SECONDS`` the error is raised.

The backoff stays short (``MAX_DELAY``), so writes go through within a fraction of a second of
the database answering again, and an outage is logged once per process (``db_unavailable``,
then ``db_recovered``), not once per waiting write and retry.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError

from relay.ops.logs import get_logger

log = get_logger("relay.store")

T = TypeVar("T")
FIRST_DELAY = 0.05
MAX_DELAY = 0.25

_outage_since: float | None = None


async def with_db_retry(what: str, call: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T:
    global _outage_since
    delay = FIRST_DELAY
    deadline = time.monotonic() + settings.RELAY_DB_RETRY_SECONDS
    while True:
        try:
            result = await call(**kwargs)
        except (DatabaseError, InterfaceError) as exc:
            if _outage_since is None:
                _outage_since = time.monotonic()
                log.warning("db_unavailable", what=what, error=type(exc).__name__, detail=str(exc).strip()[:200])
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
            continue
        if _outage_since is not None:
            log.info("db_recovered", down_seconds=round(time.monotonic() - _outage_since, 2))
            _outage_since = None
        return result
