"""Stop reading a client's socket while the relay is behind it, instead of queueing its audio.

Touches: daphne ``daphne.ws_protocol.WebSocketProtocol.onMessage`` (wrapped), which puts every
parsed frame into the connection's unbounded ``asyncio.Queue``, and the instance attribute
``application_queue`` that ``applicationCreateWorked`` stores that queue in; Twisted's
``FileDescriptor`` (``pauseProducing``/``resumeProducing``, ``disconnected``/``disconnecting``).

Why: ASGI gives an application no backpressure, so when the relay falls behind a stream (an
overloaded process) that queue, not the kernel, holds the audio. While
``RELAY_MAX_INBOUND_MESSAGES`` messages wait, daphne stops reading that socket, so TCP pushes
back on the client, which holds its own audio; reading resumes once the relay has taken half of
them. Nothing is dropped. Once the connection is closing (the relay refused it, ended it, or
the client said goodbye), reading is never held back: what is left must be read for the closing
handshake to finish with close frames; a socket closed with unread data in it is reset instead.
"""
from __future__ import annotations

import weakref

from relay.ops import metrics
from relay.server.patches import Patch, Target, require

RESUME_CHECK_SECONDS = 0.02
_paused: "weakref.WeakSet[object]" = weakref.WeakSet()

PATCH = Patch(
    name="inbound_flow",
    purpose="stop reading a socket while the relay is behind it (RELAY_MAX_INBOUND_MESSAGES)",
    framework="daphne",
    targets=(
        Target("daphne", "daphne.ws_protocol", "WebSocketProtocol.onMessage", params=("self", "payload", "isBinary")),
        Target("daphne", "daphne.ws_protocol", "WebSocketProtocol.applicationCreateWorked", uses=("application_queue",)),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.pauseProducing", params=("self",)),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.resumeProducing", params=("self",)),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.disconnected", kind="value"),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.disconnecting", kind="value"),
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketProtocol.STATE_OPEN", kind="value"),
    ),
)


def paused_count() -> int:
    """Connections whose socket daphne is not reading right now."""
    return len(_paused)


def install(*, limit: int) -> None:
    """Wrap onMessage once; a later call only changes the limit (0 turns pausing off)."""
    if not require(PATCH):
        return
    from daphne.ws_protocol import WebSocketProtocol

    WebSocketProtocol.relay_inbound_limit = limit
    on_message = WebSocketProtocol.onMessage
    if getattr(on_message, "relay_patched", False):
        return

    def onMessage(self, payload, isBinary):
        on_message(self, payload, isBinary)
        limit = self.relay_inbound_limit
        queue = getattr(self, "application_queue", None)
        if limit > 0 and queue is not None and self not in _paused and self.transport is not None and hold_reading(self, queue.qsize(), limit):
            _paused.add(self)
            self.transport.pauseProducing()
            metrics.INBOUND_PAUSES.inc()
            _resume_when_drained(self, queue, limit)

    onMessage.relay_patched = True
    WebSocketProtocol.onMessage = onMessage


def hold_reading(protocol, waiting: int, limit: int) -> bool:
    """Whether to stop reading ``protocol``'s socket with ``waiting`` messages queued for the relay."""
    return waiting >= limit and protocol.state == protocol.STATE_OPEN


def resume_if_ready(protocol, waiting: int, limit: int) -> bool:
    """Read a paused socket again once the relay has caught up or the connection is closing.

    Returns True when the pause is over (resumed, or the socket is gone).
    """
    transport = protocol.transport
    if transport is None or getattr(transport, "disconnected", False) or getattr(transport, "disconnecting", False):
        _paused.discard(protocol)
        return True
    if waiting <= limit // 2 or protocol.state != protocol.STATE_OPEN:
        _paused.discard(protocol)
        transport.resumeProducing()
        return True
    return False


def _resume_when_drained(protocol, queue, limit: int) -> None:
    from twisted.internet import reactor

    def check() -> None:
        if not resume_if_ready(protocol, queue.qsize(), limit):
            reactor.callLater(RESUME_CHECK_SECONDS, check)

    reactor.callLater(RESUME_CHECK_SECONDS, check)
