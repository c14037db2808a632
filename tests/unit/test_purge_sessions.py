"""Retention: purge_sessions deletes idle history past an age, never live sessions; dry run."""
from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from relay.models import Connection, RelayProcess, Session, Turn
from tests.support import histories

pytestmark = pytest.mark.django_db


@pytest.fixture
def aged():
    now = timezone.now()
    live = histories.process("p:live")
    gone = histories.process("p:gone", heartbeat_age=100 * 86400)
    for n in range(5):  # old and idle
        s = histories.session(f"old-{n}", created=now - timedelta(days=100), last_activity_at=now - timedelta(days=95))
        histories.turns(s, histories.connection(s, opened=s.created_at, duration=60, proc=gone), ["old words", "more"])
    recent = histories.session("recent", created=now - timedelta(days=100), last_activity_at=now - timedelta(days=2))
    histories.turns(recent, histories.connection(recent, opened=now - timedelta(days=2), duration=60), ["recent"])
    # Old by its last recorded activity but a connection is live right now: never deleted.
    quiet = histories.session("quiet-but-live", created=now - timedelta(days=100), last_activity_at=now - timedelta(days=95))
    histories.connection(quiet, opened=now - timedelta(days=95), duration=None, proc=live)
    return now


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("purge_sessions", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_dry_run_counts_and_deletes_nothing(aged):
    out, _ = run("--days", "30", "--dry-run")
    assert "Would delete 5 session(s)" in out and "5 connection(s) and 10 turn(s)" in out and "(dry run" in out
    assert Session.objects.count() == 7 and Turn.objects.count() == 11


def test_purge_deletes_old_idle_sessions_with_history_in_batches(aged):
    out, err = run("--days", "30", "--batch-size", "2")
    assert "Deleted 5 session(s)" in out and "5 connection(s) and 10 turn(s)" in out
    assert "1 stopped relay process record(s)" in out
    assert "Purging sessions" in err and "5/5" in err  # the progress bar
    assert set(Session.objects.values_list("pk", flat=True)) == {"recent", "quiet-but-live"}
    assert Turn.objects.count() == 1 and Connection.objects.count() == 2
    assert set(RelayProcess.objects.values_list("pk", flat=True)) == {"p:live"}


def test_default_age_comes_from_the_setting(aged, settings):
    settings.RELAY_RETENTION_DAYS = 1
    run("--no-progress")
    assert set(Session.objects.values_list("pk", flat=True)) == {"quiet-but-live"}


def test_retention_zero_keeps_everything(aged, settings):
    settings.RELAY_RETENTION_DAYS = 0
    out, _ = run()
    assert "Retention is off" in out and Session.objects.count() == 7


def test_days_must_be_positive(aged):
    with pytest.raises(CommandError):
        run("--days", "0")


def test_verbosity_zero_prints_nothing(aged, settings):
    assert run("--days", "30", "-v", "0") == ("", "")
    assert Session.objects.count() == 2
    settings.RELAY_RETENTION_DAYS = 0
    assert run("-v", "0") == ("", "")
