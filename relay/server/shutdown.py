"""A planned stop (SIGTERM: systemctl restart, a deploy) ends streams like a close, not a crash.

daphne cancels every application instance when its reactor shuts down, so an open turn would be
dropped and the connection's close never recorded. A "before shutdown" trigger registered here
(earlier than daphne's own) ends each live stream the way a fatal error does (flush and store
the open turn, record the close, send Error SERVER_RESTARTING and close with 4012) and marks the
process stopped; the reactor waits for it, within RELAY_SHUTDOWN_TIMEOUT_SECONDS.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from typing import Any

log = logging.getLogger("relay.consumer")

_live: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(consumer: Any) -> None:
    _live.add(consumer)


async def end_all_streams(timeout: float) -> None:
    from relay.store import services
    from relay.exceptions import ServerRestarting

    consumers = [c for c in list(_live) if not getattr(c, "closing", True)]
    log.info("shutdown_streams count=%d", len(consumers))
    if consumers:
        tasks = [asyncio.ensure_future(c._fatal(ServerRestarting())) for c in consumers]
        await asyncio.wait(tasks, timeout=timeout)
    try:
        await services.aprocess_stopped()
    except Exception:
        log.warning("process_stop_not_recorded", exc_info=True)


def install(timeout: float) -> None:
    """Hook daphne's reactor, when there is one (not under uvicorn or in-process tests)."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None or getattr(reactor, "_relay_shutdown_hooked", False):
        return
    from twisted.internet.defer import Deferred

    def before_shutdown() -> Deferred:
        return Deferred.fromFuture(asyncio.ensure_future(end_all_streams(timeout)))

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    reactor._relay_shutdown_hooked = True
