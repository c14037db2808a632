"""Is this process past its capacity? The signal for refusing new streams.

A stream cap by count needs sizing per machine, engine and traffic; two measurements say it
directly, each averaged over the last couple of seconds:

* **event-loop lag**: a timer asks to wake every ``INTERVAL`` seconds and records how late it
  woke. A mean, not a maximum, so a single garbage-collection pause refuses no one.
* **write latency**: how long the turn writes that gate the protocol (a turn's index at
  StartOfTurn, a finished turn before its EndOfTurn) take from the call to the commit, queueing
  in the group commit included. A process whose loop still turns but whose writes wait behind a
  saturated CPU (or a slow database) delays every EndOfTurn. New connections' own writes do not
  count: a burst of connects slows only itself, and is served.

While either mean passes its limit (``RELAY_MAX_LOOP_LAG_MS``, ``RELAY_MAX_WRITE_LATENCY_MS``),
new streams are refused with ``CAPACITY`` (close 4013, try again later), and the streams already
open keep the process.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from django.conf import settings

INTERVAL = 0.1
WINDOW = 2.0
_BUCKET = 0.5

_lags: deque[float] = deque(maxlen=int(WINDOW / INTERVAL))
_task: asyncio.Task | None = None
_loop: asyncio.AbstractEventLoop | None = None
_writes: deque[list[float]] = deque()  # [bucket start, total seconds, count], oldest first


async def _watch() -> None:
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(INTERVAL)
        _lags.append(max(0.0, time.perf_counter() - asked - INTERVAL))


def _ensure_watching() -> None:
    global _task, _loop
    loop = asyncio.get_running_loop()
    if _task is None or _task.done() or _loop is not loop:
        _lags.clear()
        _loop = loop
        _task = loop.create_task(_watch())


def lag_ms() -> float:
    """Mean event-loop lag over the last couple of seconds, in milliseconds."""
    if not _lags:
        return 0.0
    return 1000.0 * sum(_lags) / len(_lags)


def note_write(seconds: float) -> None:
    """One turn write took ``seconds`` from the call to the commit."""
    now = time.monotonic()
    start = now - now % _BUCKET
    if not _writes or _writes[-1][0] != start:
        _writes.append([start, 0.0, 0])
        while _writes and _writes[0][0] < now - WINDOW - _BUCKET:
            _writes.popleft()
    bucket = _writes[-1]
    bucket[1] += seconds
    bucket[2] += 1


def write_latency_ms() -> float:
    """Mean latency of the turn writes of the last couple of seconds (0 without writes)."""
    since = time.monotonic() - WINDOW - _BUCKET
    total = count = 0.0
    for start, seconds, n in _writes:
        if start >= since:
            total += seconds
            count += n
    return 1000.0 * total / count if count else 0.0


def overloaded() -> str:
    """Why new streams should be refused now ('' when they are welcome); starts the lag watch."""
    _ensure_watching()
    lag_limit = settings.RELAY_MAX_LOOP_LAG_MS
    if lag_limit > 0 and lag_ms() > lag_limit:
        return f"its event loop runs {lag_ms():.0f} ms late"
    write_limit = settings.RELAY_MAX_WRITE_LATENCY_MS
    if write_limit > 0 and write_latency_ms() > write_limit:
        return f"its database writes take {write_latency_ms():.0f} ms"
    return ""


def reset() -> None:
    """Forget the measurements (tests)."""
    _lags.clear()
    _writes.clear()
