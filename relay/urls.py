from django.urls import re_path

from relay import views

urlpatterns = [
    re_path(r"^demo/api/ai/transcription/?$", views.websocket_info, name="ws-info-demo"),
    re_path(r"^v2/listen/?$", views.websocket_info, name="ws-info-flux"),
]
