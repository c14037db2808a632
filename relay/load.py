"""How far behind this process's event loop runs: the signal for refusing new streams.

A stream cap by count needs sizing per machine, engine and traffic; the loop's lag says directly
when the process has no room left. A timer asks to wake every ``INTERVAL`` seconds and records
how late it woke. While the mean lag over the last ``WINDOW`` seconds exceeds
``RELAY_MAX_LOOP_LAG_MS``, new streams are refused with ``CAPACITY`` (close 4013, try again
later) and the streams already open keep the process. A mean, not a maximum, so a single
garbage-collection pause does not refuse anyone.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from django.conf import settings

INTERVAL = 0.1
WINDOW = 2.0

_samples: deque[float] = deque(maxlen=int(WINDOW / INTERVAL))
_task: asyncio.Task | None = None
_loop: asyncio.AbstractEventLoop | None = None


async def _watch() -> None:
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(INTERVAL)
        _samples.append(max(0.0, time.perf_counter() - asked - INTERVAL))


def _ensure_watching() -> None:
    global _task, _loop
    loop = asyncio.get_running_loop()
    if _task is None or _task.done() or _loop is not loop:
        _samples.clear()
        _loop = loop
        _task = loop.create_task(_watch())


def lag_ms() -> float:
    """Mean event-loop lag over the last couple of seconds, in milliseconds."""
    if not _samples:
        return 0.0
    return 1000.0 * sum(_samples) / len(_samples)


def overloaded() -> bool:
    """True while the loop runs later than RELAY_MAX_LOOP_LAG_MS; starts the watch on first use."""
    _ensure_watching()
    limit = settings.RELAY_MAX_LOOP_LAG_MS
    return limit > 0 and lag_ms() > limit
