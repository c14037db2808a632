"""Send a message to the client's socket at once when nothing is queued before it.

Twisted's TCP transport never writes in ``write()``: it queues the bytes, asks the reactor to
watch the socket for writability (an ``epoll_ctl`` through asyncio's ``add_writer``), sends them
when the loop next polls, and stops watching (another ``epoll_ctl``). The relay sends several
messages a second per stream (Updates, turns), so each one paid two registrations, a poll
wake-up and Twisted's buffer bookkeeping; in a profile at 300 streams that was about 5 % of the
daphne process (docs/benchmarks.md). asyncio's own transports, and the ``websockets`` server the
benchmarks compare with, try the socket first. This does the same for Twisted's TCP
connections: when the connection's buffers are empty, the bytes go to ``send()`` directly, and
whatever the kernel does not take (a full socket buffer) is queued through Twisted's own
``write()``, in order, with its producer pause and close handling unchanged. A connection that
is closing, half-closed, encrypted by Twisted's TLS, or of a class with its own
``writeSomeData`` (Unix sockets passing descriptors) keeps Twisted's path, and an aborted one
sends nothing more, as before.

Touches: ``twisted.internet.tcp.Connection.write`` (set on that class; the one it inherits is
``twisted.internet._newtls.ConnectionMixin.write``), and reads what ``FileDescriptor.write`` and
``doWrite`` keep their queue in (``dataBuffer``, ``offset``, ``_tempDataLen``) and the state
flags ``TLS``, ``connected``, ``disconnecting``, ``_writeDisconnected``, ``_writeDisconnecting``
and ``_aborting``.
"""
from __future__ import annotations

from relay.server.patches import Patch, Target, require

PATCH = Patch(
    name="direct_write",
    purpose="send to a client's socket at once when nothing is queued before it",
    framework="twisted",
    targets=(
        Target("Twisted", "twisted.internet.tcp", "Connection", kind="class"),
        Target("Twisted", "twisted.internet.tcp", "Connection.writeSomeData", params=("self", "data")),
        Target("Twisted", "twisted.internet._newtls", "ConnectionMixin.write", params=("self", "bytes"), uses=("TLS", "connected")),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.write", params=("self", "data"),
               uses=("connected", "_writeDisconnected", "_tempDataBuffer", "_tempDataLen", "startWriting")),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.doWrite", params=("self",),
               uses=("dataBuffer", "offset", "_tempDataLen", "writeSomeData", "disconnecting", "_writeDisconnecting")),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.dataBuffer", kind="value"),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.offset", kind="value"),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor.disconnecting", kind="value"),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor._writeDisconnected", kind="value"),
        Target("Twisted", "twisted.internet.abstract", "FileDescriptor._writeDisconnecting", kind="value"),
        Target("Twisted", "twisted.internet.tcp", "_AbortingMixin._aborting", kind="value"),
    ),
)


def install() -> bool:
    """Give Twisted's TCP connections the direct write (once); False without Twisted."""
    if not require(PATCH):
        return False
    from twisted.internet import tcp

    queued_write = tcp.Connection.write
    if getattr(queued_write, "relay_patched", False):
        return True
    write_some = tcp.Connection.writeSomeData

    def write(self, data: bytes) -> None:
        if (
            data
            and type(data) is bytes
            and not self.TLS
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._writeDisconnecting
            and not self._aborting
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
            and type(self).writeSomeData is write_some
        ):
            sent = write_some(self, data)  # at most SEND_LIMIT bytes; 0 when the socket is full
            if type(sent) is int and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
            # An error (ConnectionLost) is left for Twisted's queued write to find and report.
        queued_write(self, data)

    write.relay_patched = True  # type: ignore[attr-defined]
    write.relay_queued_write = queued_write  # type: ignore[attr-defined]
    tcp.Connection.write = write
    return True
