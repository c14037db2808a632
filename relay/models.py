"""Sessions, their connections and their finished turns.

A Session is a named place that outlives any one connection: tabs and reconnects join it by id.
Turn indexes are allocated from ``Session.next_turn_index`` by the database, so they stay unique
and monotonic across tabs and processes.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


def live_cutoff() -> datetime:
    """Heartbeats older than this mean the process is gone (crashed or killed)."""
    return timezone.now() - timedelta(seconds=settings.RELAY_HEARTBEAT_SECONDS * 3)


def _live_process(prefix: str = "") -> Q:
    """The one definition of a live process: it heartbeated recently and has not stopped.

    ``prefix`` reaches the process through a relation (``"process__"`` from a connection).
    """
    return Q(**{f"{prefix}heartbeat_at__gte": live_cutoff(), f"{prefix}stopped_at__isnull": True})


class RelayProcessQuerySet(models.QuerySet):
    def live(self) -> "RelayProcessQuerySet":
        return self.filter(_live_process())

    def stale(self) -> "RelayProcessQuerySet":
        """Not stopped, but silent for three heartbeats: crashed or killed."""
        return self.filter(stopped_at__isnull=True).exclude(_live_process())


class ConnectionQuerySet(models.QuerySet):
    def live(self) -> "ConnectionQuerySet":
        """Open connections of live processes."""
        return self.filter(Q(closed_at__isnull=True) & _live_process("process__"))

    def orphaned(self) -> "ConnectionQuerySet":
        """Never closed, but their process is gone (or its row was deleted)."""
        return self.filter(closed_at__isnull=True).exclude(pk__in=self.live().values("pk"))


class RelayProcess(models.Model):
    """A running relay process; its heartbeat tells whether its connections are really live."""

    id = models.CharField(primary_key=True, max_length=200)
    hostname = models.CharField(max_length=200)
    pid = models.IntegerField()
    started_at = models.DateTimeField(default=timezone.now)
    heartbeat_at = models.DateTimeField(default=timezone.now, db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    objects = RelayProcessQuerySet.as_manager()

    class Meta:
        verbose_name = "relay process"
        verbose_name_plural = "relay processes"

    def __str__(self) -> str:
        return self.id

    @property
    def is_live(self) -> bool:
        """:meth:`RelayProcessQuerySet.live` for a row already loaded."""
        return self.stopped_at is None and self.heartbeat_at >= live_cutoff()


class Session(models.Model):
    id = models.CharField(primary_key=True, max_length=128)
    title = models.CharField(max_length=200, blank=True, help_text="A name its owner gave it; the id is shown when empty.")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="relay_sessions")
    engine = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    last_activity_at = models.DateTimeField(default=timezone.now, db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=200, blank=True)
    next_turn_index = models.IntegerField(default=0)
    audio_seconds = models.FloatField(default=0.0)
    error_count = models.IntegerField(default=0)

    class Meta:
        ordering = ["-last_activity_at"]

    def __str__(self) -> str:
        return self.id


class Connection(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="connections")
    process = models.ForeignKey(RelayProcess, null=True, blank=True, on_delete=models.SET_NULL, related_name="connections")
    engine = models.CharField(max_length=64, blank=True)
    opened_at = models.DateTimeField(default=timezone.now, db_index=True)
    closed_at = models.DateTimeField(null=True, blank=True, db_index=True)
    close_code = models.IntegerField(null=True, blank=True)
    close_reason = models.CharField(max_length=200, blank=True)
    resumed = models.BooleanField(default=False)
    since = models.IntegerField(null=True, blank=True)
    gap_seconds = models.FloatField(
        null=True, blank=True, help_text="Reconnection time: from the last frame of the connection this one resumed to this one's open."
    )
    audio_bytes = models.BigIntegerField(default=0)
    audio_seconds = models.FloatField(default=0.0)
    messages_received = models.IntegerField(default=0)
    messages_sent = models.IntegerField(default=0)
    error_count = models.IntegerField(default=0)
    last_error_code = models.CharField(max_length=64, blank=True)
    client_addr = models.CharField(max_length=64, blank=True)
    user_agent = models.CharField(max_length=256, blank=True)
    # Who spoke: the signed-in user (null for anonymous), the role the connection was served with,
    # and the label its turns show (the user's display name, or "Guest N" kept across reconnects).
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="relay_connections")
    role = models.CharField(max_length=16, blank=True, help_text="owner, speaker or viewer, as the connection was served.")
    speaker_name = models.CharField(max_length=150, blank=True)
    # Reconnection time: when this connection last received a frame, the connection it resumed
    # (the client said so with previous_connection=, or the same client resumed with since=), and
    # on the resumed one how long after its last frame the resuming connection was opened.
    last_frame_at = models.DateTimeField(null=True, blank=True)
    previous = models.UUIDField(null=True, blank=True, db_index=True, help_text="The connection this one resumed.")
    resumed_after_seconds = models.FloatField(
        null=True, blank=True, help_text="From this connection's last frame to its client's resuming connection."
    )

    objects = ConnectionQuerySet.as_manager()

    class Meta:
        ordering = ["-opened_at"]
        indexes = [models.Index(fields=["session", "closed_at"])]

    def __str__(self) -> str:
        return str(self.id)

    @property
    def is_live(self) -> bool:
        """:meth:`ConnectionQuerySet.live` for a row already loaded (with its process)."""
        return self.closed_at is None and self.process is not None and self.process.is_live

    @property
    def duration_seconds(self) -> float:
        end = self.closed_at or timezone.now()
        return (end - self.opened_at).total_seconds()


class Turn(models.Model):
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="turns")
    index = models.IntegerField()
    connection = models.ForeignKey(Connection, null=True, blank=True, on_delete=models.SET_NULL, related_name="turns")
    transcript = models.TextField(blank=True)
    words = models.JSONField(default=list, blank=True)
    audio_window_start = models.FloatField(default=0.0)
    audio_window_end = models.FloatField(default=0.0)
    end_of_turn_confidence = models.FloatField(default=0.0)
    trigger = models.CharField(max_length=32, blank=True)
    # db_default too: processes of the previous release (a rolling deploy) insert turns without it.
    languages = models.JSONField(
        default=list, db_default=models.Value([], output_field=models.JSONField()), blank=True,
        help_text="Languages the engine detected, when it reports them.",
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["session", "index"]
        constraints = [models.UniqueConstraint(fields=["session", "index"], name="unique_turn_index_per_session")]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.index}"


class ApiToken(models.Model):
    """A key for programmatic clients. Only a SHA-256 digest is stored; the key is shown once.

    Keys are 32 random bytes, so a fast digest is enough (no dictionary to attack); the prefix
    lets operators recognise a key in the admin without storing it.
    """

    name = models.CharField(max_length=100)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="relay_tokens")
    prefix = models.CharField(max_length=12, db_index=True, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}...)"


class Refusal(models.Model):
    """Connection attempts refused before a connection existed, counted per minute and code.

    Kept as aggregate rows (the heartbeat writes each process's counts), so a flood of refused
    attempts costs no write per attempt.
    """

    minute = models.DateTimeField(db_index=True)
    code = models.CharField(max_length=64)
    count = models.IntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["minute", "code"], name="unique_refusal_minute_code")]

    def __str__(self) -> str:
        return f"{self.minute:%Y-%m-%d %H:%M} {self.code} x{self.count}"


ROLE_OWNER = "owner"
ROLE_SPEAKER = "speaker"
ROLE_VIEWER = "viewer"
MEMBER_ROLES = ((ROLE_SPEAKER, "speaker (may send audio)"), (ROLE_VIEWER, "viewer (reads live and history)"))


class ShareLink(models.Model):
    """A link that lets whoever holds it into a session with a role, until it expires or is revoked.

    The link itself is this row's id signed with ``django.core.signing`` (see
    :mod:`relay.store.access`); the row is what makes it revocable and what carries its expiry.
    """

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="share_links")
    role = models.CharField(max_length=16, choices=MEMBER_ROLES, default=ROLE_VIEWER)
    label = models.CharField(max_length=100, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.session_id} {self.role} link #{self.pk}"

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


class Membership(models.Model):
    """A user's role in a session they do not own: invited by username, or joined by a share link.

    A membership that came from a share link (``link``) lasts only as long as that link: it goes
    with the link's row, and stops counting when the link expires or is revoked.
    """

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="relay_memberships")
    role = models.CharField(max_length=16, choices=MEMBER_ROLES, default=ROLE_VIEWER)
    link = models.ForeignKey(ShareLink, null=True, blank=True, on_delete=models.CASCADE, related_name="memberships")
    invited_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at"]
        constraints = [models.UniqueConstraint(fields=["session", "user"], name="unique_member_per_session")]

    def __str__(self) -> str:
        return f"{self.user_id} {self.role} in {self.session_id}"
