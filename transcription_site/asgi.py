"""ASGI entry point: ``daphne transcription_site.asgi:application``.

HTTP goes to Django; WebSockets pass an Origin check (browsers must come from an allowed host;
clients that send no Origin, such as SDKs and the CLI, cannot be hijacked cross-site and pass),
then Django auth (so sessions can belong to users), then the relay's URL router.
"""
import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "transcription_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from relay import server  # noqa: E402
from relay.live import heartbeat  # noqa: E402
from relay.api import worker  # noqa: E402
from relay.live.middleware import OriginCheckMiddleware, WebsocketAuthMiddleware  # noqa: E402
from relay.live.routing import websocket_urlpatterns  # noqa: E402

from django.conf import settings  # noqa: E402

# Framework patches (relay/server/): refuses to start if an upgrade moved what they patch.
server.install(settings)
heartbeat.start_with_server()  # an idle process is listed from its start, not its first stream
worker.start_with_server()  # RELAY_WORKER=inline: usage and webhooks from a thread of this process

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": OriginCheckMiddleware(WebsocketAuthMiddleware(URLRouter(websocket_urlpatterns))),
    }
)

# Build the engine now, not at the first connection: the Whisper model loads in a background
# thread and /healthz reports it loading meanwhile. Tests that import this module in-process
# set RELAY_PRELOAD_ENGINE=0.
if os.environ.get("RELAY_PRELOAD_ENGINE", "1") == "1":
    from relay.engines import get_engine
    from relay.exceptions import EngineUnavailable
    from relay.ops.logs import get_logger

    try:
        get_engine()
    except EngineUnavailable as exc:
        get_logger("relay.engine").error("engine_unavailable", engine=settings.RELAY_ENGINE, reason=exc.description)

# Django, the URLconf, the models and the engines' modules never become garbage: keep them out of
# the collector's generations so full collections stay short (docs/benchmarks.md).
gc.collect()
gc.freeze()
