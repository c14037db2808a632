"""A clock tests move by hand, for code that takes an injectable clock."""
from __future__ import annotations


class FakeClock:
    """Callable like ``time.monotonic``; time passes only through :meth:`advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
