"""Admin: webhook endpoints (with the disabled flag), their deliveries (with a redeliver action),
and the daily usage rows."""
from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from relay.api import webhooks
from relay.api.models import UsageDaily, WebhookDelivery, WebhookEndpoint


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = ("url", "user", "token", "event_list", "state", "consecutive_failures", "created_at")
    list_filter = ("is_active",)
    search_fields = ("url", "user__username", "description")
    readonly_fields = ("disabled_at", "disabled_reason", "consecutive_failures", "created_at")
    raw_id_fields = ("user", "token")
    actions = ("enable", "send_ping")

    @admin.display(description="events")
    def event_list(self, obj: WebhookEndpoint) -> str:
        return ", ".join(obj.events or [])

    @admin.display(description="state")
    def state(self, obj: WebhookEndpoint) -> str:
        if obj.is_active:
            return format_html('<strong style="color:#2e7d32">on</strong>')
        if obj.disabled_at:
            return format_html('<strong style="color:#c62828" title="{}">disabled by the relay</strong>', obj.disabled_reason)
        return format_html('<strong style="color:#777">off</strong>')

    @admin.action(description="Turn on again (failure count starts over)")
    def enable(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        for endpoint in queryset:
            webhooks.endpoint_enable(endpoint=endpoint)
        messages.success(request, f"{queryset.count()} endpoint(s) on.")

    @admin.action(description="Send a ping event")
    def send_ping(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        for endpoint in queryset:
            webhooks.ping_enqueue(endpoint=endpoint)
        messages.success(request, f"Ping queued for {queryset.count()} endpoint(s).")


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ("created_at", "event", "session_id", "endpoint", "status", "attempts", "last_status_code", "next_attempt_at", "short_error")
    list_filter = ("status", "event")
    search_fields = ("session_id", "endpoint__url", "id")
    date_hierarchy = "created_at"
    actions = ("redeliver",)
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: WebhookDelivery | None = None) -> bool:
        return False

    @admin.display(description="last error")
    def short_error(self, obj: WebhookDelivery) -> str:
        return (obj.last_error or "")[:80]

    @admin.action(description="Redeliver (same body, fresh signature, new retries)", permissions=["view"])
    def redeliver(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        for delivery in queryset:
            webhooks.delivery_redeliver(delivery=delivery)
        messages.success(request, f"{queryset.count()} deliver(ies) queued again.")


@admin.register(UsageDaily)
class UsageDailyAdmin(admin.ModelAdmin):
    list_display = ("day", "kind", "user", "token", "minutes", "sessions", "connections", "turns", "errors")
    list_filter = ("kind", "day")
    search_fields = ("user__username", "token__name", "token__prefix")
    date_hierarchy = "day"
    readonly_fields = [f.name for f in UsageDaily._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageDaily | None = None) -> bool:
        return False

    @admin.display(description="audio (min)", ordering="audio_seconds")
    def minutes(self, obj: UsageDaily) -> str:
        return f"{obj.audio_minutes:.1f}"
