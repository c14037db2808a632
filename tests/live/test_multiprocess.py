"""Two daphne processes sharing real Redis (channels-redis) and real PostgreSQL."""
from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from tests.support.audio import chunks, silence, tone
from tests.support.live import LiveServer
from tests.support.services import REDIS_URL, postgres_database

pytestmark = [pytest.mark.slow, pytest.mark.live, pytest.mark.redis, pytest.mark.postgres]


class Tab:
    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[dict] = []

    async def open(self) -> dict:
        self.ws = await websockets.connect(self.url, max_size=None)
        hello = json.loads(await self.ws.recv())
        self.messages.append(hello)
        self.task = asyncio.create_task(self._read())
        return hello

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.messages.append(json.loads(raw))
        except websockets.ConnectionClosed:
            pass

    async def wait_for(self, pred, timeout: float = 20) -> dict:
        async def loop():
            while True:
                for m in self.messages:
                    if pred(m):
                        return m
                await asyncio.sleep(0.01)
        return await asyncio.wait_for(loop(), timeout)

    def finals(self) -> list[dict]:
        return [m for m in self.messages if m.get("event") == "EndOfTurn"]

    async def speak(self, audio: bytes) -> None:
        for chunk in chunks(audio):
            await self.ws.send(chunk)

    def abort(self) -> None:
        """Drop the TCP connection with no close frame (a network failure)."""
        self.ws.transport.abort()
        self.task.cancel()

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()


async def scenario(p1: LiveServer, p2: LiveServer) -> None:
    sid = "mp-" + p1.ws_url[-5:]
    a = Tab(f"{p1.ws_url}/v2/listen?session={sid}&relay_events=presence,history")
    b = Tab(f"{p2.ws_url}/v2/listen?session={sid}&relay_events=presence,history")
    ha = await a.open()
    hb = await b.open()
    assert hb["resumed"] is True
    await a.wait_for(lambda m: m.get("type") == "Presence" and m["connection_id"] == hb["connection_id"])

    # A speaks on process 1: B on process 2 sees the Updates and the EndOfTurn live.
    await a.speak(tone(0.75) + silence(0.7))
    end_b = await b.wait_for(lambda m: m.get("event") == "EndOfTurn" and m["speaker"] == ha["connection_id"])
    assert end_b["transcript"] == "one two three" and end_b["turn_index"] == 0 and "replayed" not in end_b
    assert any(m.get("event") == "Update" and m["speaker"] == ha["connection_id"] for m in b.messages)
    # B speaks on process 2: A sees it.
    await b.speak(tone(0.5) + silence(0.7))
    end_a = await a.wait_for(lambda m: m.get("event") == "EndOfTurn" and m["speaker"] == hb["connection_id"])
    assert end_a["turn_index"] == 1 and end_a["transcript"] == "one two"

    # A drops abruptly mid-turn, then reconnects to process 2 with since= its last index.
    last_seen = max(m["turn_index"] for m in a.finals())
    await a.speak(tone(1.0))
    await a.wait_for(lambda m: m.get("event") == "Update" and m["turn_index"] == 2 and m["transcript"] == "one two three four")
    a.abort()
    a2 = Tab(f"{p2.ws_url}/v2/listen?session={sid}&since={last_seen}")
    h2 = await a2.open()
    assert h2["resumed"] is True
    got = await a2.wait_for(lambda m: m.get("event") == "EndOfTurn" and m["turn_index"] == 2)
    assert got["transcript"] == "one two three four" and got["trigger"] == "end_of_stream"
    assert got["speaker"] == ha["connection_id"]
    # B saw the flushed turn too, and nobody got a duplicate.
    await b.wait_for(lambda m: m.get("event") == "EndOfTurn" and m["turn_index"] == 2)
    await a2.speak(tone(0.25) + silence(0.7))
    await b.wait_for(lambda m: m.get("event") == "EndOfTurn" and m["turn_index"] == 3)
    await a2.wait_for(lambda m: m.get("event") == "EndOfTurn" and m["turn_index"] == 3)
    assert [m["turn_index"] for m in a2.finals()] == [2, 3]
    assert [m["turn_index"] for m in b.finals()] == [0, 1, 2, 3]
    await a2.close()
    await b.close()


def test_two_processes_share_sessions_through_redis_and_postgres():
    with postgres_database() as db_url:
        env = {"DATABASE_URL": db_url, "REDIS_URL": REDIS_URL, "RELAY_ENGINE": "fake"}
        with LiveServer(env, log_name="p1") as p1, LiveServer(env, log_name="p2") as p2:
            try:
                asyncio.run(asyncio.wait_for(scenario(p1, p2), 90))
            except BaseException:
                print("--- p1 ---\n" + p1.output()[-4000:] + "\n--- p2 ---\n" + p2.output()[-4000:])
                raise
