from django.urls import path, re_path

from relay.flux.constants import SESSION_ID_PATTERN
from relay.ops import exports, health, metrics
from relay.web import accounts, demo, rooms, views

urlpatterns = [
    path("", demo.root, name="root"),
    path("demo/ai-voice/", demo.ai_voice, name="demo-ai-voice"),
    re_path(r"^demo/api/ai/transcription/?$", views.websocket_info, name="ws-info-demo"),
    re_path(r"^v2/listen/?$", views.websocket_info, name="ws-info-flux"),
    path("healthz", health.healthz, name="healthz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    re_path(
        rf"^sessions/(?P<session_id>{SESSION_ID_PATTERN})/transcript\.(?P<fmt>txt|json|srt|vtt)$",
        exports.transcript_view,
        name="transcript-export",
    ),
    *accounts.urlpatterns,  # sign up, sign in and out, password reset, the account page
    *rooms.urlpatterns,  # My sessions, a session's page, share links
]
