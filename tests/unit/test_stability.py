"""The four stability metrics on constructed histories with known answers."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from relay.ops import stability
from relay.ops.stability import ConnectionRecord as R

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
START, END = T0, T0 + timedelta(hours=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ended(opened: float, duration: float, code: int | None = 1000, **kw) -> R:
    return R(opened_at=at(opened), ended_at=at(opened + duration), close_code=code, **kw)


def test_duration_is_the_median_of_connections_that_ended_in_the_window():
    records = [
        ended(0, 10),
        ended(10, 400),
        ended(20, 600),
        ended(-7200, 30),  # ended before the window
        R(opened_at=at(5), ended_at=None),  # still live: no duration yet
        ended(3500, 200),  # ends after the window
    ]
    m = stability.connection_duration(records, START, END)
    assert m.value == 400 and m.samples == 3 and m.level == "good"
    assert m.display == "6 min 40 s"


@pytest.mark.parametrize(
    ("seconds", "level"), [(300, "good"), (299.9, "warn"), (30, "warn"), (29.9, "bad"), (3599, "good")]
)
def test_duration_levels_at_the_boundaries(seconds, level):
    assert stability.connection_duration([ended(0, seconds)], START, END).level == level


def test_disconnection_rate_counts_everything_but_clean_closes():
    clean = [ended(i, 1, code) for i, code in enumerate([1000, 1001, 1005, 4010] * 4)]  # 16 clean
    drops = [ended(100, 1, 1006), ended(101, 1, 4011), ended(102, 1, None), ended(103, 1, 4008)]
    m = stability.disconnection_rate(clean + drops, START, END)
    assert m.value == pytest.approx(4 / 20) and m.samples == 20
    assert m.level == "warn" and m.display == "20.0%"
    assert m.detail == "4 of 20 ended uncleanly"


@pytest.mark.parametrize(("drops", "total", "level"), [(0, 100, "good"), (4, 100, "good"), (5, 100, "warn"), (21, 100, "bad")])
def test_disconnection_rate_levels(drops, total, level):
    records = [ended(i, 1, 1006) for i in range(drops)] + [ended(i, 1, 1000) for i in range(total - drops)]
    assert stability.disconnection_rate(records, START, END).level == level


def test_error_rate_is_the_share_of_ended_connections_that_hit_an_error():
    records = [ended(i, 1, 1000) for i in range(97)] + [ended(i, 1, 4011, error_count=2) for i in range(3)]
    m = stability.error_rate(records, START, END)
    assert m.value == pytest.approx(0.03) and m.level == "warn"
    records += [ended(i, 1, 4011, error_count=1) for i in range(10)]
    assert stability.error_rate(records, START, END).level == "bad"
    assert stability.error_rate([ended(0, 1)], START, END).level == "good"


def test_reconnection_time_is_the_median_resume_of_unclean_ends_in_the_window():
    records = [
        R(opened_at=at(0), ended_at=at(10), close_code=1006, resumed_after_seconds=0.2),
        R(opened_at=at(0), ended_at=at(20), close_code=1006, resumed_after_seconds=0.3),
        R(opened_at=at(0), ended_at=at(30), close_code=4013, resumed_after_seconds=5.0),  # "try again later"
        R(opened_at=at(0), ended_at=at(40), close_code=1006),  # its client never came back
        R(opened_at=at(0), ended_at=at(50), close_code=1000),  # clean: not a reconnect
        R(opened_at=at(-90), ended_at=at(-60), close_code=1006, resumed_after_seconds=9.0),  # before the window
    ]
    m = stability.reconnection_time(records, START, END)
    assert m.value == 0.3 and m.samples == 3 and m.level == "good" and m.display == "300 ms"
    assert m.detail == "3 of 4 resumed, 1 not resumed; p95 5.0 s"


def test_planned_restarts_are_left_out_of_the_disconnection_and_error_rates():
    records = [ended(i, 1, 1000) for i in range(9)] + [ended(9, 1, 4012, error_count=1) for _ in range(5)]
    assert stability.disconnection_rate(records, START, END).value == 0
    assert stability.error_rate(records, START, END).value == 0


@pytest.mark.parametrize(("gap", "level"), [(0.499, "good"), (0.5, "warn"), (2.0, "warn"), (2.01, "bad")])
def test_reconnection_time_levels(gap, level):
    records = [R(opened_at=at(0), ended_at=at(1), close_code=1006, resumed_after_seconds=gap)]
    assert stability.reconnection_time(records, START, END).level == level


def test_an_empty_window_has_no_data_not_a_good_score():
    metrics = stability.stability_metrics([], START, END)
    assert [m.key for m in metrics] == ["connection_duration", "disconnection_rate", "error_rate", "reconnection_time"]
    assert {m.level for m in metrics} == {"none"} and {m.display for m in metrics} == {"no data"}


def test_rows_of_a_crashed_process_become_unclean_ends_at_its_last_heartbeat():
    cutoff = at(1000)
    rows = [
        # closed normally
        dict(opened_at=at(0), closed_at=at(100), close_code=1000, error_count=0, resumed=False, gap_seconds=None,
             process__heartbeat_at=at(2000), process__stopped_at=None),
        # open on a live process: live
        dict(opened_at=at(0), closed_at=None, close_code=None, error_count=0, resumed=False, gap_seconds=None,
             process__heartbeat_at=at(2000), process__stopped_at=None),
        # open on a process whose heartbeat went stale at 900 s: ended then, no close code
        dict(opened_at=at(50), closed_at=None, close_code=None, error_count=0, resumed=True, gap_seconds=1.0,
             process__heartbeat_at=at(900), process__stopped_at=None),
        # its process row is gone
        dict(opened_at=at(60), closed_at=None, close_code=None, error_count=0, resumed=False, gap_seconds=None,
             process__heartbeat_at=None, process__stopped_at=None),
    ]
    records = stability.records_from_rows(rows, live_cutoff=cutoff)
    assert [r.ended_at for r in records] == [at(100), None, at(900), at(60)]
    m = stability.disconnection_rate(records, START, END)
    assert m.value == pytest.approx(2 / 3)


def test_threshold_text_for_operators():
    metrics = {m.key: m for m in stability.stability_metrics([ended(0, 1)], START, END)}
    assert metrics["connection_duration"].thresholds_display == "good ≥ 5 min 00 s, bad < 30.0 s"
    assert metrics["disconnection_rate"].thresholds_display == "good < 5%, bad > 20%"
    assert metrics["reconnection_time"].thresholds_display == "good < 500 ms, bad > 2.0 s"


def test_live_is_one_rule_for_processes_and_their_connections(db, settings):
    """A process is live when it heartbeated within three heartbeats and has not stopped."""
    from django.utils import timezone as djtz

    from relay.models import Connection, RelayProcess
    from tests.support import histories

    settings.RELAY_HEARTBEAT_SECONDS = 10
    live = histories.process("live", heartbeat_age=5)
    stale = histories.process("stale", heartbeat_age=31)
    stopped = histories.process("stopped", stopped=True)
    assert set(RelayProcess.objects.live().values_list("pk", flat=True)) == {"live"}
    assert set(RelayProcess.objects.stale().values_list("pk", flat=True)) == {"stale"}
    assert [p.is_live for p in (live, stale, stopped)] == [True, False, False]

    s = histories.session("live-rule")
    now = djtz.now()
    open_on = {p.pk: histories.connection(s, opened=now, duration=None, proc=p) for p in (live, stale, stopped)}
    no_process = histories.connection(s, opened=now, duration=None)
    closed = histories.connection(s, opened=now, duration=1, proc=live)
    assert list(Connection.objects.live()) == [open_on["live"]]
    assert set(Connection.objects.orphaned()) == {open_on["stale"], open_on["stopped"], no_process}
    by_pk = {c.pk: c for c in Connection.objects.select_related("process")}
    assert [c.pk for c in by_pk.values() if c.is_live] == [open_on["live"].pk]
    assert not by_pk[closed.pk].is_live
