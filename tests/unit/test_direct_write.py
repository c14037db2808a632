"""relay/server/direct_write.py: Twisted's TCP transport sends at once when nothing is queued,
queues the rest in order, and keeps its own path while closing or encrypting."""
from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp

from relay.server import direct_write


class Reactor:
    """Records what a transport asks of the reactor."""

    def __init__(self) -> None:
        self.writers: list[object] = []

    def addWriter(self, selectable) -> None:
        if selectable not in self.writers:  # as the real reactors: watching twice is watching once
            self.writers.append(selectable)

    def removeWriter(self, selectable) -> None:
        if selectable in self.writers:
            self.writers.remove(selectable)

    def addReader(self, selectable) -> None:
        pass

    def removeReader(self, selectable) -> None:
        pass


@pytest.fixture
def pair():
    assert direct_write.install() and direct_write.install()  # transcription_site.asgi installs it too
    assert tcp.Connection.write.relay_patched
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reactor = Reactor()
    conn = tcp.Connection(ours, protocol=None, reactor=reactor)
    conn.connected = 1
    peer.setblocking(False)
    yield conn, peer, reactor
    ours.close()
    peer.close()


def _read_all(peer: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_a_message_goes_out_in_the_write_call_without_asking_the_reactor(pair):
    conn, peer, reactor = pair
    conn.write(b"hello")
    conn.write(b" world")
    assert _read_all(peer) == b"hello world"
    assert reactor.writers == [] and conn._tempDataLen == 0 and conn.dataBuffer == b""


def test_what_the_socket_does_not_take_is_queued_and_later_writes_keep_their_order(pair):
    conn, peer, reactor = pair
    big = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers take
    conn.write(big)
    assert reactor.writers == [conn]  # the rest waits for writability, as Twisted does
    queued = conn._tempDataLen
    assert 0 < queued < len(big)
    conn.write(b"after")  # something is queued: this must not overtake it
    assert conn._tempDataLen == queued + 5
    received = b""
    while conn._tempDataLen or conn.offset < len(conn.dataBuffer):
        received += _read_all(peer)
        conn.doWrite()
    received += _read_all(peer)
    assert received == big + b"after"
    assert reactor.writers == []  # doWrite stopped watching once empty
    conn.write(b"again")  # empty again: direct
    assert _read_all(peer) == b"again" and reactor.writers == []


@pytest.mark.parametrize("state", ["disconnecting", "_writeDisconnecting", "_aborting", "TLS"])
def test_closing_aborted_or_encrypted_connections_keep_twisteds_queue(pair, monkeypatch, state):
    conn, peer, reactor = pair
    if state == "TLS":
        # Twisted's TLS write hands the bytes to the TLS protocol, never to the socket directly.
        handed: list[bytes] = []
        monkeypatch.setattr(conn, "protocol", type("TLSProtocol", (), {"write": lambda self, b: handed.append(b)})(), raising=False)
        conn.TLS = True
        conn.write(b"secret")
        assert handed == [b"secret"] and _read_all(peer) == b""
        return
    setattr(conn, state, True)
    conn.write(b"late")
    assert _read_all(peer) == b"" and conn._tempDataLen == 4 and reactor.writers == [conn]


def test_a_lost_socket_is_left_for_twisted_to_report(pair):
    conn, peer, reactor = pair
    peer.close()
    conn.write(b"x" * 10)  # EPIPE or ECONNRESET on send: queued, and doWrite reports it
    conn.write(b"y")
    assert conn._tempDataLen in (1, 11) and reactor.writers == [conn]
    result = conn.doWrite()
    assert isinstance(result, Exception)
