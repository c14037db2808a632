"""End a finished closing handshake with FIN, not with a TCP reset.

Touches: autobahn ``autobahn.websocket.protocol.WebSocketProtocol.dropConnection`` (wrapped) and
the ``wasClean`` flag autobahn sets when the peer's close frame arrives; Twisted's
``ITCPTransport.abortConnection`` / ``loseConnection`` behind it.

Why: when the relay closes a stream (a refusal such as ``CAPACITY``, an error, the reply to
``CloseStream``), autobahn 26 sends the close frame, reads the client's close reply and then, as
a server, drops the TCP connection with ``abort=True``. Twisted aborts by closing the socket with
``SO_LINGER`` set to zero, which sends a reset instead of FIN. Behind nginx every such close
shows up as ``recv() failed (104: Connection reset by peer) while proxying upgraded connection``
whenever nginx reads the upstream before it closes its own side (issue 15, at 1,000 streams),
and a client reading past the close frame sees ``ECONNRESET``. After a *clean* closing handshake
(both close frames exchanged) there is nothing to abort: the connection is closed in order (what
remains in the write buffer goes out, then FIN). Unclean drops (a close handshake that timed out,
a ping timeout, a client that reads nothing) still abort; and an orderly close that has not
finished within :data:`FLUSH_SECONDS` (a peer that stopped reading) is aborted then.
"""
from __future__ import annotations

import functools

from relay.server.patches import Patch, Target, require

#: How long an orderly close may take to flush before the socket is aborted after all.
FLUSH_SECONDS = 5.0

PATCH = Patch(
    name="clean_close",
    purpose="end a finished WebSocket closing handshake with FIN instead of a TCP reset",
    framework="autobahn",
    targets=(
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketProtocol.dropConnection", params=("self", "abort"),
               uses=("_closeConnection", "state", "STATE_CLOSED")),
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketProtocol.onCloseFrame", params=("self", "code", "reasonRaw"),
               uses=("wasClean", "dropConnection", "isServer")),
        Target("Twisted", "twisted.internet.tcp", "_SocketCloser._closeSocket", params=("self", "orderly"), uses=("SO_LINGER",)),
        Target("Twisted", "twisted.internet.tcp", "_AbortingMixin.abortConnection"),
    ),
)


def should_abort(protocol, abort: bool) -> bool:
    """Whether to drop ``protocol``'s connection with a reset: when asked to, unless the server's
    closing handshake finished cleanly."""
    return abort and not (protocol.wasClean and protocol.factory.isServer)


def install() -> None:
    """Wrap dropConnection once."""
    if not require(PATCH):
        return
    from autobahn.websocket.protocol import WebSocketProtocol

    drop = WebSocketProtocol.dropConnection
    if getattr(drop, "relay_patched", False):
        return

    # wraps: a second install() checks autobahn's own dropConnection (inspect.unwrap), not this one.
    @functools.wraps(drop)
    def dropConnection(self, abort: bool = False) -> None:
        if not abort or should_abort(self, abort):
            return drop(self, abort)
        drop(self, False)  # FIN after what is still buffered
        transport = self.transport
        if transport is not None and hasattr(transport, "abortConnection"):
            from twisted.internet import reactor

            def abort_if_stuck() -> None:
                if transport.connected and not transport.disconnected:
                    transport.abortConnection()

            reactor.callLater(FLUSH_SECONDS, abort_if_stuck)

    dropConnection.relay_patched = True
    WebSocketProtocol.dropConnection = dropConnection
