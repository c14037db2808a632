"""HTTP views: the 426 answer on the WebSocket paths."""
from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from relay.flux import protocol
from relay.flux.constants import CLIENT_MESSAGE_TYPES


def _register_reason_phrase() -> None:
    """ASGI carries only the status code; daphne writes the status line with Twisted, whose
    public ``twisted.web.http.RESPONSES`` table lacks 426, so the line read ``426 Unknown Status``.
    Adding the phrase there (when Twisted is installed: not under uvicorn alone) fixes it."""
    try:
        from twisted.web import http
    except ImportError:
        return
    http.RESPONSES.setdefault(426, b"Upgrade Required")


_register_reason_phrase()


@require_GET
def websocket_info(request: HttpRequest) -> JsonResponse:
    """Plain HTTP on a WebSocket path: say how to connect (what ``curl http://host/v2/listen`` shows)."""
    scheme = "wss" if request.is_secure() else "ws"
    url = f"{scheme}://{request.get_host()}{request.path}"
    response = JsonResponse(
        {
            "error": "upgrade_required",
            "description": "This is a WebSocket endpoint speaking Deepgram's Flux v2 protocol. "
            "Open a WebSocket, send 16 kHz mono Int16 PCM as binary frames, read TurnInfo messages.",
            "url": url,
            "example": f"{url}?session=my-session&encoding=linear16&sample_rate=16000",
            "query_parameters": [name for name in protocol.KNOWN_PARAMS if name != "token"],
            "control_messages": sorted(CLIENT_MESSAGE_TYPES),
            "docs": "/docs/protocol.md in the project repository",
        },
        status=426,
    )
    response.reason_phrase = "Upgrade Required"
    response["Upgrade"] = "websocket"
    response["Connection"] = "Upgrade"
    return response
