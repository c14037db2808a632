"""Database writes that outlast a database restart: retried while the database is unreachable.

A finished turn must not be lost to a database blip, so its write is retried, and the stream's
later events wait meanwhile. After ``RELAY_DB_RETRY_SECONDS`` the error is raised.
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
FIRST_DELAY = 0.1
MAX_DELAY = 2.0


async def with_db_retry(what: str, call: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T:
    delay = FIRST_DELAY
    deadline = time.monotonic() + settings.RELAY_DB_RETRY_SECONDS
    while True:
        try:
            return await call(**kwargs)
        except (DatabaseError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("db_retry", what=what, error=type(exc).__name__, retry_in=f"{delay:.1f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
