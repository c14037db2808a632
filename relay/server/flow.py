"""Flow control for daphne's WebSockets, in both directions.

ASGI gives an application no backpressure, so daphne buffers without bound on its own:

* **Outgoing**: daphne writes every message into the Twisted transport, whose buffer grows for as
  long as a client sends audio and reads nothing (daphne pings only idle clients). Past
  ``RELAY_MAX_SEND_BUFFER_BYTES`` the connection is dropped; the consumer sees a disconnect and
  stores the open turn as usual.
* **Incoming**: daphne puts every frame it parses into the connection's unbounded
  ``asyncio.Queue``. When the relay falls behind a stream (an overloaded process), that queue,
  not the kernel, holds the audio. While ``RELAY_MAX_INBOUND_MESSAGES`` messages wait, daphne
  stops reading that socket (``pauseProducing``), so TCP pushes back on the client, which holds
  its own audio; reading resumes once the relay has taken half of them. Nothing is dropped.
"""
from __future__ import annotations

import logging
import weakref

from relay.ops import metrics

log = logging.getLogger("relay.consumer")

RESUME_CHECK_SECONDS = 0.02
_paused: "weakref.WeakSet[object]" = weakref.WeakSet()


def paused_count() -> int:
    """Connections whose socket daphne is not reading right now."""
    return len(_paused)


def install(*, send_limit_bytes: int, inbound_limit: int) -> None:
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # not under daphne
        return
    installed = getattr(WebSocketProtocol, "relay_flow", None) is not None
    WebSocketProtocol.relay_flow = (send_limit_bytes, inbound_limit)  # read per call: a reinstall updates the limits
    if installed:
        return
    server_send = WebSocketProtocol.serverSend
    on_message = WebSocketProtocol.onMessage

    def serverSend(self, content, binary=False):
        transport = self.transport
        pending = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
        if pending > self.relay_flow[0]:
            log.warning("slow_client_dropped client=%s pending_bytes=%d", self.client_addr, pending)
            self.dropConnection(abort=True)
            return None
        return server_send(self, content, binary)

    def onMessage(self, payload, isBinary):
        on_message(self, payload, isBinary)
        limit = self.relay_flow[1]
        queue = getattr(self, "application_queue", None)
        if limit > 0 and queue is not None and queue.qsize() >= limit and self not in _paused and self.transport is not None:
            _paused.add(self)
            self.transport.pauseProducing()
            metrics.INBOUND_PAUSES.inc()
            _resume_when_drained(self, queue, limit)

    WebSocketProtocol.serverSend = serverSend
    WebSocketProtocol.onMessage = onMessage


def _resume_when_drained(protocol, queue, limit: int) -> None:
    from twisted.internet import reactor

    def check() -> None:
        transport = protocol.transport
        if transport is None or getattr(transport, "disconnected", False) or getattr(transport, "disconnecting", False):
            _paused.discard(protocol)
            return
        if queue.qsize() <= limit // 2:
            _paused.discard(protocol)
            transport.resumeProducing()
            return
        reactor.callLater(RESUME_CHECK_SECONDS, check)

    reactor.callLater(RESUME_CHECK_SECONDS, check)
