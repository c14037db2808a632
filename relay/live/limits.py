"""Per-process rate limiting with no I/O: a sliding-window counter per key, bounded in memory."""
from __future__ import annotations

import time
from collections import OrderedDict, deque


class SlidingWindowLimiter:
    """Allow at most ``limit`` events per ``window`` seconds per key.

    At most ``max_keys`` keys are tracked (least recently seen dropped first), so a flood of
    distinct client addresses cannot grow memory without bound.
    """

    def __init__(self, limit: int, window: float = 60.0, max_keys: int = 100_000, clock=time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, key: str) -> bool:
        """Record one event; False when it is over the limit (the event is still counted)."""
        if self.limit <= 0:
            return True
        now = self.clock()
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
            if len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(key)
        cutoff = now - self.window
        while hits and hits[0] <= cutoff:
            hits.popleft()
        hits.append(now)
        if len(hits) > self.limit + 1:
            hits.popleft()
        return len(hits) <= self.limit
