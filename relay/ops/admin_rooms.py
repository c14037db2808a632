"""Admin for rooms: members and share links, so an operator can see who has access and revoke it."""
from __future__ import annotations

from django.contrib import admin
from django.utils import timezone

from relay.models import Membership, ShareLink


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("session", "user", "role", "link", "invited_by", "created_at")
    list_filter = ("role",)
    search_fields = ("session__id", "session__title", "user__username")
    raw_id_fields = ("session", "user", "link", "invited_by")


@admin.register(ShareLink)
class ShareLinkAdmin(admin.ModelAdmin):
    """The signed value is never shown here: it is derived from the row, and the owner has it."""

    list_display = ("id", "session", "role", "label", "created_by", "created_at", "expires_at", "revoked_at")
    list_filter = ("role",)
    search_fields = ("session__id", "session__title", "label")
    raw_id_fields = ("session", "created_by")
    actions = ["revoke"]

    @admin.action(description="Revoke selected links")
    def revoke(self, request, queryset) -> None:
        queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
