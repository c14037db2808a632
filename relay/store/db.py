"""Async wrappers for the relay's database calls.

``database_sync_to_async`` is thread-sensitive by default: every ORM call of the process queues
on one thread, which saturates at about 100 streams per process with a turn every few seconds
(docs/benchmarks.md). On PostgreSQL the relay's calls are independent short transactions, so
they run on the loop's thread pool, each thread with its own connection. SQLite allows one
writer at a time anyway, so there they stay on the single thread.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings


def db_async(fn: Callable[..., Any]) -> Callable[..., Any]:
    single_writer = settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")
    return database_sync_to_async(fn, thread_sensitive=single_writer)
