from django.contrib import admin

from relay.models import Connection, RelayProcess, Session, Turn


class TurnInline(admin.TabularInline):
    model = Turn
    extra = 0
    can_delete = False
    fields = ("index", "transcript", "trigger", "audio_window_start", "audio_window_end", "connection", "created_at")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ("id", "engine", "created_at", "last_activity_at", "ended_at", "audio_seconds", "error_count")
    search_fields = ("id",)
    inlines = [TurnInline]


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    list_display = ("id", "session", "opened_at", "closed_at", "close_code", "close_reason", "audio_seconds")
    search_fields = ("id", "session__id")


admin.site.register(RelayProcess)
