"""Drop a client that reads nothing before daphne buffers its replies without bound.

Touches: daphne ``daphne.ws_protocol.WebSocketProtocol.serverSend`` (wrapped), which writes
every ``websocket.send`` into the Twisted transport; autobahn's
``WebSocketProtocol.dropConnection``; and Twisted's ``FileDescriptor`` write buffer
(``dataBuffer``, ``offset``, ``_tempDataLen``), read to measure what is queued.

Why: ASGI gives an application no backpressure and daphne pings only idle clients, so a client
that sends audio and reads nothing grows its transport buffer for as long as it stays. Past
``RELAY_MAX_SEND_BUFFER_BYTES`` the connection is dropped; the consumer sees a disconnect and
stores the open turn as usual.
"""
from __future__ import annotations


from relay.ops.logs import get_logger
from relay.server.patches import Patch, Target, require

log = get_logger("relay.consumer")

PATCH = Patch(
    name="send_limit",
    purpose="cap what daphne buffers for a client that reads nothing (RELAY_MAX_SEND_BUFFER_BYTES)",
    framework="daphne",
    targets=(
        Target("daphne", "daphne.ws_protocol", "WebSocketProtocol.serverSend", params=("self", "content", "binary")),
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketProtocol.dropConnection", params=("self", "abort")),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.dataBuffer", kind="value"),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.offset", kind="value"),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.__init__", uses=("_tempDataLen",)),
    ),
)


def install(*, limit_bytes: int) -> None:
    """Wrap serverSend once; a later call only changes the limit, which is read per send."""
    if not require(PATCH):
        return
    from daphne.ws_protocol import WebSocketProtocol

    WebSocketProtocol.relay_send_limit = limit_bytes
    server_send = WebSocketProtocol.serverSend
    if getattr(server_send, "relay_patched", False):
        return

    def serverSend(self, content, binary=False):
        transport = self.transport
        pending = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
        if pending > self.relay_send_limit:
            log.warning("slow_client_dropped", client=self.client_addr, pending_bytes=pending)
            self.dropConnection(abort=True)
            return None
        return server_send(self, content, binary)

    serverSend.relay_patched = True
    WebSocketProtocol.serverSend = serverSend
