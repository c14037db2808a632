"""This process's heartbeat: its row in the store, and the closes the store refused meanwhile.

Connections of a process that stops heartbeating stop counting as live (``RelayProcess`` rows,
``RELAY_HEARTBEAT_SECONDS``). A connection close the database refused (an outage longer than
``RELAY_DB_RETRY_SECONDS``) is kept here and written by the next beat that reaches the database;
until then that connection counts as live for as long as this process beats.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

from relay.ops import metrics
from relay.ops.logs import get_logger
from relay.store import services
from relay.store.retry import with_db_retry

log = get_logger("relay.consumer")

_task: asyncio.Task | None = None
_unrecorded: dict[str, dict[str, Any]] = {}
_refusals: Counter[tuple[datetime, str]] = Counter()


async def _beat_forever() -> None:
    while True:
        try:
            await beat()
        except Exception as exc:  # the database may be restarting; try again next beat
            log.warning("heartbeat_failed", process=services.process_id(), error=repr(exc))
        await asyncio.sleep(settings.RELAY_HEARTBEAT_SECONDS)


async def beat() -> None:
    """Refresh this process's row, write the closes still unrecorded and the refusals counted."""
    await services.aprocess_heartbeat()
    for connection_id, close in list(_unrecorded.items()):
        await services.aconnection_flush(**close)
        _unrecorded.pop(connection_id, None)
    if _refusals:
        counts = dict(_refusals)
        _refusals.clear()
        try:
            await services.arefusals_record(counts)
        except Exception:
            _refusals.update(counts)  # kept for the next beat
            raise


def note_refusal(code: str) -> None:
    """A connection attempt refused before it became a connection (CAPACITY, UNAUTHORIZED, ...)."""
    now = timezone.now()
    _refusals[(now.replace(second=0, microsecond=0), code[:64])] += 1
    metrics.REFUSALS.labels(code=code[:64]).inc()


def start_with_server() -> None:
    """Beat from the process's start, not its first stream, so an idle process is listed.

    Under daphne (Twisted's asyncio reactor) the beat starts once the reactor runs; elsewhere
    (uvicorn, tests) at the first stream.
    """
    import sys

    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is not None and hasattr(reactor, "callWhenRunning"):
        # Startup triggers run before the asyncio loop turns; the next tick is inside it.
        reactor.callWhenRunning(lambda: reactor.callLater(0, ensure_running))


def ensure_running() -> None:
    """Start the heartbeat on the running loop unless it runs already."""
    global _task
    if _task is None or _task.done():
        _task = asyncio.get_running_loop().create_task(_beat_forever())


async def record_close(**close: Any) -> None:
    """Write a connection's end, retried through a database restart; else the heartbeat writes it."""
    try:
        await with_db_retry("connection_close", services.aconnection_flush, **close)
    except Exception:
        log.exception("close_not_recorded", session=close["session_id"], connection=close["connection_id"])
        _unrecorded[close["connection_id"]] = close


def unrecorded_closes() -> int:
    return len(_unrecorded)
