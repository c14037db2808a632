"""A stream the relay closes ends its TCP connection with FIN, never a reset (a real daphne process).

Issue 15: behind nginx, every CAPACITY refusal at 1,000 streams was logged as ``recv() failed
(104: Connection reset by peer) while proxying upgraded connection``. autobahn drops a server's
connection with an abort once the client has answered its close frame, and Twisted aborts with
SO_LINGER 0: a reset, after a clean closing handshake. A raw socket sees it directly: after its
close reply, reading the socket ends with end-of-file (FIN) or with ECONNRESET (reset).
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct

import pytest
import websockets

from tests.support.audio import tone
from tests.support.live import LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]

QUERY = "encoding=linear16&sample_rate=16000"


def client_frame(payload: bytes, opcode: int) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack(">H", size))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawClient:
    """Just enough RFC 6455 over a blocking socket to see how the server ends the TCP connection."""

    def __init__(self, port: int, query: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET /v2/listen?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        status, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 101"), status
        self.buf = bytearray(rest)
        self.texts: list[dict] = []

    def until_close(self) -> tuple[int, str]:
        """Read frames until the server's close frame; its code and reason."""
        while True:
            while len(self.buf) >= 2:
                size, pos = self.buf[1] & 0x7F, 2
                if size == 126:
                    size, pos = struct.unpack(">H", self.buf[2:4])[0], 4
                if len(self.buf) < pos + size:
                    break
                opcode, payload = self.buf[0] & 0x0F, bytes(self.buf[pos:pos + size])
                del self.buf[:pos + size]
                if opcode == 1:
                    self.texts.append(json.loads(payload))
                elif opcode == 8:
                    return struct.unpack(">H", payload[:2])[0], payload[2:].decode()
            data = self.sock.recv(65536)
            assert data, "the server closed the TCP connection without a close frame"
            self.buf += data

    def reply_close_and_read_end(self, code: int) -> str:
        """Answer the close frame, then read to the end: "FIN" or "RST"."""
        self.sock.sendall(client_frame(struct.pack(">H", code), 8))
        try:
            while self.sock.recv(65536):
                pass
            return "FIN"
        except ConnectionResetError:
            return "RST"
        finally:
            self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer({**sqlite_env(tmp_path_factory.mktemp("clean-close")), "RELAY_MAX_STREAMS_PER_PROCESS": "1"}) as live:
        yield live


async def test_a_capacity_refusal_ends_with_a_close_frame_and_fin(server):
    async with websockets.connect(f"{server.ws_url}/v2/listen?{QUERY}") as first:  # takes the one stream this process admits
        assert json.loads(await first.recv())["type"] == "Connected"
        endings = []
        for _ in range(3):
            refused = RawClient(server.port, QUERY)
            code, reason = refused.until_close()
            assert (code, reason) == (4013, "CAPACITY") and refused.texts[-1]["code"] == "CAPACITY"
            endings.append(refused.reply_close_and_read_end(code))
        assert endings == ["FIN"] * 3


def test_a_stream_ended_by_closestream_ends_with_fin(server):
    client = RawClient(server.port, QUERY)
    client.sock.sendall(client_frame(tone(0.5), 2) + client_frame(b'{"type":"CloseStream"}', 1))
    code, _ = client.until_close()
    assert code == 1000 and client.texts[0]["type"] == "Connected"
    assert client.reply_close_and_read_end(code) == "FIN"
