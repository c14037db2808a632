"""What the API returns and accepts. Sessions and turns are shaped like the WebSocket's messages
(turn fields as in ``TurnInfo``), and the same dicts go into webhook bodies."""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from relay.api.models import EVENTS, WebhookDelivery, WebhookEndpoint
from relay.models import MEMBER_ROLES, ApiToken, Membership, Session, ShareLink
from relay.store import access


def absolute(path: str, request: Any = None) -> str:
    """A full URL: from the request when there is one, else from ``RELAY_PUBLIC_URL`` (webhooks)."""
    if request is not None:
        return request.build_absolute_uri(path)
    return settings.RELAY_PUBLIC_URL + path


class SessionSerializer(serializers.ModelSerializer):
    owner = serializers.SerializerMethodField(help_text="The owner's username; null for an anonymous session.")
    turn_count = serializers.SerializerMethodField()
    is_live = serializers.SerializerMethodField(help_text="A connection of a live relay process is open.")
    role = serializers.SerializerMethodField(help_text="Your role in it: owner, speaker or viewer.")
    participants = serializers.SerializerMethodField(help_text="The names its speakers' turns carry.")
    duration_seconds = serializers.SerializerMethodField(help_text="From creation to the last activity.")
    urls = serializers.SerializerMethodField()

    class Meta:
        model = Session
        fields = ["id", "title", "owner", "engine", "created_at", "last_activity_at", "ended_at", "end_reason", "duration_seconds",
                  "audio_seconds", "error_count", "turn_count", "is_live", "role", "participants", "urls"]
        read_only_fields = fields

    def get_owner(self, session: Session) -> str | None:
        return session.owner.get_username() if session.owner_id and session.owner else None

    def get_turn_count(self, session: Session) -> int:
        count = getattr(session, "turn_count", None)
        return session.turns.count() if count is None else count

    def get_is_live(self, session: Session) -> bool:
        live = getattr(session, "is_live", None)
        if live is None:
            from relay.models import Connection

            live = Connection.objects.live().filter(session=session).exists()
        return bool(live)

    def get_role(self, session: Session) -> str | None:
        roles = self.context.get("roles") or {}
        if session.pk in roles:
            return roles[session.pk]
        user = self.context.get("user")
        if user is None:
            return None
        if hasattr(session, "member_role"):
            return access.role_of_listed(session, user) if access.is_signed_in(user) else None
        return access.session_role(user=user, session=session)

    def get_participants(self, session: Session) -> list[str]:
        known = self.context.get("participants")
        if known is not None:
            return known.get(session.pk, [])
        return access.session_participants(session_ids=[session.pk]).get(session.pk, [])

    def get_duration_seconds(self, session: Session) -> float:
        return max(0.0, (session.last_activity_at - session.created_at).total_seconds())

    @extend_schema_field({"type": "object", "properties": {k: {"type": "string", "format": "uri"} for k in ("self", "turns", "transcript_txt", "transcript_json", "transcript_srt", "transcript_vtt", "page")}})
    def get_urls(self, session: Session) -> dict[str, str]:
        request = self.context.get("request")
        urls = {
            "self": absolute(reverse("relay_api:session-detail", args=[session.pk]), request),
            "turns": absolute(reverse("relay_api:session-turns", args=[session.pk]), request),
        }
        for fmt in ("txt", "json", "srt", "vtt"):
            urls[f"transcript_{fmt}"] = absolute(reverse("relay_api:session-transcript", args=[session.pk]) + f"?fmt={fmt}", request)
        urls["page"] = absolute(reverse("session-detail", args=[session.pk]), request)
        return urls


class SessionUpdateSerializer(serializers.Serializer):
    title = serializers.CharField(max_length=200, allow_blank=True)


class SessionEndSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=200, required=False, default="Ended through the API")


class WordSerializer(serializers.Serializer):
    word = serializers.CharField()
    start = serializers.FloatField()
    end = serializers.FloatField()
    confidence = serializers.FloatField()


class TurnSerializer(serializers.Serializer):
    """A finished turn, with the fields of the WebSocket's EndOfTurn ``TurnInfo``."""

    index = serializers.IntegerField()
    transcript = serializers.CharField(allow_blank=True)
    words = WordSerializer(many=True)
    audio_window_start = serializers.FloatField()
    audio_window_end = serializers.FloatField()
    end_of_turn_confidence = serializers.FloatField()
    trigger = serializers.CharField()
    languages = serializers.ListField(child=serializers.CharField())
    speaker = serializers.CharField(help_text="The speaker's display name (or 'Guest N'); the connection id for turns from before names were kept.")
    connection_id = serializers.UUIDField(allow_null=True)
    created_at = serializers.DateTimeField()


class TurnPageSerializer(serializers.Serializer):
    results = TurnSerializer(many=True)
    last_index = serializers.IntegerField(allow_null=True, help_text="Pass it as since= for the next page.")
    next = serializers.URLField(allow_null=True)


class MemberSerializer(serializers.ModelSerializer):
    user_id = serializers.IntegerField(source="user.pk", read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)
    display_name = serializers.SerializerMethodField()
    via_share_link = serializers.SerializerMethodField()

    class Meta:
        model = Membership
        fields = ["user_id", "username", "display_name", "role", "via_share_link", "created_at"]
        read_only_fields = fields

    def get_display_name(self, membership: Membership) -> str:
        return access.display_name(membership.user)

    def get_via_share_link(self, membership: Membership) -> bool:
        return membership.link_id is not None


class MemberInviteSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=MEMBER_ROLES)


class ShareLinkSerializer(serializers.ModelSerializer):
    usable = serializers.SerializerMethodField()

    class Meta:
        model = ShareLink
        fields = ["id", "role", "label", "created_at", "expires_at", "revoked_at", "usable"]
        read_only_fields = fields

    def get_usable(self, link: ShareLink) -> bool:
        from django.utils import timezone

        return link.usable(timezone.now())


class ShareLinkCreateSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=MEMBER_ROLES, default="viewer")
    label = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)


class ShareLinkCreatedSerializer(ShareLinkSerializer):
    share = serializers.CharField(read_only=True, help_text="The signed link value: ?share=<value> on the page or the WebSocket URL. Shown once.")
    url = serializers.URLField(read_only=True)

    class Meta(ShareLinkSerializer.Meta):
        fields = [*ShareLinkSerializer.Meta.fields, "share", "url"]
        read_only_fields = fields


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "revoked_at"]
        read_only_fields = ["id", "prefix", "created_at", "last_used_at", "revoked_at"]


class TokenCreatedSerializer(TokenSerializer):
    key = serializers.CharField(read_only=True, help_text="The key: shown once, never stored (only its SHA-256).")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "key"]


class WebhookEndpointSerializer(serializers.ModelSerializer):
    events = serializers.ListField(child=serializers.ChoiceField(choices=EVENTS), allow_empty=False)
    token = serializers.PrimaryKeyRelatedField(
        queryset=ApiToken.objects.none(), required=False, allow_null=True,
        help_text="Only sessions this API token (one of yours) connected to; null: every session you own or connected to.",
    )
    secret = serializers.CharField(write_only=True, required=False, min_length=16, max_length=100,
                                   help_text="The HMAC key; generated when left out. Returned only when the endpoint is created.")

    class Meta:
        model = WebhookEndpoint
        fields = ["id", "url", "events", "description", "token", "secret", "is_active", "disabled_at", "disabled_reason",
                  "consecutive_failures", "created_at"]
        read_only_fields = ["id", "disabled_at", "disabled_reason", "consecutive_failures", "created_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        user = self.context.get("user")
        if user is not None and access.is_signed_in(user):
            self.fields["token"].queryset = ApiToken.objects.filter(user=user, revoked_at__isnull=True)

    def validate_events(self, events: list[str]) -> list[str]:
        return sorted(set(events))


class WebhookEndpointCreatedSerializer(WebhookEndpointSerializer):
    secret = serializers.CharField(read_only=True, help_text="The HMAC key of X-Relay-Signature. Shown once.")


class WebhookDeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookDelivery
        fields = ["id", "event", "session_id", "status", "attempts", "next_attempt_at", "last_attempt_at", "last_status_code",
                  "last_error", "delivered_at", "created_at", "payload"]
        read_only_fields = fields


class UsageTotalsSerializer(serializers.Serializer):
    audio_minutes = serializers.FloatField()
    sessions = serializers.IntegerField(help_text="Sessions started (by the connection that created each).")
    connections = serializers.IntegerField()
    turns = serializers.IntegerField()
    errors = serializers.IntegerField()


class UsageDaySerializer(UsageTotalsSerializer):
    day = serializers.DateField()


class UsageTokenSerializer(UsageTotalsSerializer):
    token_id = serializers.IntegerField()
    token_name = serializers.CharField(allow_null=True)


class UsageTokenDaySerializer(UsageTokenSerializer):
    day = serializers.DateField()


class UsageSerializer(serializers.Serializer):
    start = serializers.DateField()
    end = serializers.DateField()
    totals = UsageTotalsSerializer()
    days = UsageDaySerializer(many=True, help_text="Your usage per day (every token and the login together), newest first.")
    tokens = UsageTokenSerializer(many=True, help_text="Per API token over the period.")
    token_days = UsageTokenDaySerializer(many=True, help_text="Per API token and day, newest first.")
    pending_note = serializers.CharField(help_text="Usage is counted by the worker shortly after each connection closes.")


