"""Async wrappers for the relay's database calls.

``database_sync_to_async`` is thread-sensitive by default: every ORM call of the process queues
on one thread, which saturates at about 100 streams per process with a turn every few seconds
(docs/benchmarks.md). On PostgreSQL the relay's calls are independent short transactions, so
they run on the loop's thread pool, each thread with its own connection. SQLite allows one
writer at a time anyway, so there they stay on the single thread (the turn writes, the hot
path, have their own connection: ``relay.store.sqlite_writes``).
"""
from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from channels.db import database_sync_to_async
from django import db as django_db
from django.conf import settings

# PEP 249's exception classes, the most specific first; Django's own have the same names.
_DB_API_ERRORS = ("DataError", "OperationalError", "IntegrityError", "InternalError", "ProgrammingError", "NotSupportedError",
                  "DatabaseError", "InterfaceError", "Error")


def db_async(fn: Callable[..., Any]) -> Callable[..., Any]:
    single_writer = settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")
    return database_sync_to_async(fn, thread_sensitive=single_writer)


def django_error(exc: Exception, driver: ModuleType) -> Exception:
    """The Django exception an error of the DB-API ``driver`` (``psycopg``, ``sqlite3``) maps to,
    as Django's own cursor wrapper maps it, for code that calls the driver without the ORM."""
    for name in _DB_API_ERRORS:
        if isinstance(exc, getattr(driver, name)):
            return getattr(django_db, name)(*exc.args)
    return django_db.Error(*exc.args)
