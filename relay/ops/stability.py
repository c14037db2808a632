"""The four stability metrics the relay is judged by, computed from connection histories.

Pure functions over :class:`ConnectionRecord` values (no ORM, no clock), so each metric is
testable on a constructed history with a known answer; :func:`records_from_rows` adapts
``Connection`` rows loaded by ``relay.ops.dashboard``.

Definitions (docs/operations.md repeats them for operators):

* **connection duration**: median duration of the connections that *ended* in the window.
  Good 5+ minutes, bad under 30 seconds.
* **disconnection rate**: share of the connections that ended in the window other than by a
  clean close. Clean is a normal client or server close (1000, 1001, 1005 "no status") or an
  operator ending the session (4010). Abrupt drops (1006), error closes (other 4xxx, 1011) and
  connections orphaned by a crashed relay process count as disconnections. Planned restarts
  (4012, SERVER_RESTARTING: a deploy) are left out and counted apart. Good < 5%, bad > 20%.
* **error rate**: share of the connections that ended in the window having hit at least one
  error (a relay ``Error`` sent, so ``error_count > 0``), planned restarts left out.
  Good < 1%, bad > 5%.
* **reconnection time**: for the connections that ended uncleanly (or with a retry-later code)
  in the window and whose client came back, the median time from the last frame the relay
  received on the old connection to the resuming connection's open (``resumed_after_seconds``,
  paired by ``previous_connection=`` or the same client resuming with ``since=``, within two
  minutes). Those whose client never came back are counted apart as "not resumed".
  Good < 500 ms, bad > 2 s.

Refused connection attempts (CAPACITY, RATE_LIMITED, UNAUTHORIZED, ...) never become
connections; they are counted per code in ``Refusal`` rows and shown beside these metrics.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

Level = Literal["good", "warn", "bad", "none"]

#: Close codes that end a connection cleanly (a normal close by either side, or an operator
#: ending the session).
CLEAN_CLOSE_CODES = frozenset({1000, 1001, 1005, 4010})
#: A planned restart (SIGTERM: a deploy): not a failure of the connection, counted apart.
PLANNED_CLOSE_CODES = frozenset({4012})


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """What the metrics need to know about one connection.

    ``ended_at`` is None while the connection is live. A connection orphaned by a crashed
    process has ``ended_at`` (its process's last heartbeat) but no ``close_code``.
    """

    opened_at: datetime
    ended_at: datetime | None
    close_code: int | None = None
    error_count: int = 0
    resumed: bool = False
    resumed_after_seconds: float | None = None

    @property
    def duration_seconds(self) -> float | None:
        if self.ended_at is None:
            return None
        return max(0.0, (self.ended_at - self.opened_at).total_seconds())

    @property
    def clean(self) -> bool:
        return self.close_code in CLEAN_CLOSE_CODES

    @property
    def planned(self) -> bool:
        return self.close_code in PLANNED_CLOSE_CODES


@dataclass(frozen=True, slots=True)
class Threshold:
    """Good/bad boundaries; ``higher_is_better`` flips the comparisons."""

    good: float
    bad: float
    higher_is_better: bool = False

    def level(self, value: float | None) -> Level:
        if value is None:
            return "none"
        if self.higher_is_better:
            if value >= self.good:
                return "good"
            return "bad" if value < self.bad else "warn"
        if value < self.good:
            return "good"
        return "bad" if value > self.bad else "warn"


CONNECTION_DURATION = Threshold(good=300.0, bad=30.0, higher_is_better=True)
DISCONNECTION_RATE = Threshold(good=0.05, bad=0.20)
ERROR_RATE = Threshold(good=0.01, bad=0.05)
RECONNECTION_TIME = Threshold(good=0.5, bad=2.0)


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    value: float | None
    unit: Literal["seconds", "ratio"]
    level: Level
    samples: int
    threshold: Threshold
    detail: str = ""

    @property
    def display(self) -> str:
        if self.value is None:
            return "no data"
        if self.unit == "ratio":
            return f"{self.value * 100:.1f}%"
        return format_seconds(self.value)

    @property
    def thresholds_display(self) -> str:
        t = self.threshold
        fmt = (lambda v: f"{v * 100:g}%") if self.unit == "ratio" else format_seconds
        if t.higher_is_better:
            return f"good ≥ {fmt(t.good)}, bad < {fmt(t.bad)}"
        return f"good < {fmt(t.good)}, bad > {fmt(t.bad)}"


def format_seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60):02d} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60):02d} min"


def _in(moment: datetime | None, start: datetime, end: datetime) -> bool:
    return moment is not None and start <= moment < end


def ended_in(records: Iterable[ConnectionRecord], start: datetime, end: datetime) -> list[ConnectionRecord]:
    return [r for r in records if _in(r.ended_at, start, end)]


def connection_duration(records: Sequence[ConnectionRecord], start: datetime, end: datetime) -> Metric:
    durations = [r.duration_seconds for r in ended_in(records, start, end)]
    values = [d for d in durations if d is not None]
    value = statistics.median(values) if values else None
    detail = f"p10 {format_seconds(_quantile(values, 0.1))}, p90 {format_seconds(_quantile(values, 0.9))}" if values else ""
    return Metric("connection_duration", "Connection duration (median)", value, "seconds", CONNECTION_DURATION.level(value), len(values), CONNECTION_DURATION, detail)


def disconnection_rate(records: Sequence[ConnectionRecord], start: datetime, end: datetime) -> Metric:
    ended = [r for r in ended_in(records, start, end) if not r.planned]
    unclean = sum(1 for r in ended if not r.clean)
    value = unclean / len(ended) if ended else None
    detail = f"{unclean} of {len(ended)} ended uncleanly" if ended else ""
    return Metric("disconnection_rate", "Disconnection rate", value, "ratio", DISCONNECTION_RATE.level(value), len(ended), DISCONNECTION_RATE, detail)


def error_rate(records: Sequence[ConnectionRecord], start: datetime, end: datetime) -> Metric:
    ended = [r for r in ended_in(records, start, end) if not r.planned]
    failed = sum(1 for r in ended if r.error_count > 0)
    value = failed / len(ended) if ended else None
    detail = f"{failed} of {len(ended)} hit an error" if ended else ""
    return Metric("error_rate", "Error rate", value, "ratio", ERROR_RATE.level(value), len(ended), ERROR_RATE, detail)


def resumable_ends(records: Sequence[ConnectionRecord], start: datetime, end: datetime) -> list[ConnectionRecord]:
    """Connections that ended in the window in a way their client is expected to come back from."""
    return [r for r in ended_in(records, start, end) if not r.clean]


def reconnection_time(records: Sequence[ConnectionRecord], start: datetime, end: datetime) -> Metric:
    ends = resumable_ends(records, start, end)
    gaps = [r.resumed_after_seconds for r in ends if r.resumed_after_seconds is not None]
    value = statistics.median(gaps) if gaps else None
    detail = ""
    if ends:
        detail = f"{len(gaps)} of {len(ends)} resumed, {len(ends) - len(gaps)} not resumed"
        if gaps:
            detail += f"; p95 {format_seconds(_quantile(gaps, 0.95))}"
    return Metric("reconnection_time", "Reconnection time (median)", value, "seconds", RECONNECTION_TIME.level(value), len(gaps), RECONNECTION_TIME, detail)


def stability_metrics(records: Sequence[ConnectionRecord], start: datetime, end: datetime) -> list[Metric]:
    """The four metrics, in the order operators read them: duration, drops, errors, reconnects."""
    return [
        connection_duration(records, start, end),
        disconnection_rate(records, start, end),
        error_rate(records, start, end),
        reconnection_time(records, start, end),
    ]


def _quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (exact on small samples, no interpolation surprises)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def records_from_rows(rows: Iterable[dict[str, Any]], *, live_cutoff: datetime) -> list[ConnectionRecord]:
    """Adapt ``Connection.values(...)`` rows (with ``process__heartbeat_at`` and
    ``process__stopped_at``) into records.

    An unclosed connection whose process stopped or stopped heartbeating (or is gone) ended when
    its process was last seen, with no close code: it counts as a disconnection.
    """
    records = []
    for row in rows:
        ended_at = row["closed_at"]
        if ended_at is None:
            heartbeat = row.get("process__heartbeat_at")
            stopped = row.get("process__stopped_at")
            if heartbeat is None:
                ended_at = row["opened_at"]
            elif stopped is not None or heartbeat < live_cutoff:
                ended_at = max(row["opened_at"], min(heartbeat, stopped or heartbeat))
        records.append(
            ConnectionRecord(
                opened_at=row["opened_at"],
                ended_at=ended_at,
                close_code=row["close_code"],
                error_count=row["error_count"],
                resumed=row["resumed"],
                resumed_after_seconds=row.get("resumed_after_seconds"),
            )
        )
    return records


RECORD_FIELDS = (
    "opened_at",
    "closed_at",
    "close_code",
    "error_count",
    "resumed",
    "resumed_after_seconds",
    "process__heartbeat_at",
    "process__stopped_at",
)
