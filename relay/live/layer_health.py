"""Whether this process's channel layer (Redis) is up, told once per outage, and what follows.

An outage of the layer is one the relay handles: the speaker's own transcript goes on, finished
turns are stored, and other tabs are resynced from the store when the layer is back. So it is
logged as one ``layer_failed`` warning and one ``layer_recovered`` line per process and outage,
with no traceback, and channels_redis's own "Unexpected exception in receive task" traceback
(logged once per Redis restart) is folded into the same pair.

While the layer is down, a probe sends to a group of its own every ``PROBE_SECONDS``; the first
send that succeeds ends the outage. Then every live stream reads the finished turns it may have
missed (:meth:`relay.live.session.StreamSession.layer_up`), once at once and once more
``RESYNC_AGAIN_SECONDS`` later, because Redis takes publishes a moment before the pub/sub
subscription that delivers them is back.
"""
from __future__ import annotations

import asyncio
import logging
import time

from relay.live import registry
from relay.ops import metrics
from relay.ops.logs import get_logger

log = get_logger("relay.layer")

PROBE_SECONDS = 0.5
RESYNC_AGAIN_SECONDS = 2.0
PROBE_GROUP = "relay.health"

_down_since: float | None = None
_probe: asyncio.Task | None = None


def is_down() -> bool:
    return _down_since is not None


def failed(where: str, exc: BaseException | None) -> None:
    """A channel-layer call failed (``where``: the method, or the receive task)."""
    global _down_since
    if _down_since is not None:
        return
    _down_since = time.monotonic()
    log.warning("layer_failed", where=where, error=type(exc).__name__ if exc else "", detail=str(exc)[:200] if exc else "")
    metrics.LAYER_OUTAGES.inc()
    registry.notify_layer(up=False)
    _ensure_probe()


def succeeded() -> None:
    """A channel-layer call worked: ends an outage if there was one."""
    global _down_since
    if _down_since is None:
        return
    down = time.monotonic() - _down_since
    _down_since = None
    log.info("layer_recovered", down_seconds=round(down, 2))
    registry.notify_layer(up=True)
    try:
        asyncio.get_running_loop().call_later(RESYNC_AGAIN_SECONDS, registry.notify_layer, True)
    except RuntimeError:
        pass


def _ensure_probe() -> None:
    global _probe
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if _probe is None or _probe.done():
        _probe = loop.create_task(_probe_until_up())


async def _probe_until_up() -> None:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    while _down_since is not None and layer is not None:
        await asyncio.sleep(PROBE_SECONDS)
        try:
            await layer.group_send(PROBE_GROUP, {"type": "relay.probe"})
        except Exception:
            continue
        succeeded()


class _ReceiveTaskFilter(logging.Filter):
    """channels_redis's pub/sub receive task logs a traceback when Redis goes away; fold it in."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Unexpected exception in receive task" not in record.getMessage():
            return True
        failed("receive", record.exc_info[1] if record.exc_info else None)
        return False


def install() -> None:
    """Fold channels_redis's outage traceback into ``layer_failed`` (idempotent)."""
    logger = logging.getLogger("channels_redis.pubsub")
    if not any(isinstance(f, _ReceiveTaskFilter) for f in logger.filters):
        logger.addFilter(_ReceiveTaskFilter())


def reset() -> None:
    """Forget an outage (tests)."""
    global _down_since
    _down_since = None
