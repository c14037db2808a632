"""Whether this process takes a new stream: rate, count and load, each measured here.

* **rate**: connection attempts per client address per minute (``RELAY_CONNECTS_PER_MINUTE``);
  past it, ``RATE_LIMITED``.
* **count**: streams this process serves (``RELAY_MAX_STREAMS_PER_PROCESS``); past it,
  ``CAPACITY``. A slot is reserved before the connection's first await, so a burst of connects
  cannot all pass the check, and given back by :func:`release`.
* **load**, each averaged over the last couple of seconds, so a single garbage-collection pause
  refuses no one:

  - *event-loop lag*: a timer asks to wake every ``INTERVAL`` seconds and records how late it
    woke;
  - *write latency*: how long the turn writes that gate the protocol (a turn's index at
    StartOfTurn, a finished turn before its EndOfTurn) take from the call to the commit,
    queueing in the group commit included. New connections' own writes and the flush of closing
    streams do not count: a burst of connects or of hang-ups slows only itself.

  While either passes its limit (``RELAY_MAX_LOOP_LAG_MS``, ``RELAY_MAX_WRITE_LATENCY_MS``), new
  streams get ``CAPACITY`` (close 4013, try again later) and the open ones keep the process.

Every measurement reads :data:`clock`, which tests replace with :func:`use_clock`.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from django.conf import settings

from relay.exceptions import Capacity, RateLimited
from relay.live.limits import SlidingWindowLimiter

INTERVAL = 0.1
WINDOW = 2.0
BUCKET = 0.5

clock: Callable[[], float] = time.monotonic

_active = 0
_connects: SlidingWindowLimiter | None = None
_lags: deque[tuple[float, float]] = deque()  # (when, lag seconds), oldest first
_writes: deque[list[float]] = deque()  # [bucket start, total seconds, count], oldest first
_task: asyncio.Task | None = None
_loop: asyncio.AbstractEventLoop | None = None


def check_rate(address: str) -> None:
    """Count a connection attempt from ``address``; raise RateLimited past the limit."""
    if not _connects_allowed(address):
        raise RateLimited("Too many connection attempts from this address; try again in a minute.")


def admit() -> None:
    """Take a stream slot, or raise Capacity (too many streams, or the process is overloaded)."""
    global _active
    if _active >= settings.RELAY_MAX_STREAMS_PER_PROCESS:
        raise Capacity()
    busy = overloaded()
    if busy:
        raise Capacity(f"This relay process is overloaded ({busy}); try again later.")
    _active += 1


def release() -> None:
    """Give back a slot :func:`admit` took."""
    global _active
    _active = max(0, _active - 1)


def active_streams() -> int:
    """Streams this process is serving now."""
    return _active


def _connects_allowed(address: str) -> bool:
    global _connects
    limit = settings.RELAY_CONNECTS_PER_MINUTE
    if _connects is None or _connects.limit != limit:
        _connects = SlidingWindowLimiter(limit, 60.0, clock=lambda: clock())
    return _connects.hit(address)


# -- load -------------------------------------------------------------------------------------
async def _watch() -> None:
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(INTERVAL)
        note_lag(max(0.0, time.perf_counter() - asked - INTERVAL))


def _ensure_watching() -> None:
    global _task, _loop
    loop = asyncio.get_running_loop()
    if _task is None or _task.done() or _loop is not loop:
        _lags.clear()
        _loop = loop
        _task = loop.create_task(_watch())


def note_lag(seconds: float) -> None:
    """The loop woke ``seconds`` later than asked."""
    now = clock()
    _lags.append((now, seconds))
    while _lags and _lags[0][0] < now - WINDOW:
        _lags.popleft()


def lag_ms() -> float:
    """Mean event-loop lag over the last couple of seconds, in milliseconds."""
    since = clock() - WINDOW
    recent = [lag for when, lag in _lags if when >= since]
    return 1000.0 * sum(recent) / len(recent) if recent else 0.0


def note_write(seconds: float) -> None:
    """One turn write took ``seconds`` from the call to the commit."""
    now = clock()
    start = now - now % BUCKET
    if not _writes or _writes[-1][0] != start:
        _writes.append([start, 0.0, 0])
        while _writes and _writes[0][0] < now - WINDOW - BUCKET:
            _writes.popleft()
    bucket = _writes[-1]
    bucket[1] += seconds
    bucket[2] += 1


def _recent_writes() -> tuple[float, int]:
    since = clock() - WINDOW - BUCKET
    total, count = 0.0, 0
    for start, seconds, n in _writes:
        if start >= since:
            total += seconds
            count += int(n)
    return total, count


def write_latency_ms() -> float:
    """Mean latency of the turn writes of the last couple of seconds (0 without writes)."""
    total, count = _recent_writes()
    return 1000.0 * total / count if count else 0.0


def writes_counted() -> int:
    """How many turn writes the current window holds (what the write-latency mean is over)."""
    return _recent_writes()[1]


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


def use_clock(new_clock: Callable[[], float]) -> None:
    """Measure with ``new_clock`` (tests pass a fake one) and forget what was measured."""
    global clock
    clock = new_clock
    reset()


def reset() -> None:
    """Forget the measurements and the connect counts."""
    global _connects
    _lags.clear()
    _writes.clear()
    _connects = None
