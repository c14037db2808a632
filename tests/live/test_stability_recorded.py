"""The stability metrics' inputs, recorded by a real daphne process from real clients.

Reconnection time is paired per client: a drop (no close frame) resumed 300 ms later reads about
300 ms plus the resume; a clean close, or a return long after, adds nothing. Refused attempts are
counted per code; the process is listed from its start, before any stream.
"""
from __future__ import annotations

import asyncio
import re
import sqlite3
import time
import urllib.request

import pytest
import websockets

from tests.support.audio import tone
from tests.support.live import LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]


async def hello(ws) -> dict:
    import json

    return json.loads(await ws.recv())


async def speak_and_drop(url: str, *, gone_for: float) -> str:
    """Stream a little, drop the TCP connection without a close frame, come back ``gone_for`` later."""
    ws = await websockets.connect(url)
    first = await hello(ws)
    audio = tone(0.3)
    for i in range(0, len(audio), 2560):
        await ws.send(audio[i : i + 2560])
    await asyncio.sleep(0.2)
    ws.transport.abort()
    await asyncio.sleep(gone_for)
    return first["connection_id"]


def rows(db_path: str, sql: str, *args) -> list[tuple]:
    db = sqlite3.connect(db_path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_reconnection_time_refusals_and_an_idle_process_as_recorded(tmp_path):
    env = {**sqlite_env(tmp_path), "RELAY_HEARTBEAT_SECONDS": "1", "RELAY_CONNECTS_PER_MINUTE": "30"}
    db = env["DATABASE_URL"].removeprefix("sqlite:///")
    with LiveServer(env) as server:
        # Listed from its start: no WebSocket has connected yet.
        wait_until(lambda: rows(db, "select count(*) from relay_relayprocess where stopped_at is null")[0][0] == 1)
        base = server.ws_url + "/v2/listen"

        async def scenario() -> tuple[str, str, str]:
            # 1. named pairing: the client says which connection it resumes
            old = await speak_and_drop(f"{base}?session=named", gone_for=0.3)
            ws = await websockets.connect(f"{base}?session=named&since=-1&previous_connection={old}")
            await hello(ws)
            await ws.close()
            # 2. the same client resuming with since=, without naming it
            old2 = await speak_and_drop(f"{base}?session=same-client", gone_for=0.3)
            ws = await websockets.connect(f"{base}?session=same-client&since=-1")
            await hello(ws)
            await ws.close()
            # 3. a clean close, then a new connection: a revisit, not a reconnect
            ws = await websockets.connect(f"{base}?session=revisit")
            await hello(ws)
            await ws.close()
            ws = await websockets.connect(f"{base}?session=revisit&since=-1")
            await hello(ws)
            await ws.close()
            # 4. a drop whose client came back an hour later
            old4 = await speak_and_drop(f"{base}?session=late", gone_for=0.1)
            return old, old2, old4

        old, old2, old4 = asyncio.run(scenario())
        wait_until(lambda: rows(db, "select count(*) from relay_connection where closed_at is null")[0][0] == 0)
        db_conn = sqlite3.connect(db)  # the drop of `late` is recorded; now it happened an hour ago
        moved = db_conn.execute("update relay_connection set last_frame_at = datetime(last_frame_at, '-1 hour'), closed_at = datetime(closed_at, '-1 hour') where id = ?", (old4.replace("-", ""),))
        assert moved.rowcount == 1
        db_conn.commit()
        db_conn.close()

        async def late_return() -> None:
            ws = await websockets.connect(f"{base}?session=late&since=-1&previous_connection={old4}")
            await hello(ws)
            await ws.close()

        asyncio.run(late_return())

        async def refused(query: str) -> int:
            async with websockets.connect(f"{base}?{query}") as ws:
                try:
                    while True:
                        await ws.recv()
                except websockets.ConnectionClosed as closed:
                    return closed.rcvd.code if closed.rcvd else 0

        assert asyncio.run(refused("session=bad%20id")) == 4008  # INVALID_SESSION
        assert asyncio.run(refused("eot_threshold=3")) == 4008  # INVALID_PARAMETER
        wait_until(lambda: rows(db, "select coalesce(sum(count), 0) from relay_refusal")[0][0] >= 2)
        refusals = dict(rows(db, "select code, sum(count) from relay_refusal group by code"))
        scrape = urllib.request.urlopen(server.http_url + "/metrics", timeout=10).read().decode()
        observed = float(re.search(r"^relay_reconnection_gap_seconds_count ([0-9.e+]+)$", scrape, re.M).group(1))

    gaps = dict(rows(db, "select replace(id, '-', ''), resumed_after_seconds from relay_connection where resumed_after_seconds is not null"))
    named, same = gaps.pop(old.replace("-", "")), gaps.pop(old2.replace("-", ""))
    assert 0.3 <= named < 1.0 and 0.3 <= same < 1.0, (named, same)  # the 300 ms away plus the resume
    assert gaps == {}, gaps  # the revisit after a clean close and the return an hour later add nothing
    assert observed == 2  # /metrics saw the same two pairings, whichever side recorded them
    assert refusals == {"INVALID_SESSION": 1, "INVALID_PARAMETER": 1}, refusals
