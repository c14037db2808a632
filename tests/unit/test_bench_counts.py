"""What the benchmarks count: the load client's errors (bench/wsload.py), a connection that fails
counted once, under what failed it, so a benchmark's error figure is the number of failed
connections; and nginx's error log by kind of entry (bench/stack.py), so a deployed run says
which failure its errors were."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest

from bench.stack import log_problems, resets
from bench.wsload import Run, open_conn

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


async def _serve(answer):
    """A TCP server that reads one HTTP request and answers with ``answer(request)`` bytes, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(request))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _bad_gateway(request: bytes) -> bytes:
    return b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _upgrade_then_error(code: str):
    def answer(request: bytes) -> bytes:
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key"))
        accept = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
        body = json.dumps({"type": "Error", "code": code, "description": "test"}).encode()
        frame = bytes([0x81, len(body)]) + body  # one unmasked text frame (server to client), under 126 bytes
        return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                + b"\r\n\r\n" + frame + bytes([0x88, 0x02, 0x0F, 0xA1]))  # then a close frame, 4001
    return answer


@pytest.mark.parametrize("answer,errors,refused", [
    (_bad_gateway, {"http_502": 1}, 0),
    (_upgrade_then_error("UNAUTHORIZED"), {"error_UNAUTHORIZED": 1}, 0),
    (_upgrade_then_error("CAPACITY"), {}, 1),
])
async def test_a_failed_connection_is_counted_once(answer, errors, refused):
    server, port = await _serve(answer)
    run = Run({})
    try:
        with pytest.raises(OSError):  # ConnectionError, ConnectionRefusedError
            await open_conn(run, "127.0.0.1", port, "/v2/listen", timeout=5)
        await asyncio.sleep(0.05)
    finally:
        server.close()
        await server.wait_closed()
    assert run.errors == errors and run.refused == refused


async def test_a_server_that_is_not_there_is_counted_once():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    run = Run({})
    with pytest.raises(OSError):
        await open_conn(run, "127.0.0.1", port, "/v2/listen", timeout=5)
    assert sum(run.errors.values()) == 1, run.errors


def test_nginx_error_log_entries_are_counted_by_kind():
    log = (
        '2026/12/03 19:30:01 [error] 1234#1234: *5678 upstream timed out (110: Connection timed out) while connecting to upstream, '
        'client: 127.0.0.1, server: _, request: "GET /v2/listen HTTP/1.1", upstream: "http://127.0.0.1:8001/v2/listen"\n'
        "2026/12/03 19:30:01 [error] 1234#1234: *5679 no live upstreams while connecting to upstream, client: 127.0.0.1, server: _\n"
        "2026/12/03 19:30:02 [error] 1234#1235: *6001 no live upstreams while connecting to upstream, client: 127.0.0.2, server: _\n"
        "2026/12/03 19:30:02 [error] 1234#1235: *6002 recv() failed (104: Connection reset by peer) while reading response header from "
        "upstream, client: 127.0.0.2, server: _\n"
        "2026/12/03 19:30:03 [alert] 1234#1234: 1024 worker_connections are not enough\n"
        "2026/12/03 19:30:04 [notice] 1234#1234: signal process started\n"
    )
    problems = log_problems(log)
    assert problems == {
        "[error] upstream timed out (Connection timed out) while connecting to upstream": 1,
        "[error] no live upstreams while connecting to upstream": 2,
        "[error] recv() failed (Connection reset by peer) while reading response header from upstream": 1,
        "[alert] N worker_connections are not enough": 1,
    }
    assert resets(problems) == 1
