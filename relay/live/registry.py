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


def register(stream: Stream) -> None:
    _live.add(stream)


def live_streams() -> list[Stream]:
    return [s for s in list(_live) if not s.closing]


def notify_layer(up: bool) -> None:
    """Tell every live stream that the channel layer went down (``up`` False) or came back."""
    for stream in live_streams():
        stream.layer_changed(up)


async def end_all_streams(timeout: float) -> None:
    """End every live stream with SERVER_RESTARTING (within ``timeout``) and mark the process stopped."""
    streams = live_streams()
    log.info("shutdown_streams", count=len(streams))
    if streams:
        tasks = [asyncio.ensure_future(s.end_stream(ServerRestarting())) for s in streams]
        await asyncio.wait(tasks, timeout=timeout)
    try:
        await services.aprocess_stopped()
    except Exception as exc:
        log.warning("process_stop_not_recorded", error=repr(exc))
