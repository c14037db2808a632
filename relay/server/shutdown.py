"""A planned stop (SIGTERM: systemctl restart, a deploy) ends streams like a close, not a crash.

Touches: Twisted's reactor (``ReactorBase.addSystemEventTrigger``, a "before shutdown" trigger,
and ``Deferred.fromFuture`` so the reactor waits for a coroutine) and, implicitly, daphne's
``Server.kill_all_applications``, which daphne registers as its own "before shutdown" trigger
when it starts the reactor and which cancels every application instance.

Why: that cancellation would drop an open turn and never record the connection's close. The
trigger registered here, while the ASGI application is imported and so before daphne's, calls
``relay.live.registry.end_all_streams``, which ends each live stream as a close (flush and store
the open turn, record the close, Error SERVER_RESTARTING, close 4012) and records the process
stop; the reactor waits for it, within RELAY_SHUTDOWN_TIMEOUT_SECONDS.
"""
from __future__ import annotations

import asyncio
import sys

from relay.server.patches import Patch, Target, require

PATCH = Patch(
    name="shutdown",
    purpose="end live streams cleanly on SIGTERM before daphne cancels them",
    framework="daphne",
    targets=(
        Target("Twisted", "twisted.internet.base", "ReactorBase.addSystemEventTrigger", params=("self", "phase", "eventType", "callable")),
        Target("Twisted", "twisted.internet.defer", "Deferred.fromFuture", params=("future",)),
        Target("daphne", "daphne.server", "Server.kill_all_applications", params=("self",)),
        Target("daphne", "daphne.server", "Server.run", uses=("addSystemEventTrigger", "kill_all_applications")),
    ),
)


async def _end_streams(timeout: float) -> None:
    # Imported when the reactor stops: the registry needs Django's apps, this module does not.
    from relay.live.registry import end_all_streams

    await end_all_streams(timeout)


def install(*, timeout: float) -> None:
    """Hook daphne's reactor, when daphne has installed one (not under uvicorn); once."""
    reactor = sys.modules.get("twisted.internet.reactor")
    # daphne.server installs the reactor when imported; the check below imports it, so only
    # look once daphne has (the guard must not install a reactor as a side effect).
    if reactor is None or "daphne.server" not in sys.modules or getattr(reactor, "_relay_shutdown_hooked", False):
        return
    if not require(PATCH):
        return
    from twisted.internet.defer import Deferred

    def before_shutdown() -> Deferred:
        return Deferred.fromFuture(asyncio.ensure_future(_end_streams(timeout)))

    reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)
    reactor._relay_shutdown_hooked = True
