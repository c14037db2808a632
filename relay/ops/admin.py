"""The admin that monitors the relay: sessions, connections, processes, and the dashboard.

Everything here is read-only except three operator actions on sessions: end (closes every
connection of the session on every process, through ``services.session_end``), export
transcripts, and delete with history. "Live" always means ``Connection.objects.live()``: not
closed and on a process whose heartbeat is fresh, so a crashed process's connections stop
showing as live within three heartbeats.
"""
from __future__ import annotations

import io
import uuid
import zipfile

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.text import Truncator

from relay.ops import dashboard, exports, stability

from relay.store import services
from relay.models import Connection, RelayProcess, Session, Turn


def _count(queryset: QuerySet) -> Coalesce:
    """A correlated COUNT subquery (no join fan-out when several counts sit on one row)."""
    counted = queryset.order_by().values("session").annotate(n=Count("pk")).values("n")[:1]
    return Coalesce(Subquery(counted, output_field=IntegerField()), Value(0))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


STATUS_COLOURS = {"live": "#2e7d32", "idle": "#8a6d00", "ended": "#777", "closed": "#777", "orphaned": "#c62828"}


def badge(status: str) -> str:
    return format_html('<strong style="color:{}">{}</strong>', STATUS_COLOURS.get(status, "inherit"), status)


# --- sessions ------------------------------------------------------------------------------------
class SessionStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("live", "live"), ("idle", "idle"), ("ended", "ended")]

    def queryset(self, request, queryset):
        if self.value() == "live":
            return queryset.filter(ended_at__isnull=True, live_connections__gt=0)
        if self.value() == "idle":
            return queryset.filter(ended_at__isnull=True, live_connections=0)
        if self.value() == "ended":
            return queryset.filter(ended_at__isnull=False)
        return queryset


class HasErrorsFilter(admin.SimpleListFilter):
    title = "errors"
    parameter_name = "errors"

    def lookups(self, request, model_admin):
        return [("yes", "with errors"), ("no", "without errors")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(error_count__gt=0)
        if self.value() == "no":
            return queryset.filter(error_count=0)
        return queryset


class TurnInline(admin.TabularInline):
    """The session's latest turns, read-only (the full history is in the exports)."""

    model = Turn
    extra = 0
    max_shown = 200
    can_delete = False
    show_change_link = False
    verbose_name_plural = f"turns (latest {max_shown}; the exports have all of them)"
    fields = ("index", "transcript", "trigger", "audio_window_start", "audio_window_end", "speaker", "created_at")
    readonly_fields = fields

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        match = request.resolver_match
        object_id = match.kwargs.get("object_id") if match else None
        if object_id:
            from django.contrib.admin.utils import unquote

            latest = queryset.filter(session_id=unquote(object_id)).order_by("-index").values("pk")[: self.max_shown]
            queryset = queryset.filter(pk__in=Subquery(latest))
        return queryset.order_by("index")

    @admin.display(description="speaker")
    def speaker(self, obj: Turn) -> str:
        if not obj.connection_id:
            return "-"
        url = reverse("admin:relay_connection_change", args=[obj.connection_id])
        return format_html('<a href="{}">{}</a>', url, str(obj.connection_id)[:8])

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = (
        "id", "status", "live_connections", "created_at", "last_activity_at", "duration",
        "audio", "turn_count", "error_count", "engine", "owner",
    )
    list_filter = (SessionStatusFilter, "engine", HasErrorsFilter, "created_at", "last_activity_at")
    search_fields = ("id", "title", "turns__transcript")
    search_help_text = "Search by session id, title or words in its transcript."
    date_hierarchy = "created_at"
    ordering = ("-last_activity_at",)
    list_per_page = 50
    inlines = [TurnInline]
    actions = ["end_sessions", "export_transcripts", "delete_selected"]
    fields = (
        "id", "title", "status", "owner", "engine", "live_connections", "created_at", "last_activity_at", "duration",
        "ended_at", "end_reason", "audio", "turn_count", "next_turn_index", "error_count", "connections_link", "export_links",
    )
    readonly_fields = fields

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("owner")
            .annotate(
                live_connections=_count(Connection.objects.live().filter(session=OuterRef("pk"))),
                turn_count=_count(Turn.objects.filter(session=OuterRef("pk"))),
            )
        )

    def get_urls(self):
        return [
            path("dashboard/", self.admin_site.admin_view(self.dashboard_view), name="relay_dashboard"),
        ] + super().get_urls()

    # -- permissions: sessions are made by the relay; operators end, export, delete ------------------
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_end_permission(self, request) -> bool:
        return request.user.has_perm("relay.change_session")

    def has_export_permission(self, request) -> bool:
        return self.has_view_permission(request)

    # -- columns --------------------------------------------------------------------------------
    @admin.display(description="status")
    def status(self, obj: Session) -> str:
        if obj.ended_at is not None:
            return badge("ended")
        return badge("live" if getattr(obj, "live_connections", 0) else "idle")

    @admin.display(description="live conns", ordering="live_connections")
    def live_connections(self, obj: Session) -> int:
        return obj.live_connections

    @admin.display(description="turns", ordering="turn_count")
    def turn_count(self, obj: Session) -> int:
        return obj.turn_count

    @admin.display(description="duration")
    def duration(self, obj: Session) -> str:
        end = obj.ended_at or (timezone.now() if getattr(obj, "live_connections", 0) else obj.last_activity_at)
        return format_duration((end - obj.created_at).total_seconds())

    @admin.display(description="audio", ordering="audio_seconds")
    def audio(self, obj: Session) -> str:
        return format_duration(obj.audio_seconds)

    @admin.display(description="connections")
    def connections_link(self, obj: Session) -> str:
        url = reverse("admin:relay_connection_changelist") + "?" + urlencode({"session__id__exact": obj.pk})
        return format_html('<a href="{}">{} connections</a>', url, obj.connections.count())

    @admin.display(description="transcript")
    def export_links(self, obj: Session) -> str:
        return format_html_join(
            " · ",
            '<a href="{}">{}</a>',
            ((reverse("transcript-export", kwargs={"session_id": obj.pk, "fmt": fmt}), fmt) for fmt in exports.FORMATS),
        )

    # -- actions --------------------------------------------------------------------------------
    @admin.action(description="End selected sessions (closes their connections everywhere)", permissions=["end"])
    def end_sessions(self, request: HttpRequest, queryset: QuerySet) -> None:
        reason = f"Ended by an operator ({request.user.get_username()})"
        ended = [pk for pk in queryset.filter(ended_at__isnull=True).values_list("pk", flat=True) if services.session_end(session_id=pk, reason=reason)]
        skipped = queryset.count() - len(ended)
        self.message_user(request, f"Ended {len(ended)} session(s)." + (f" {skipped} were already ended." if skipped else ""), messages.SUCCESS)

    @admin.action(description="Export transcripts (zip of txt, json, srt, vtt)", permissions=["export"])
    def export_transcripts(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for session in queryset.order_by("created_at"):
                for fmt in exports.FORMATS:
                    archive.writestr(exports.export_filename(session.pk, fmt), exports.export_text(session=session, fmt=fmt))
        response = HttpResponse(buffer.getvalue(), content_type="application/zip")
        stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
        response["Content-Disposition"] = f'attachment; filename="transcripts-{stamp}.zip"'
        return response

    def get_actions(self, request):
        actions = super().get_actions(request)
        if "delete_selected" in actions:
            func, name, _ = actions["delete_selected"]
            actions["delete_selected"] = (func, name, "Delete selected sessions with their history")
        return actions

    def get_deleted_objects(self, objs, request):
        """Summarise instead of listing every turn (a long session has thousands)."""
        sessions = list(objs)
        ids = [s.pk for s in sessions]
        per_conn = dict(Connection.objects.filter(session_id__in=ids).values_list("session_id").annotate(n=Count("pk")))
        per_turn = dict(Turn.objects.filter(session_id__in=ids).values_list("session_id").annotate(n=Count("pk")))
        deleted = [
            [
                format_html('Session: <a href="{}">{}</a>', reverse("admin:relay_session_change", args=[s.pk]), s.pk),
                [f"{per_conn.get(s.pk, 0)} connection(s)", f"{per_turn.get(s.pk, 0)} turn(s)"],
            ]
            for s in sessions
        ]
        counts = {"sessions": len(sessions), "connections": sum(per_conn.values()), "turns": sum(per_turn.values())}
        needed = set()
        if not self.has_delete_permission(request):
            needed.add("session")
        for model in ("connection", "turn"):
            if not request.user.has_perm(f"relay.delete_{model}"):
                needed.add(model)
        return deleted, counts, needed, []

    def delete_model(self, request, obj: Session) -> None:
        self.delete_queryset(request, Session.objects.filter(pk=obj.pk))

    def delete_queryset(self, request, queryset: QuerySet) -> None:
        """End live sessions first, so their connections close before their rows go."""
        live = Connection.objects.live().filter(session__in=queryset).order_by().values_list("session_id", flat=True).distinct()
        for pk in list(live):
            services.session_end(session_id=pk, reason="Deleted by an operator")
        Session.objects.filter(pk__in=list(queryset.values_list("pk", flat=True))).delete()

    # -- dashboard ------------------------------------------------------------------------------
    def dashboard_view(self, request: HttpRequest) -> TemplateResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        key = request.GET.get("window", dashboard.DEFAULT_WINDOW)
        data = dashboard.dashboard_data(window_key=key)
        storage = data.storage
        context = {
            **self.admin_site.each_context(request),
            "title": "Relay dashboard",
            "opts": self.model._meta,
            "data": data,
            "windows": dashboard.WINDOWS.values(),
            "chart": dashboard.chart_svg(data),
            "storage_database": dashboard.format_bytes(storage["database_bytes"]),
            "storage_relay": dashboard.format_bytes(storage["relay_bytes"]) if storage["relay_bytes"] is not None else "",
            "audio_hours": f"{data.audio_hours:.2f}",
        }
        return TemplateResponse(request, "admin/relay/dashboard.html", context)


# --- connections ---------------------------------------------------------------------------------
class OutcomeFilter(admin.SimpleListFilter):
    title = "outcome"
    parameter_name = "outcome"

    def lookups(self, request, model_admin):
        return [("live", "live"), ("clean", "clean close"), ("unclean", "dropped or error"), ("orphaned", "orphaned (process gone)")]

    def queryset(self, request, queryset):
        if self.value() == "live":
            return queryset.live()
        if self.value() == "clean":
            return queryset.filter(closed_at__isnull=False, close_code__in=stability.CLEAN_CLOSE_CODES)
        if self.value() == "unclean":
            return queryset.filter(closed_at__isnull=False).exclude(close_code__in=stability.CLEAN_CLOSE_CODES)
        if self.value() == "orphaned":
            return queryset.orphaned()
        return queryset


class ResumedFilter(admin.SimpleListFilter):
    title = "resumed"
    parameter_name = "resumed"

    def lookups(self, request, model_admin):
        return [("yes", "resumed a session"), ("no", "started a session")]

    def queryset(self, request, queryset):
        if self.value() in {"yes", "no"}:
            return queryset.filter(resumed=self.value() == "yes")
        return queryset


@admin.register(Connection)
class ConnectionAdmin(admin.ModelAdmin):
    list_display = (
        "short_id", "session_link", "state", "opened_at", "closed_at", "duration", "close_code", "close_reason",
        "audio", "client_addr", "agent", "gap", "error_count",
    )
    list_filter = (OutcomeFilter, ResumedFilter, "close_code", "engine", "opened_at")
    search_fields = ("session__id", "client_addr", "user_agent", "close_reason", "last_error_code")
    search_help_text = "Search by connection id, session id, client address, user agent or close reason."
    date_hierarchy = "opened_at"
    list_select_related = ("process",)
    list_per_page = 100
    readonly_fields = (
        "id", "session_link", "state", "process", "engine", "opened_at", "closed_at", "duration", "close_code", "close_reason",
        "resumed", "since", "gap", "audio", "audio_bytes", "messages_received", "messages_sent", "error_count",
        "last_error_code", "client_addr", "user_agent",
    )
    fields = readonly_fields

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        try:
            return queryset.filter(pk=uuid.UUID(term)), False
        except ValueError:
            return super().get_search_results(request, queryset, search_term)

    @admin.display(description="id")
    def short_id(self, obj: Connection) -> str:
        return str(obj.pk)[:8]

    @admin.display(description="session", ordering="session")
    def session_link(self, obj: Connection) -> str:
        return format_html('<a href="{}">{}</a>', reverse("admin:relay_session_change", args=[obj.session_id]), obj.session_id)

    @admin.display(description="state")
    def state(self, obj: Connection) -> str:
        if obj.closed_at is not None:
            return badge("closed")
        return badge("live" if obj.is_live else "orphaned")

    @admin.display(description="duration")
    def duration(self, obj: Connection) -> str:
        return format_duration(obj.duration_seconds)

    @admin.display(description="audio", ordering="audio_seconds")
    def audio(self, obj: Connection) -> str:
        return format_duration(obj.audio_seconds)

    @admin.display(description="user agent")
    def agent(self, obj: Connection) -> str:
        return Truncator(obj.user_agent).chars(40)

    @admin.display(description="reconnection time", ordering="gap_seconds")
    def gap(self, obj: Connection) -> str:
        if obj.gap_seconds is None:
            return "-"
        return stability.format_seconds(obj.gap_seconds)


# --- processes -----------------------------------------------------------------------------------
@admin.register(RelayProcess)
class RelayProcessAdmin(admin.ModelAdmin):
    list_display = ("id", "hostname", "pid", "state", "started_at", "heartbeat_at", "stopped_at", "open_connections")
    readonly_fields = ("id", "hostname", "pid", "started_at", "heartbeat_at", "stopped_at")
    ordering = ("-heartbeat_at",)

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(open_conns=Count("connections", filter=Q(connections__closed_at__isnull=True)))

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="state")
    def state(self, obj: RelayProcess) -> str:
        if obj.stopped_at is not None:
            return badge("ended")
        return badge("live" if obj.is_live else "orphaned")

    @admin.display(description="open connections", ordering="open_conns")
    def open_connections(self, obj: RelayProcess) -> int:
        return obj.open_conns

