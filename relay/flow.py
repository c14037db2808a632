"""Bound what daphne queues for a WebSocket client that does not read.

ASGI gives an application no backpressure: daphne writes every message into the Twisted
transport, whose buffer grows for as long as the client sends audio and reads nothing (daphne
pings only idle clients). Past RELAY_MAX_SEND_BUFFER_BYTES the connection is dropped; the
consumer sees a disconnect and stores the open turn as usual.
"""
from __future__ import annotations

import logging

log = logging.getLogger("relay.consumer")


def install(limit_bytes: int) -> None:
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # not under daphne
        return
    original = WebSocketProtocol.serverSend
    if getattr(original, "relay_limit", None) is not None:
        return

    def serverSend(self, content, binary=False):
        transport = self.transport
        pending = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
        if pending > limit_bytes:
            log.warning("slow_client_dropped client=%s pending_bytes=%d", self.client_addr, pending)
            self.dropConnection(abort=True)
            return None
        return original(self, content, binary)

    serverSend.relay_limit = limit_bytes
    WebSocketProtocol.serverSend = serverSend
