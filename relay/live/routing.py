from django.urls import re_path

from relay.live.consumer import TranscriptionConsumer

websocket_urlpatterns = [
    re_path(r"^demo/api/ai/transcription/?$", TranscriptionConsumer.as_asgi()),
    re_path(r"^v2/listen/?$", TranscriptionConsumer.as_asgi()),
]
