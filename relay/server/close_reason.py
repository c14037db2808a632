"""Send the close reason the application gives, so a client reads the error code from the close.

Touches: daphne ``daphne.ws_protocol.WebSocketProtocol.handle_reply`` (wrapped), which turns a
``websocket.close`` message into ``serverClose(code=...)`` and drops its ``reason``; autobahn's
``WebSocketProtocol.sendClose(code, reason)``, which writes the reason into the close frame,
truncated to the protocol's 123 bytes at a UTF-8 character boundary.

Why: docs/protocol.md promises that a stream ended by an error closes with its 4xxx code *and*
the error code as the reason (``RATE_LIMITED``, ``INVALID_SESSION``...), as ASGI's
``websocket.close`` allows; daphne 4.2.3 sends every close with an empty reason. Only a close of
an accepted socket that carries a reason is handled here; everything else (a refusal before
accept, a close without a reason, sends) goes through daphne unchanged.
"""
from __future__ import annotations

import functools

from relay.server.patches import Patch, Target, require

#: RFC 6455 5.5: a control frame's payload is at most 125 bytes, two of them the close code.
MAX_REASON_BYTES = 123

PATCH = Patch(
    name="close_reason",
    purpose="send the error code as the WebSocket close reason (docs/protocol.md)",
    framework="daphne",
    targets=(
        Target("daphne", "daphne.ws_protocol", "WebSocketProtocol.handle_reply", params=("self", "message"), uses=("serverClose", "serverReject", "STATE_CONNECTING")),
        Target("daphne", "daphne.ws_protocol", "WebSocketProtocol.serverClose", params=("self", "code"), uses=("sendClose",)),
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketProtocol.sendClose", params=("self", "code", "reason")),
    ),
)


def truncate_reason(reason: str) -> str:
    """At most MAX_REASON_BYTES of UTF-8, cut at a character boundary."""
    return reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", errors="ignore")


def install() -> None:
    """Wrap handle_reply once."""
    if not require(PATCH):
        return
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.handle_reply
    if getattr(original, "relay_patched", False):
        return

    # wraps: a second install() checks daphne's own handle_reply (inspect.unwrap), not this one.
    @functools.wraps(original)
    def handle_reply(self, message):
        reason = message.get("reason")
        if message.get("type") == "websocket.close" and reason and self.state != self.STATE_CONNECTING:
            code = message.get("code")
            self.sendClose(code=1000 if code is None else code, reason=truncate_reason(str(reason)))
            return None
        return original(self, message)

    handle_reply.relay_patched = True
    WebSocketProtocol.handle_reply = handle_reply
