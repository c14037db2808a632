"""The upstream socket loop (relay.engines.upstream.connection) with a fake socket: no server, no timing."""
from __future__ import annotations

import asyncio

from relay.engines.base import StreamOptions
from relay.engines.upstream.connection import Link
from relay.engines.upstream.deepgram import DeepgramEngine
from relay.engines.upstream.stream import UpstreamStream


class FakeSocket:
    """Records what the writer sends; never blocks."""

    def __init__(self) -> None:
        self.sent: list[bytes | str] = []

    async def send(self, item: bytes | str) -> None:
        self.sent.append(item)


def writer_stream() -> UpstreamStream:
    # A keepalive interval no test waits out: a writer that misses its cancel sleeps that long.
    engine = DeepgramEngine("deepgram-test", {"url": "ws://127.0.0.1:9/v2/listen", "api_key": "k", "keepalive_seconds": 3600.0})
    return UpstreamStream(engine, StreamOptions())


async def settle(task: asyncio.Task, rounds: int = 20) -> None:
    """Let the loop run ``rounds`` iterations, or until ``task`` ends."""
    for _ in range(rounds):
        if task.done():
            return
        await asyncio.sleep(0)


async def test_writer_cancelled_as_audio_arrives_ends_at_once():
    """A cancel that lands in the same loop iteration as a wake-up must not be lost.

    On Python 3.11 ``asyncio.wait_for`` returns the inner result instead of raising when the
    outer task is cancelled while the inner future completes; the writer then slept until the
    next keepalive, and every drop, stall or refused key took that long to reach the client.
    """
    stream = writer_stream()
    ws = FakeSocket()
    link = Link(ws=ws, start=0, offset=0.0, opened_at=0.0)  # type: ignore[arg-type]
    stream._link = link
    writer = asyncio.get_running_loop().create_task(stream._write(link))
    await settle(writer, 5)
    assert not writer.done()  # idle, waiting for audio or the keepalive

    stream.feed(bytes(2560))  # an audio frame wakes the writer...
    writer.cancel()  # the same iteration, as _serve's clean-up does when a reader fails
    await settle(writer)
    try:
        assert writer.done() and writer.cancelled(), "the writer swallowed its cancel and waits for the keepalive"
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


async def test_writer_drains_the_outbox_then_waits():
    stream = writer_stream()
    ws = FakeSocket()
    link = Link(ws=ws, start=0, offset=0.0, opened_at=0.0)  # type: ignore[arg-type]
    writer = asyncio.get_running_loop().create_task(stream._write(link))
    stream._link = link
    stream.feed(bytes(2560))
    stream._send_text('{"type": "ForceEndTurn"}')
    await settle(writer, 5)
    assert ws.sent == [bytes(2560), '{"type": "ForceEndTurn"}'] and link.sent == 2560 and not writer.done()
    writer.cancel()
    await settle(writer)
    assert writer.cancelled()
