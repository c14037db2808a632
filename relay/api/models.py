"""Webhook endpoints and their deliveries, usage aggregates, and the worker's cursors.

Nothing here is written on a stream's path: the worker (relay.api.worker) derives webhook events
and usage from rows the relay writes anyway (closed ``Connection`` rows, ``Turn`` rows). The one
exception is :class:`ConnectionUsage` for a connection signed in with an API token, inserted
once, in the background, after the connection opened (the ``Connection`` row has no token).
"""
from __future__ import annotations

import secrets
import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from relay.models import ApiToken, Connection

EVENT_SESSION_ENDED = "session.ended"
EVENT_TURN_FINISHED = "turn.finished"
EVENT_PING = "ping"
EVENTS = ((EVENT_SESSION_ENDED, "session.ended: the last connection closed and its turns are stored"),
          (EVENT_TURN_FINISHED, "turn.finished: every finished turn (opt-in, one request per turn)"))


def new_secret() -> str:
    """A signing secret: 32 random bytes, URL-safe, with a prefix that says what it is."""
    return "whsec_" + secrets.token_urlsafe(32)


class WebhookEndpoint(models.Model):
    """Where a user's (or one of their tokens') events are POSTed, signed with ``secret``.

    Scope: with ``token`` set, only sessions that token connected to; with only ``user``, sessions
    the user owns or connected to; with neither (made by staff in the admin), every session.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="relay_webhooks")
    token = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=500)
    secret = models.CharField(max_length=100, default=new_secret, help_text="HMAC-SHA256 key of X-Relay-Signature.")
    events = models.JSONField(default=list, help_text=f'A list of: {", ".join(e for e, _ in EVENTS)}.')
    description = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)
    disabled_at = models.DateTimeField(null=True, blank=True, help_text="Set when the relay disabled it after repeated failures.")
    disabled_reason = models.CharField(max_length=300, blank=True)
    consecutive_failures = models.IntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "webhook endpoint"

    def __str__(self) -> str:
        return self.url

    def wants(self, event: str) -> bool:
        return event in (self.events or [])


class WebhookDeliveryQuerySet(models.QuerySet):
    def due(self, now) -> "WebhookDeliveryQuerySet":
        """Pending, due, not claimed by a worker that may still be sending it, endpoint enabled."""
        return self.filter(status=WebhookDelivery.PENDING, next_attempt_at__lte=now, endpoint__is_active=True).filter(
            Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
        )


class WebhookDelivery(models.Model):
    """One event for one endpoint: its body (fixed at creation, so a redelivery is identical) and
    how sending it went."""

    PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
    STATUSES = ((PENDING, "pending (queued or retrying)"), (DELIVERED, "delivered"), (FAILED, "failed (retries exhausted)"))

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=40)
    event_key = models.CharField(max_length=250, help_text="What makes the event unique (a repeated scan adds nothing).")
    session_id = models.CharField(max_length=128, blank=True, db_index=True)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=STATUSES, default=PENDING)
    attempts = models.IntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    claimed_until = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.IntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = WebhookDeliveryQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "webhook deliveries"
        constraints = [models.UniqueConstraint(fields=["endpoint", "event_key"], name="unique_delivery_per_endpoint_event")]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.event} -> {self.endpoint_id} ({self.status})"


class WorkerCursor(models.Model):
    """How far a worker scan got: a time (closed connections) or a primary key (turns)."""

    name = models.CharField(primary_key=True, max_length=64)
    at = models.DateTimeField(null=True, blank=True)
    position = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name


class ConnectionUsage(models.Model):
    """Who a connection was (user, API token) and whether its usage is counted in :class:`UsageDaily`."""

    connection = models.OneToOneField(Connection, primary_key=True, on_delete=models.CASCADE, related_name="usage")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    token = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="connection_usage")
    counted_at = models.DateTimeField(null=True, blank=True)
    audio_seconds = models.FloatField(default=0.0)
    turns = models.IntegerField(default=0)
    errors = models.IntegerField(default=0)
    created_session = models.BooleanField(default=False)

    def __str__(self) -> str:
        return str(self.connection_id)


class UsageDaily(models.Model):
    """A day's usage of one user or one API token; kept up to date by the worker, one upsert per close."""

    USER, TOKEN = "user", "token"
    day = models.DateField(db_index=True)
    kind = models.CharField(max_length=8, choices=((USER, "user"), (TOKEN, "API token")))
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="relay_usage")
    token = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.CASCADE, related_name="usage")
    audio_seconds = models.FloatField(default=0.0)
    sessions = models.IntegerField(default=0, help_text="Sessions started (the connection that created one).")
    connections = models.IntegerField(default=0)
    turns = models.IntegerField(default=0)
    errors = models.IntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-day"]
        verbose_name = "daily usage"
        verbose_name_plural = "daily usage"
        constraints = [
            models.UniqueConstraint(fields=["day", "user"], condition=Q(kind="user"), name="unique_usage_user_day"),
            models.UniqueConstraint(fields=["day", "token"], condition=Q(kind="token"), name="unique_usage_token_day"),
            models.CheckConstraint(
                condition=(Q(kind="user", user__isnull=False) | Q(kind="token", token__isnull=False)), name="usage_row_has_subject"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.kind} {self.user_id or self.token_id}"

    @property
    def audio_minutes(self) -> float:
        return self.audio_seconds / 60.0
