"""``manage.py relay_worker``: count usage and send webhooks (relay.api.worker), until SIGTERM.

Run it beside daphne under systemd (deploy/systemd/relay-worker.service) with
``RELAY_WORKER=external`` in daphne's environment. ``--once`` runs one pass and prints what it did.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from relay.api import worker


class Command(BaseCommand):
    help = "Count usage and send webhook deliveries (the relay's background worker)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--once", action="store_true", help="Run one pass and exit.")
        parser.add_argument("--poll", type=float, default=None, help="Seconds between idle passes (default RELAY_WORKER_POLL_SECONDS).")

    def handle(self, *args: Any, once: bool = False, poll: float | None = None, **options: Any) -> None:
        if once:
            result = worker.tick()
            self.stdout.write(f"counted {result.counted} connections, enqueued {result.enqueued} deliveries, attempted {result.attempted}")
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        worker.run(stop, poll_seconds=poll)
