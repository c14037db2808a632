"""Which finished turns one tab has been sent, so it can notice one it missed. No I/O.

Turn indexes are session-wide and contiguous: each is reserved when a turn starts, on whatever
tab or process. A tab hears of other tabs' turns through the channel layer, which can drop a
message (Redis restarting). So a tab that sees a finished turn whose index skips one it never
heard of reads the skipped ones from the store and sends them, marked ``replayed``.

An index below the one just finished may be missing from the store for two good reasons: its
turn is still in progress (another speaker), or it died with its process and was never stored (a
hole). A turn this tab saw start is in progress until its speaker finishes a later one: one
speaker's turns end in order, so an open turn of a speaker who just finished a later turn was
missed. Neither is waited for: an index read once and not found is remembered as *unresolved*, and
its final is still sent if it arrives live; a resync after a channel-layer outage reads again from
the oldest unresolved one.
"""
from __future__ import annotations

#: Past this many indexes between two finished turns, the gap is not enumerated, only read.
WIDE_GAP = 1000


class TurnLedger:
    """The turn indexes one tab has been sent, compacted below a floor."""

    __slots__ = ("floor", "_above", "_open", "_unresolved")

    def __init__(self, floor: int = -1) -> None:
        self.floor = floor  # every index <= floor is sent, or open, or unresolved
        self._above: set[int] = set()  # sent, above the floor
        self._open: dict[int, str] = {}  # another tab's turn seen in progress -> its speaker
        self._unresolved: set[int] = set()  # read from the store, not there (in progress unheard, or a hole)

    def sent(self, index: int) -> bool:
        """Whether this tab has had the finished turn ``index``."""
        if index in self._above:
            return True
        return index <= self.floor and index not in self._open and index not in self._unresolved

    def mark_sent(self, index: int) -> None:
        self._open.pop(index, None)
        self._unresolved.discard(index)
        if index > self.floor:
            self._above.add(index)
            self._advance()

    def mark_open(self, index: int, speaker: str) -> None:
        """A live event of ``speaker``'s turn ``index`` that has not finished."""
        if not self.sent(index):
            self._open[index] = speaker
            self._advance()

    def gap_before(self, index: int, speaker: str) -> int | None:
        """``after`` for a read of what this tab missed before ``speaker``'s finished turn ``index``.

        None when nothing was missed: every index between is sent, or another speaker's turn in
        progress, or already read and not found.
        """
        stale = [j for j, who in self._open.items() if j < index and who == speaker]
        if stale:
            return min(min(stale) - 1, self.floor)
        if index - self.floor > WIDE_GAP or any(self._unheard(j) for j in range(self.floor + 1, index)):
            return self.floor
        return None

    def read_done(self, after: int, before: int | None) -> None:
        """The store was read for ``after < index < before``: what is still unheard is unresolved."""
        if before is None or before - after > WIDE_GAP:
            return
        for j in range(after + 1, before):
            if self._unheard(j) or j in self._open:
                self._open.pop(j, None)
                self._unresolved.add(j)
        self._advance()

    def resync_from(self) -> int:
        """Read from after this index to catch up after an outage of the channel layer."""
        pending = self._open.keys() | self._unresolved
        return min([self.floor, *(j - 1 for j in pending)])

    def _unheard(self, j: int) -> bool:
        return j > self.floor and j not in self._above and j not in self._open and j not in self._unresolved

    def _advance(self) -> None:
        floor, above = self.floor, self._above
        while floor + 1 in above or floor + 1 in self._open or floor + 1 in self._unresolved:
            floor += 1
            above.discard(floor)
        self.floor = floor
