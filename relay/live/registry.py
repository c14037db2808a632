"""The streams this process serves, so a planned stop can end each one properly.

A SIGTERM (systemctl restart, a deploy) must end streams the way an error does: flush and store
the open turn, record the close, send ``Error`` ``SERVER_RESTARTING`` and close with 4012, not
drop them. ``relay.server.shutdown`` calls :func:`end_all_streams` before daphne cancels the
application instances.
"""
from __future__ import annotations

import asyncio
import weakref
from typing import Protocol

from relay.exceptions import RelayError, ServerRestarting
from relay.ops.logs import get_logger
from relay.store import services

log = get_logger("relay.consumer")


class Stream(Protocol):
    closing: bool

    async def end_stream(self, error: RelayError) -> None: ...

    def layer_changed(self, up: bool) -> None: ...


_live: "weakref.WeakSet[Stream]" = weakref.WeakSet()
#: Loop time by which a stopping process's flushes must end, leaving the rest of
#: RELAY_SHUTDOWN_TIMEOUT_SECONDS for storing the turns and recording the closes; None while running.
_stop_by: float | None = None
#: What a stop keeps for that, out of the shutdown timeout (at most half of it).
STORE_MARGIN_S = 2.0


def flush_deadline() -> float | None:
    """When a flush must end because the process is stopping (loop time), or None."""
    return _stop_by


def register(stream: Stream) -> None:
    _live.add(stream)


def live_streams() -> list[Stream]:
    return [s for s in list(_live) if not s.closing]


def notify_layer(up: bool) -> None:
    """Tell every live stream that the channel layer went down (``up`` False) or came back."""
    for stream in live_streams():
        stream.layer_changed(up)


async def end_all_streams(timeout: float) -> None:
    """End every live stream with SERVER_RESTARTING (within ``timeout``) and mark the process stopped.

    A flush that would outlast the stop (an engine still working through a backlog) is cut in
    time to store what it finished and record the close before daphne cancels the streams."""
    global _stop_by
    _stop_by = asyncio.get_running_loop().time() + max(timeout - STORE_MARGIN_S, timeout / 2)
    streams = live_streams()
    log.info("shutdown_streams", count=len(streams))
    try:
        if streams:
            tasks = [asyncio.ensure_future(s.end_stream(ServerRestarting())) for s in streams]
            await asyncio.wait(tasks, timeout=timeout)
    finally:
        _stop_by = None  # daphne cancels what is left next
    try:
        await services.aprocess_stopped()
    except Exception as exc:
        log.warning("process_stop_not_recorded", error=repr(exc))
