"""Clients that go away are normal closes: no traceback, no error counted (a real daphne process).

Load balancers' health checks connect and leave at once; a thousand laptops closing at the same
moment leave open turns behind. Neither is an error of the relay's.
"""
from __future__ import annotations

import asyncio
import re
import sqlite3
import urllib.request

import pytest
import websockets

from tests.support.audio import tone
from tests.support.deploy_stack import wait_until
from tests.support.live import LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]

CLIENTS = 1000


def error_counts(server: LiveServer) -> dict[str, float]:
    text = urllib.request.urlopen(server.http_url + "/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^relay_errors_total\{code="([A-Z_]+)"\} ([0-9.e+]+)$', text, re.M)}


async def connect_and_leave(url: str, n: int, concurrency: int = 100) -> int:
    """Open the WebSocket and drop the TCP connection at once, without reading Connected."""
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one() -> None:
        nonlocal done
        async with gate:
            ws = await websockets.connect(url, open_timeout=30, max_queue=None)
            ws.transport.abort()  # no close frame: the relay's Connected goes to a closed socket
            done += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return done


async def stream_then_hang_up_together(url: str, n: int) -> int:
    """``n`` clients each with an open turn, all dropping their connection in the same instant."""
    sockets = []
    for start in range(0, n, 100):
        batch = await asyncio.gather(*(websockets.connect(f"{url}?session=hang-{i}", open_timeout=30) for i in range(start, min(n, start + 100))))
        sockets += batch
    audio = tone(0.5)
    for i in range(0, len(audio), 2560):
        await asyncio.gather(*(ws.send(audio[i : i + 2560]) for ws in sockets))
    await asyncio.sleep(0.5)  # the fake engine has opened every turn
    for ws in sockets:
        ws.transport.abort()
    return len(sockets)


def test_a_thousand_clients_that_leave_at_once_are_normal_closes(tmp_path):
    # The count cap is the process default (1,000): the second wave fits only once every
    # connection of the first has been released, which the wait between the waves checks.
    env = {**sqlite_env(tmp_path), "RELAY_CONNECTS_PER_MINUTE": "0", "RELAY_MAX_LOOP_LAG_MS": "0", "RELAY_MAX_WRITE_LATENCY_MS": "0"}
    with LiveServer(env) as server:
        url = server.ws_url + "/v2/listen"
        db = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite:///"))

        def wait_settled(rows: int) -> None:
            # Every connection recorded and closed, every open turn stored. The handshake is
            # accepted before the connection's row is written, so a client can be gone before its
            # row exists: the rows are counted too, not only the open ones.
            wait_until(lambda: db.execute("select count(*), count(*) - count(closed_at) from relay_connection").fetchone() == (rows, 0),
                       timeout=60, what=f"{rows} connection rows, all closed")

        assert asyncio.run(connect_and_leave(url, CLIENTS)) == CLIENTS
        wait_settled(CLIENTS)
        assert asyncio.run(stream_then_hang_up_together(url, CLIENTS)) == CLIENTS
        wait_settled(2 * CLIENTS)
        errors = error_counts(server)
        log = server.output()
    assert not errors or set(errors.values()) == {0.0}, errors
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]
    assert "engine_failed" not in log and "stream_error" not in log
    rows = db.execute("select count(*), sum(error_count) from relay_connection").fetchone()
    assert rows == (2 * CLIENTS, 0), rows
    assert db.execute("select count(*) from relay_turn where session_id like 'hang-%'").fetchone()[0] == CLIENTS
