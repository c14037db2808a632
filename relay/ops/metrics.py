"""Prometheus metrics: counters the consumer bumps at connection and turn boundaries, gauges
read from the database at scrape time, and the ``/metrics`` view.

Nothing here is meant to be called per audio frame: the consumer keeps plain integer counters and
reports them with :func:`audio_received` at turn ends and on close.

Several processes: when ``PROMETHEUS_MULTIPROC_DIR`` is set (before the process starts, as
prometheus-client requires) every process writes its samples to files in that directory and a
scrape of any one process aggregates all of them. Without it the process's default registry is
used, which is right for a single process. Live sessions and connections are database gauges,
computed at scrape time, so they are correct across processes in both modes.
"""
from __future__ import annotations

import hmac
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from relay.exceptions import ALL_ERRORS
from relay.ops.logs import get_logger
from relay.ops.stability import CLEAN_CLOSE_CODES

if TYPE_CHECKING:
    from relay.engines.base import TurnEvent

log = get_logger("relay.ops.metrics")

#: Close codes reported as themselves; anything else a client sends becomes "other" (labels
#: must stay a small set).
KNOWN_CLOSE_CODES = frozenset({1000, 1001, 1005, 1006, 1011} | {e.close_code for e in ALL_ERRORS})
KNOWN_ERROR_CODES = frozenset(e.code for e in ALL_ERRORS)

CONNECTIONS_OPENED = Counter(
    "relay_connections_opened", "Connections accepted and joined to a session.", ["resumed"]
)
CONNECTIONS_CLOSED = Counter(
    "relay_connections_closed",
    "Connections ended, by outcome (clean, dropped, error) and WebSocket close code.",
    ["outcome", "code"],
)
CONNECTION_DURATION = Histogram(
    "relay_connection_duration_seconds",
    "How long connections stayed open (good 5+ min, bad < 30 s; see relay.ops.stability).",
    buckets=(1, 5, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, float("inf")),
)
RECONNECTION_GAP = Histogram(
    "relay_reconnection_gap_seconds",
    "Time from a session's previous connection closing to a resuming connection opening "
    "(good < 500 ms, bad > 2 s; see relay.ops.stability).",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, float("inf")),
)
TURNS = Counter("relay_turns", "Finished turns (EndOfTurn), by trigger.", ["trigger"])
AUDIO_BYTES = Counter("relay_audio_received_bytes", "Audio bytes received from clients.")
AUDIO_SECONDS = Counter("relay_audio_received_seconds", "Audio received from clients, in seconds of audio.")
ERRORS = Counter("relay_errors", "Errors sent to clients, by stable error code.", ["code"])
REFUSALS = Counter(
    "relay_refusals", "Connection attempts refused before they became connections, by error code.", ["code"]
)
LAYER_OUTAGES = Counter(
    "relay_layer_outages", "Times this process lost its channel layer (Redis); each ends with a resync of its streams."
)
INBOUND_PAUSES = Counter(
    "relay_inbound_pauses", "Times daphne stopped reading a client's socket because the relay was behind it (relay/server/inbound_flow.py)."
)


# --- latency histograms --------------------------------------------------------------------------
# Observed once per turn, replay, engine job or database write, never per audio frame. Histograms
# aggregate across processes in multiprocess mode like the counters (buckets add up), so
# histogram_quantile() over sum by (le) of any one process's scrape covers the host. Buckets sit
# around each one's expected range with room on both sides to see it move.
#: End of speech to EndOfTurn. The clock starts when the engine had the audio up to the turn's
#: audio_window_end (the end-of-turn silence the engine waited for is before it, not in it), so
#: it is the relay's and engine's own delay: tens of ms with the fake engine, a few hundred with
#: a Whisper final decode; seconds mean a backlog.
END_OF_TURN_LATENCY = Histogram(
    "relay_end_of_turn_latency_seconds",
    "End of a turn's audio (received by the engine up to audio_window_end) to its EndOfTurn sent to the speaker, "
    "for turns the engine ended on its own (model, timeout, max_duration).",
    ["engine"],
    buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, float("inf")),
)
FORCE_END_TURN_LATENCY = Histogram(
    "relay_force_end_turn_latency_seconds",
    "ForceEndTurn received to the EndOfTurn (trigger manual) sent to the speaker.",
    ["engine"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, float("inf")),
)
#: One job in an offline engine's worker pool (relay.engines.offline.pool): ``final`` and
#: ``update`` are Whisper decodes (tens of ms to seconds), ``stream`` the per-batch audio work
#: (Silero VAD, the pocketsphinx search: milliseconds).
ENGINE_JOB_SECONDS = Histogram(
    "relay_engine_job_seconds",
    "Time one job ran in an offline engine's worker pool, by engine and kind (final, update, stream).",
    ["engine", "kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, float("inf")),
)
REPLAY_FIRST_TURN = Histogram(
    "relay_replay_first_turn_seconds",
    "A resuming connection's replay: from its start to the first replayed turn sent (one history page read).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf")),
)
#: The same writes that feed admission's RELAY_MAX_WRITE_LATENCY_MS (100 ms), group commit
#: included; an attempt that fails (and is retried by relay.store.retry) is not observed.
DB_WRITE_SECONDS = Histogram(
    "relay_db_write_seconds",
    "A turn write as its stream waits for it, group commit included: kind index (turn index allocation) or turn (the finished turn).",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30, float("inf")),
)
#: Triggers whose EndOfTurn follows the end of speech; a manual one follows a ForceEndTurn and
#: end_of_stream the close, so they are measured elsewhere or not at all.
_SPEECH_TRIGGERS = frozenset({"model", "timeout", "max_duration"})


def end_of_turn_sent(engine: str, event: TurnEvent, forced_at: float | None) -> float | None:
    """The speaker got ``event`` (an EndOfTurn): observe its latency; returns ``forced_at`` still pending.

    A manual EndOfTurn answers the ForceEndTurn at ``forced_at`` (which is then used up).
    """
    now = time.monotonic()
    if event.trigger == "manual":
        if forced_at is not None:
            FORCE_END_TURN_LATENCY.labels(engine=engine).observe(max(0.0, now - forced_at))
        return None
    if event.trigger in _SPEECH_TRIGGERS and event.speech_ended_at is not None:
        END_OF_TURN_LATENCY.labels(engine=engine).observe(max(0.0, now - event.speech_ended_at))
    return forced_at


def replay_first_turn(seconds: float) -> None:
    REPLAY_FIRST_TURN.observe(seconds)


def db_write(kind: str, seconds: float) -> None:
    """A turn write finished (``kind`` index or turn), as relay.store.services times it."""
    DB_WRITE_SECONDS.labels(kind=kind).observe(seconds)


def close_outcome(code: int | None) -> str:
    """clean (normal close or operator end), error (the relay closed on an error), or dropped."""
    if code in CLEAN_CLOSE_CODES:
        return "clean"
    if code is not None and (code == 1011 or 4000 <= code <= 4999):
        return "error"
    return "dropped"


# --- hooks for the consumer ----------------------------------------------------------------------
def connection_opened(*, resumed: bool) -> None:
    """A connection joined its session (after ``services.connection_open``)."""
    CONNECTIONS_OPENED.labels(resumed="true" if resumed else "false").inc()


def reconnection_paired(gap_seconds: float) -> None:
    """A client resumed a connection that ended uncleanly, ``gap_seconds`` after its last frame.

    Called by the store once the pairing is committed: when the resuming connection opens, or,
    if it opened before the old one's close was recorded, when that close is.
    """
    RECONNECTION_GAP.observe(gap_seconds)


def connection_closed(*, code: int | None, duration_seconds: float) -> None:
    """A connection that had opened has ended (once per connection)."""
    label = str(code) if code in KNOWN_CLOSE_CODES else "other"
    CONNECTIONS_CLOSED.labels(outcome=close_outcome(code), code=label).inc()
    CONNECTION_DURATION.observe(max(0.0, duration_seconds))


def turn_finished(*, trigger: str | None) -> None:
    TURNS.labels(trigger=trigger if trigger in {"model", "manual", "end_of_stream", "timeout"} else "other").inc()


def audio_received(*, nbytes: int, seconds: float) -> None:
    """Audio since the last report (call at turn ends and on close, not per frame)."""
    if nbytes > 0:
        AUDIO_BYTES.inc(nbytes)
        AUDIO_SECONDS.inc(seconds)


class AudioMeter:
    """Turns the consumer's running byte total into deltas for :func:`audio_received`.

    ``report(total)`` at each turn end and on close; the per-frame path stays an int add.
    """

    __slots__ = ("bytes_per_second", "reported")

    def __init__(self, bytes_per_second: int) -> None:
        self.bytes_per_second = bytes_per_second
        self.reported = 0

    def report(self, total_bytes: int) -> None:
        delta = total_bytes - self.reported
        if delta > 0:
            self.reported = total_bytes
            audio_received(nbytes=delta, seconds=delta / self.bytes_per_second if self.bytes_per_second else 0.0)


def error_sent(*, code: str) -> None:
    """An ``Error`` went to a client (including refusals before a session was joined)."""
    ERRORS.labels(code=code if code in KNOWN_ERROR_CODES else "OTHER").inc()


# --- scrape ------------------------------------------------------------------------------------
class DatabaseCollector:
    """Live sessions, connections and processes, from the database at scrape time.

    "Live" is ``Connection.objects.live()``: not closed, on a process whose heartbeat is fresh,
    so a crashed process's connections stop counting within three heartbeats.
    """

    def collect(self) -> Iterator[Metric]:
        from relay.models import Connection, RelayProcess

        up = GaugeMetricFamily("relay_database_up", "1 when the scrape could read the database.")
        try:
            live = Connection.objects.live()
            connections = live.count()
            sessions = live.values("session_id").distinct().count()
            processes = RelayProcess.objects.live().count()
        except Exception:
            log.warning("metrics_database_unavailable", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("relay_live_connections", "Open connections on live relay processes.", value=connections)
        yield GaugeMetricFamily("relay_live_sessions", "Sessions with at least one live connection.", value=sessions)
        yield GaugeMetricFamily("relay_processes", "Relay processes with a fresh heartbeat.", value=processes)


class _DefaultRegistry:
    """The process's default registry as a collector, so it can sit beside the database one."""

    def collect(self) -> Iterator[Metric]:
        return REGISTRY.collect()


def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or ""


def render() -> bytes:
    """The exposition text for a scrape (all processes' samples in multiprocess mode)."""
    registry = CollectorRegistry()
    path = multiprocess_dir()
    if path:
        MultiProcessCollector(registry, path=path)
    else:
        registry.register(_DefaultRegistry())
    registry.register(DatabaseCollector())
    return generate_latest(registry)


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """``/metrics``; with ``RELAY_METRICS_TOKEN`` set, only for ``Authorization: Bearer <token>``."""
    token = settings.RELAY_METRICS_TOKEN
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            response = HttpResponse("A valid bearer token is required.\n", status=401, content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    return HttpResponse(render(), content_type=CONTENT_TYPE_LATEST)
