"""The operator dashboard (a staff-only admin page): the four stability metrics (relay.ops.stability)
over a chosen window, live sessions and connections, traffic, storage, and a chart over time.

Reads only. The chart is an SVG drawn here from the numbers (no JavaScript, no CDN, no plotting
library at run time), so it renders anywhere the admin does, including a headless browser.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection as db
from django.db.models import Count, Q, Sum
from django.utils import timezone
from django.utils.html import escape

from relay.ops import stability
from relay.models import Connection, Refusal, RelayProcess, Session, Turn, live_cutoff


@dataclass(frozen=True, slots=True)
class Window:
    key: str
    label: str
    span: timedelta
    bucket: timedelta


WINDOWS = {
    w.key: w
    for w in (
        Window("1h", "last hour", timedelta(hours=1), timedelta(minutes=5)),
        Window("6h", "last 6 hours", timedelta(hours=6), timedelta(minutes=15)),
        Window("24h", "last 24 hours", timedelta(hours=24), timedelta(hours=1)),
        Window("7d", "last 7 days", timedelta(days=7), timedelta(hours=6)),
        Window("30d", "last 30 days", timedelta(days=30), timedelta(days=1)),
    )
}
DEFAULT_WINDOW = "24h"


@dataclass
class Series:
    name: str
    unit: str
    values: list[float]
    colour: str
    overlay: list[float] | None = None
    overlay_name: str = ""
    overlay_colour: str = ""


@dataclass
class DashboardData:
    window: Window
    start: datetime
    end: datetime
    metrics: list[stability.Metric]
    live_sessions: int
    live_connections: int
    processes_live: int
    processes_stale: int
    connection_attempts: int  # connections opened plus attempts refused before they became one
    sessions_created: int
    turns: int
    audio_hours: float
    errors: int
    storage: dict[str, Any]
    bucket_starts: list[datetime]
    series: list[Series] = field(default_factory=list)
    live_rows: list[dict[str, Any]] = field(default_factory=list)
    recent_drops: list[dict[str, Any]] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # by error code
    planned_restarts: int = 0  # connections ended by a planned restart (4012), outside the rates
    top_usage: dict[str, Any] = field(default_factory=dict)  # heaviest users and API tokens (relay.api.usage)


def dashboard_data(*, window_key: str = DEFAULT_WINDOW, now: datetime | None = None) -> DashboardData:
    window = WINDOWS.get(window_key) or WINDOWS[DEFAULT_WINDOW]
    end = now or timezone.now()
    start = end - window.span

    # Every connection that opened or ended in the window, or is still unclosed (live or orphaned).
    rows = list(
        Connection.objects.filter(Q(opened_at__gte=start) | Q(closed_at__gte=start) | Q(closed_at__isnull=True))
        .filter(opened_at__lt=end)
        .values(*stability.RECORD_FIELDS, "audio_seconds")
        .iterator(chunk_size=2000)
    )
    records = stability.records_from_rows(rows, live_cutoff=live_cutoff())
    metrics = stability.stability_metrics(records, start, end)

    n = max(1, int(window.span / window.bucket))
    bucket_starts = [start + window.bucket * i for i in range(n)]

    def bucket(moment: datetime | None) -> int | None:
        if moment is None or not start <= moment < end:
            return None
        return min(n - 1, int((moment - start) / window.bucket))

    opened = [0.0] * n
    unclean = [0.0] * n
    audio_minutes = [0.0] * n
    for row, record in zip(rows, records):
        if (i := bucket(record.opened_at)) is not None:
            opened[i] += 1
            audio_minutes[i] += row["audio_seconds"] / 60
        if (i := bucket(record.ended_at)) is not None and not record.clean:
            unclean[i] += 1

    turn_counts = Turn.objects.filter(created_at__gte=start, created_at__lt=end).aggregate(
        total=Count("pk"),
        **{f"b{i}": Count("pk", filter=Q(created_at__gte=b, created_at__lt=b + window.bucket)) for i, b in enumerate(bucket_starts)},
    )
    turns_series = [float(turn_counts[f"b{i}"]) for i in range(n)]

    live = Connection.objects.live()
    opened_in_window = Connection.objects.filter(opened_at__gte=start, opened_at__lt=end)
    totals = opened_in_window.aggregate(n=Count("pk"), audio=Sum("audio_seconds"), errors=Sum("error_count"))
    live_rows = list(
        Session.objects.filter(pk__in=live.values("session_id"))
        .annotate(live=Count("connections", filter=Q(connections__in=live)))
        .order_by("-last_activity_at")
        .values("id", "created_at", "last_activity_at", "audio_seconds", "next_turn_index", "engine", "live")[:15]
    )
    recent_drops = list(
        Connection.objects.filter(closed_at__gte=start, closed_at__lt=end)
        .exclude(close_code__in=stability.CLEAN_CLOSE_CODES)
        .order_by("-closed_at")
        .values("id", "session_id", "closed_at", "close_code", "close_reason", "last_error_code", "client_addr")[:10]
    )
    refusals = dict(
        Refusal.objects.filter(minute__gte=start - timedelta(minutes=1), minute__lt=end)
        .values_list("code").annotate(n=Sum("count")).order_by("-n", "code")
    )
    planned = Connection.objects.filter(closed_at__gte=start, closed_at__lt=end, close_code__in=stability.PLANNED_CLOSE_CODES).count()
    return DashboardData(
        window=window,
        refusals=refusals,
        planned_restarts=planned,
        start=start,
        end=end,
        metrics=metrics,
        live_sessions=live.values("session_id").distinct().count(),
        live_connections=live.count(),
        processes_live=RelayProcess.objects.live().count(),
        processes_stale=RelayProcess.objects.stale().count(),
        connection_attempts=(totals["n"] or 0) + sum(refusals.values()),
        sessions_created=Session.objects.filter(created_at__gte=start, created_at__lt=end).count(),
        turns=turn_counts["total"] or 0,
        audio_hours=(totals["audio"] or 0.0) / 3600,
        errors=totals["errors"] or 0,
        storage=storage_used(),
        bucket_starts=bucket_starts,
        series=[
            Series("Connections opened", "", opened, "#417690", unclean, "ended uncleanly", "#c62828"),
            Series("Turns finished", "", turns_series, "#2e7d32"),
            Series("Audio received", "min", audio_minutes, "#6a4c93"),
        ],
        live_rows=live_rows,
        recent_drops=recent_drops,
        top_usage=_top_usage(window),
    )


def _top_usage(window: Window) -> dict[str, Any]:
    """From the daily aggregate rows, so whole days: today for windows shorter than a day."""
    from relay.api.usage import usage_top

    return usage_top(days=max(1, window.span.days), limit=10)


def storage_used() -> dict[str, Any]:
    """Database size (and the relay tables' share where the database can tell), plus row counts."""
    info: dict[str, Any] = {
        "vendor": db.vendor,
        "database_bytes": None,
        "relay_bytes": None,
        "sessions": Session.objects.count(),
        "connections": Connection.objects.count(),
        "turns": Turn.objects.count(),
    }
    tables = [Session._meta.db_table, Connection._meta.db_table, Turn._meta.db_table, RelayProcess._meta.db_table]
    try:
        with db.cursor() as cursor:
            if db.vendor == "postgresql":
                cursor.execute("SELECT pg_database_size(current_database())")
                info["database_bytes"] = cursor.fetchone()[0]
                cursor.execute("SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c WHERE c.relname = ANY(%s)", [tables])
                info["relay_bytes"] = cursor.fetchone()[0]
            elif db.vendor == "sqlite":
                cursor.execute("PRAGMA page_count")
                pages = cursor.fetchone()[0]
                cursor.execute("PRAGMA page_size")
                size = pages * cursor.fetchone()[0]
                name = str(db.settings_dict.get("NAME") or "")
                if name and os.path.exists(name + "-wal"):
                    size += os.path.getsize(name + "-wal")
                info["database_bytes"] = size
                try:
                    cursor.execute(
                        f"SELECT SUM(pgsize) FROM dbstat WHERE name IN ({', '.join(['%s'] * len(tables))}) OR name LIKE 'relay_%%'",
                        tables,
                    )
                    info["relay_bytes"] = cursor.fetchone()[0]
                except Exception:  # dbstat is an optional SQLite build feature
                    pass
    except Exception:
        pass
    return info


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# --- chart -----------------------------------------------------------------------------------------
def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f}k".replace(".0k", "k")
    return f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.1f}"


def chart_svg(data: DashboardData, *, width: int = 880, panel_height: int = 110) -> str:
    """Small multiples sharing the time axis: one panel per series, bars per bucket."""
    left, right, top, gap, bottom = 56, 16, 8, 34, 28
    n = len(data.bucket_starts)
    plot_w = width - left - right
    bar_w = plot_w / max(1, n)
    height = top + len(data.series) * (panel_height + gap) + bottom - gap
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
        f'role="img" aria-label="Traffic over the {escape(data.window.label)}" class="relay-chart" '
        'font-family="-apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif" font-size="12">'
    ]
    for p, series in enumerate(data.series):
        y0 = top + p * (panel_height + gap) + 16
        h = panel_height - 16
        peak = _nice_max(max(series.values + (series.overlay or []) + [0]))
        title = series.name + (f" ({series.unit})" if series.unit else "")
        total = sum(series.values)
        legend = f"{title}: {_num(total)} in the window"
        if series.overlay is not None:
            legend += f", {_num(sum(series.overlay))} {series.overlay_name}"
        out.append(f'<text x="{left}" y="{y0 - 5}" font-weight="600" fill="currentColor">{escape(legend)}</text>')
        if series.overlay is not None:
            lx = width - right - 140
            out.append(f'<rect x="{lx}" y="{y0 - 14}" width="10" height="10" fill="{series.colour}"/>')
            out.append(f'<text x="{lx + 14}" y="{y0 - 5}" fill="currentColor">opened</text>')
            out.append(f'<rect x="{lx + 64}" y="{y0 - 14}" width="10" height="10" fill="{series.overlay_colour}"/>')
            out.append(f'<text x="{lx + 78}" y="{y0 - 5}" fill="currentColor">unclean</text>')
        for frac in (0, 0.5, 1):
            y = y0 + h - frac * h
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="currentColor" stroke-opacity="{0.35 if frac == 0 else 0.12}"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="currentColor" fill-opacity="0.7">{_num(peak * frac)}</text>')
        for i, v in enumerate(series.values):
            bh = v / peak * h
            x = left + i * bar_w + bar_w * 0.12
            out.append(
                f'<rect x="{x:.1f}" y="{y0 + h - bh:.1f}" width="{bar_w * 0.76:.1f}" height="{bh:.1f}" fill="{series.colour}">'
                f"<title>{escape(data.bucket_starts[i].strftime('%Y-%m-%d %H:%M'))}: {v:g}</title></rect>"
            )
            if series.overlay is not None and series.overlay[i]:
                oh = series.overlay[i] / peak * h
                out.append(
                    f'<rect x="{x + bar_w * 0.2:.1f}" y="{y0 + h - oh:.1f}" width="{bar_w * 0.36:.1f}" height="{oh:.1f}" '
                    f'fill="{series.overlay_colour}"><title>{series.overlay[i]:g} {escape(series.overlay_name)}</title></rect>'
                )
    axis_y = top + len(data.series) * (panel_height + gap) - gap + 14
    step = max(1, n // 8)
    fmt = "%H:%M" if data.window.span <= timedelta(days=1) else "%b %d" if data.window.bucket >= timedelta(days=1) else "%b %d %Hh"
    for i in range(0, n, step):
        x = left + i * bar_w
        out.append(f'<text x="{x:.1f}" y="{axis_y}" fill="currentColor" fill-opacity="0.7">{escape(data.bucket_starts[i].strftime(fmt))}</text>')
    out.append(f'<text x="{width - right}" y="{axis_y}" text-anchor="end" fill="currentColor" fill-opacity="0.7">now (UTC)</text>')
    out.append("</svg>")
    return "".join(out)
