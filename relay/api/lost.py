"""Connections lost with their process: never closed, because the process that served them died
(``kill -9``, a crash, power loss) before it could write their close.

The relay already has one rule for them: a process silent for three heartbeats
(``RELAY_HEARTBEAT_SECONDS``) is gone (``RelayProcessQuerySet.stale``), its open connections are
orphaned (``ConnectionQuerySet.orphaned``), and each ended when its process was last heard of
(``relay.ops.stability.records_from_rows``, reconnect pairing in ``relay.store.services``). The
worker reads the same rule for ``session.ended`` and usage and writes no close: the row keeps no
close code, so the stability metrics still count it as a disconnection, and if the process was not
dead after all (a database outage longer than three heartbeats) its own close is still recorded.

Connections whose process row was deleted (``process`` null) are not found here: nothing tells
when they ended.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings

from relay.models import RelayProcess


def lost_after() -> timedelta:
    """How long a process is silent before it counts as gone (``relay.models.live_cutoff``)."""
    return timedelta(seconds=settings.RELAY_HEARTBEAT_SECONDS * 3)


def lost_at(*, opened_at: datetime, heartbeat_at: datetime, stopped_at: datetime | None) -> datetime:
    """When a connection of a gone process ended: the last time its process was heard of, as the
    stability metrics count it (never before the connection opened)."""
    last = min(heartbeat_at, stopped_at) if stopped_at is not None else heartbeat_at
    return max(opened_at, last)


def processes_gone(*, after: datetime, until: datetime, limit: int) -> list[dict[str, Any]]:
    """Processes last heard of in (``after``, ``until``], oldest first, as ``pk``/``heartbeat_at`` rows.

    ``until`` is at least :func:`lost_after` ago, so every process returned is stale or stopped.
    When ``limit`` is reached, every process with the same heartbeat as the last one is included
    too, so a cursor moved to that heartbeat skips none.
    """
    window = RelayProcess.objects.filter(heartbeat_at__gt=after, heartbeat_at__lte=until).order_by("heartbeat_at", "pk")
    rows = list(window.values("pk", "heartbeat_at")[:limit])
    if len(rows) == limit:
        rows = list(window.filter(heartbeat_at__lte=rows[-1]["heartbeat_at"]).values("pk", "heartbeat_at"))
    return rows
