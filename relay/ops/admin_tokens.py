"""Admin for API tokens: the key is generated on save and shown once; only its digest is kept."""
from __future__ import annotations

from django.contrib import admin, messages
from django.utils import timezone

from relay.live import auth
from relay.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "user", "created_at", "last_used_at", "revoked_at")
    fields = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    search_fields = ("name", "prefix")
    actions = ["revoke"]

    def save_model(self, request, obj, form, change) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        token, key = auth.token_create(name=obj.name, user=obj.user)
        obj.pk = token.pk
        messages.warning(request, f"New API token for {obj.name}: {key}  (copy it now; it is not stored and will not be shown again)")

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset) -> None:
        queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
