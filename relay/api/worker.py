"""The background worker: counts usage and sends webhooks, off the WebSocket path.

One :func:`tick` scans what changed since the last one (closed connections, connections lost
with a process that died, new turns), adds usage and enqueues webhook deliveries, and sends the
deliveries that are due. It runs either as
``manage.py relay_worker`` (production: a systemd unit beside daphne's) or, with
``RELAY_WORKER=inline`` (the default, so ``make run`` delivers without anything else), in a
daemon thread of each daphne process. Several workers at once are safe: cursors only move
forward, an event is enqueued once per endpoint (a unique key), and a delivery is claimed by one
conditional UPDATE before it is sent. The thread does blocking HTTP and ORM calls of its own and
never touches the event loop; when idle, a tick is a few indexed reads.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from django.conf import settings
from django.db import close_old_connections

from relay.api import usage, webhooks
from relay.ops.logs import get_logger

log = get_logger("relay.api.worker")


@dataclass(slots=True)
class TickResult:
    counted: int = 0
    enqueued: int = 0
    attempted: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.counted or self.enqueued or self.attempted)


def tick() -> TickResult:
    """One pass; every step is independent, so one failing (a database hiccup) does not stop the others."""
    result = TickResult()
    steps = (
        ("counted", usage.usage_count_closed),
        ("counted", usage.usage_count_lost),
        ("enqueued", webhooks.session_ended_scan),
        ("enqueued", webhooks.turn_finished_scan),
        ("attempted", webhooks.deliver_due),
    )
    for field, step in steps:
        try:
            setattr(result, field, getattr(result, field) + step())
        except Exception as exc:
            log.warning("worker_step_failed", step=step.__name__, error=repr(exc))
    return result


#: An idle worker waits ``poll`` after a busy tick, then twice as long after each idle one, up to this many polls.
IDLE_BACKOFF_POLLS = 5


def idle_wait(poll: float, idle_ticks: int) -> float:
    """How long to wait after ``idle_ticks`` ticks in a row found nothing (the first: ``poll``)."""
    return poll * min(2 ** max(0, idle_ticks - 1), IDLE_BACKOFF_POLLS)


def run(stop: threading.Event, *, poll_seconds: float | None = None) -> None:
    """Tick until ``stop`` is set; a busy tick is followed at once by the next, idle ones by a
    wait that grows from ``poll`` to ``IDLE_BACKOFF_POLLS`` polls (an idle tick is a handful of
    queries, and the inline worker shares the process with the audio)."""
    poll = settings.RELAY_WORKER_POLL_SECONDS if poll_seconds is None else poll_seconds
    log.info("worker_started", mode=settings.RELAY_WORKER, poll_seconds=poll)
    idle = 0
    while not stop.is_set():
        close_old_connections()
        busy = False
        try:
            busy = tick().busy
        except Exception as exc:  # never let the thread die
            log.warning("worker_tick_failed", error=repr(exc))
        finally:
            close_old_connections()
        idle = 0 if busy else idle + 1
        if not busy:
            stop.wait(idle_wait(poll, idle))
    log.info("worker_stopped")


_thread: threading.Thread | None = None
_stop = threading.Event()


def start_inline() -> bool:
    """With ``RELAY_WORKER=inline``, run the worker in a daemon thread of this process (once)."""
    global _thread
    if settings.RELAY_WORKER != "inline" or (_thread is not None and _thread.is_alive()):
        return False
    _stop.clear()
    _thread = threading.Thread(target=run, args=(_stop,), name="relay-worker", daemon=True)
    _thread.start()
    return True


def start_with_server() -> None:
    """Under daphne, start the inline worker once the reactor runs (not at import: management
    commands and tests import the ASGI module too)."""
    import sys

    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is not None and hasattr(reactor, "callWhenRunning"):
        reactor.callWhenRunning(start_inline)
        reactor.addSystemEventTrigger("before", "shutdown", _stop.set)
