"""Retention: delete sessions (with their connections and turns) idle for longer than an age.

``python manage.py purge_sessions [--days N] [--dry-run] [--batch-size N]``

The age defaults to ``RELAY_RETENTION_DAYS`` (0 there means keep forever). A session's age is
its last activity, not its creation, so a long-running session is never cut off, and a session
with a live connection is never deleted whatever its age. Deletes go in batches, each its own
transaction, so a large purge does not hold one long lock. Run it from cron or a systemd timer,
like Django's ``clearsessions``.
"""
from __future__ import annotations

import sys
from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone
from tqdm import tqdm

from relay.models import Connection, RelayProcess, Session, Turn


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = "Delete sessions idle for longer than --days (default RELAY_RETENTION_DAYS), with their history."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=positive_int, default=None, help="Age in days (default: RELAY_RETENTION_DAYS).")
        parser.add_argument("--dry-run", action="store_true", help="Count what would be deleted; delete nothing.")
        parser.add_argument("--batch-size", type=positive_int, default=200, help="Sessions per delete transaction.")
        parser.add_argument("--no-progress", action="store_true", help="No progress bar (it is also off at verbosity 0).")

    def handle(self, *args, days: int | None, dry_run: bool, batch_size: int, no_progress: bool, verbosity: int, **options) -> None:
        if days is None:
            days = settings.RELAY_RETENTION_DAYS
            if days <= 0:
                if verbosity > 0:
                    self.stdout.write("Retention is off (RELAY_RETENTION_DAYS=0): nothing deleted. Pass --days to purge anyway.")
                return
        cutoff = timezone.now() - timedelta(days=days)
        candidates = (
            Session.objects.filter(last_activity_at__lt=cutoff)
            .annotate(live=Exists(Connection.objects.live().filter(session=OuterRef("pk"))))
            .filter(live=False)
            .order_by("last_activity_at")
        )
        total = candidates.count()
        when = cutoff.strftime("%Y-%m-%d %H:%M UTC")
        if dry_run:
            ids = candidates.values("pk")
            connections = Connection.objects.filter(session__in=ids).count()
            turns = Turn.objects.filter(session__in=ids).count()
            processes = self._stale_processes(cutoff).count()
            self.stdout.write(
                f"Would delete {total} session(s) idle since before {when}, with {connections} connection(s) "
                f"and {turns} turn(s), and {processes} stopped relay process record(s). (dry run: nothing deleted)"
            )
            return

        deleted = {"sessions": 0, "connections": 0, "turns": 0}
        bar = tqdm(
            total=total, unit="session", desc="Purging sessions", file=getattr(self.stderr, "_out", sys.stderr),
            disable=no_progress or verbosity == 0 or total == 0, dynamic_ncols=True,
        )
        try:
            while True:
                ids = list(candidates.values_list("pk", flat=True)[:batch_size])
                if not ids:
                    break
                with transaction.atomic():
                    _, per_model = Session.objects.filter(pk__in=ids).delete()
                deleted["sessions"] += per_model.get(Session._meta.label, 0)
                deleted["connections"] += per_model.get(Connection._meta.label, 0)
                deleted["turns"] += per_model.get(Turn._meta.label, 0)
                bar.update(len(ids))
                if verbosity >= 2:
                    self.stdout.write(f"  deleted {deleted['sessions']}/{total} sessions")
        finally:
            bar.close()
        processes, _ = self._stale_processes(cutoff).delete()
        if verbosity == 0:  # cron: silent unless it fails; a dry run still reports, being asked to
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Deleted {deleted['sessions']} session(s) idle since before {when}, with {deleted['connections']} "
                f"connection(s) and {deleted['turns']} turn(s), and {processes} stopped relay process record(s)."
            )
        )

    @staticmethod
    def _stale_processes(cutoff):
        """Process rows not heard from since the cutoff and no longer referenced."""
        return RelayProcess.objects.filter(heartbeat_at__lt=cutoff).exclude(Exists(Connection.objects.filter(process=OuterRef("pk"))))
