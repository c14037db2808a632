"""Real PostgreSQL and Redis for tests that need them.

CI (.ci/run) makes sure both answer; the URLs come from RELAY_TEST_DATABASE_URL and
RELAY_TEST_REDIS_URL with this machine kind's defaults. A test that needs them fails, never skips,
when they are missing.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import psycopg

from tests.support.live import migrate

PG_URL = os.environ.get("RELAY_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextlib.contextmanager
def postgres_database(root: Path | None = None) -> Iterator[str]:
    """A fresh PostgreSQL database, migrated by the tree at ``root`` (this one by default); dropped
    afterwards. Yields its URL."""
    name = "relay_t_" + uuid.uuid4().hex[:10]
    admin = psycopg.connect(PG_URL, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunparse(urlparse(PG_URL)._replace(path="/" + name))
    try:
        env = {**os.environ, "DATABASE_URL": url, "DJANGO_DEBUG": "1"}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        migrate(env, **({"root": root} if root else {}))
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
