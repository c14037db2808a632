"""ASGI's WebSocket Denial Response for daphne: refuse a handshake with the application's own status and body.

Touches: daphne ``daphne.ws_protocol.WebSocketProtocol.handle_reply`` (wrapped), which knows
only accept, close (before accept: ``serverReject``, always HTTP 403 with no body) and send;
``daphne.server.Server.create_application`` (wrapped), to advertise the extension in the
WebSocket scope's ``extensions`` (daphne 4.2.3 sends none); autobahn's handshake failure path,
``ConnectionDeny`` raised from ``onConnect`` (daphne's ``handshake_deferred``) ->
``WebSocketServerProtocol.failHandshake`` -> ``sendHttpErrorResponse`` + ``dropConnection``,
where daphne's protocol gets a ``sendHttpErrorResponse`` of its own that writes the headers and
body the application gave.

Why: Deepgram refuses a bad API key at the handshake with ``HTTP 401`` and a JSON body, and
Deepgram's SDKs surface exactly that (``ApiError(status_code=401)`` in deepgram-sdk); an
accepted socket that sends ``Error`` and closes 4001 never reaches a Deepgram program's 401
handling. The ASGI spec's extension ``websocket.http.response`` lets an application answer a
handshake with ``websocket.http.response.start`` (status, headers) and
``websocket.http.response.body`` (body, more_body) instead of accepting it; this module
implements it. Anything else (accept, close, send, a close before accept) goes through daphne
unchanged.
"""
from __future__ import annotations

import functools
import http
from dataclasses import dataclass, field
from typing import Any

from relay.server.patches import Patch, Target, require

#: The scope key and extension name of the ASGI spec's WebSocket Denial Response.
EXTENSION = "websocket.http.response"

PATCH = Patch(
    name="denial_response",
    purpose="refuse a WebSocket handshake with an HTTP status and body (ASGI websocket.http.response; docs/protocol.md, Credentials)",
    framework="daphne",
    targets=(
        Target("daphne", "daphne.ws_protocol", "WebSocketProtocol.handle_reply", params=("self", "message"),
               uses=("serverAccept", "serverReject", "STATE_CONNECTING")),
        Target("daphne", "daphne.ws_protocol", "WebSocketProtocol.onConnect", params=("self", "request"),
               uses=("create_application", "handshake_deferred")),
        Target("daphne", "daphne.ws_protocol", "WebSocketProtocol.serverReject", params=("self",),
               uses=("handshake_deferred", "protocol_disconnected")),
        Target("daphne", "daphne.server", "Server.create_application", params=("self", "protocol", "scope"), uses=("application",)),
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketServerProtocol.processHandshake", params=("self",),
               uses=("onConnect", "failHandshake")),
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketServerProtocol.failHandshake", params=("self", "reason", "code"),
               uses=("sendHttpErrorResponse", "dropConnection")),
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketServerProtocol.sendHttpErrorResponse",
               params=("self", "code", "reason", "responseHeaders"), uses=("sendData",)),
        Target("autobahn", "autobahn.websocket.types", "ConnectionDeny", kind="class"),
    ),
)

#: Headers the protocol writes itself; an application's own values for them are dropped.
_OWN_HEADERS = {b"content-length", b"connection", b"transfer-encoding", b"upgrade"}


@dataclass(slots=True)
class Denial:
    """The HTTP response an application is giving instead of accepting, as it arrives."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)

    @property
    def phrase(self) -> str:
        try:
            return http.HTTPStatus(self.status).phrase
        except ValueError:
            return "Denied"

    def response(self) -> bytes:
        """The whole HTTP/1.1 response: status line, the application's headers, length, body."""
        lines = [f"HTTP/1.1 {self.status} {self.phrase}".encode("latin-1")]
        lines += [bytes(name) + b": " + bytes(value) for name, value in self.headers if bytes(name).lower() not in _OWN_HEADERS]
        lines += [b"Content-Length: " + str(len(self.body)).encode(), b"Connection: close"]
        return b"\r\n".join(lines) + b"\r\n\r\n" + bytes(self.body)


def start_denial(protocol: Any, message: dict[str, Any]) -> None:
    """``websocket.http.response.start``: only before accept, and only once."""
    if protocol.state != protocol.STATE_CONNECTING or not hasattr(protocol, "handshake_deferred"):
        raise ValueError("websocket.http.response.start is only allowed before websocket.accept")
    if getattr(protocol, "relay_denial", None) is not None:
        raise ValueError("websocket.http.response.start was already sent")
    status = int(message["status"])
    if not 100 <= status <= 599 or status == 101:
        raise ValueError(f"websocket.http.response.start: {status} is not an HTTP status that denies a handshake")
    headers = [(bytes(name), bytes(value)) for name, value in message.get("headers", [])]
    for name, value in headers:
        if b"\r" in name + value or b"\n" in name + value:
            raise ValueError("websocket.http.response.start: a header contains CR or LF")
    protocol.relay_denial = Denial(status=status, headers=headers)


def add_body(protocol: Any, message: dict[str, Any]) -> bool:
    """``websocket.http.response.body``; True when it was the last part (``more_body`` false)."""
    denial: Denial | None = getattr(protocol, "relay_denial", None)
    if denial is None or not hasattr(protocol, "handshake_deferred"):
        raise ValueError("websocket.http.response.body needs a websocket.http.response.start first")
    denial.body += message.get("body", b"")
    return not message.get("more_body", False)


def deny(protocol: Any) -> None:
    """Fail the handshake through autobahn (daphne's ``serverReject``, with our status)."""
    from autobahn.websocket.types import ConnectionDeny

    denial: Denial = protocol.relay_denial
    deferred = protocol.handshake_deferred
    del protocol.handshake_deferred
    protocol.server.protocol_disconnected(protocol)
    deferred.errback(ConnectionDeny(code=denial.status, reason=denial.phrase))
    client = "%s:%s" % tuple(protocol.client_addr) if protocol.client_addr else None
    protocol.server.log_action("websocket", "rejected", {"path": protocol.request.path, "client": client})


def install() -> None:
    """Wrap handle_reply and create_application once; give daphne's protocol sendHttpErrorResponse."""
    if not require(PATCH):
        return
    from daphne.server import Server
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.handle_reply
    if getattr(original, "relay_denial_patched", False):
        return

    # wraps: a second install() (and the other patches' checks) see daphne's own handle_reply.
    @functools.wraps(original)
    def handle_reply(self, message):
        kind = message.get("type")
        if kind == "websocket.http.response.start":
            start_denial(self, message)
            return None
        if kind == "websocket.http.response.body":
            if add_body(self, message):
                deny(self)
            return None
        return original(self, message)

    handle_reply.relay_denial_patched = True
    WebSocketProtocol.handle_reply = handle_reply

    send_error = WebSocketProtocol.sendHttpErrorResponse  # autobahn's, inherited

    def sendHttpErrorResponse(self, code, reason, responseHeaders=None):
        denial: Denial | None = getattr(self, "relay_denial", None)
        if denial is None or code != denial.status:  # autobahn's own refusals (a bad handshake, daphne's 403)
            return send_error(self, code, reason, responseHeaders)
        self.sendData(denial.response())
        return None

    WebSocketProtocol.sendHttpErrorResponse = sendHttpErrorResponse

    create = Server.create_application

    @functools.wraps(create)
    def create_application(self, protocol, scope):
        if scope.get("type") == "websocket":
            scope.setdefault("extensions", {})[EXTENSION] = {}
        return create(self, protocol, scope)

    Server.create_application = create_application
