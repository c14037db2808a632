"""The baseline: a bare ``websockets`` asyncio server doing the relay's visible job.

Same URL, same messages byte for byte (built by relay.flux.protocol), same fake engine feeding on the
same audio, but no Django, no Channels, no channel layer and no database: the turn index is a
per-process counter. The relay's overhead is whatever it costs above this.

    python -m bench.baseline --port 8765
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import uuid
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from relay.flux import protocol
from relay.flux.audio import SampleAligner
from relay.engines.base import EngineWarning
from relay.engines.fake import FakeEngine

ENGINE = FakeEngine("fake", {"energy_threshold": 500.0, "eot_silence_ms": 500, "update_interval_ms": 250})
_turns = itertools.count()


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request else "/"
    _, _, query = path.partition("?")
    try:
        params = protocol.parse_connect_params(query.encode())
    except Exception as exc:  # same answer as the relay: Error, then close
        await ws.send(protocol.stamp(protocol.error_body("BAD_REQUEST", str(exc)), sequence_id=0, request_id=""))
        await ws.close(4000)
        return
    connection_id = str(uuid.uuid4())
    session_id = params.session_id or str(uuid.uuid4())
    seq = 0

    async def send(body: str) -> None:
        nonlocal seq
        text = protocol.stamp(body, sequence_id=seq, request_id=connection_id)
        seq += 1
        await ws.send(text)

    stream = ENGINE.open_stream(params.options)
    aligner = SampleAligner(params.options.sample_width)
    await stream.start()
    await send(protocol.connected_body(session_id=session_id, resumed=False, connection_id=connection_id, engine="fake"))

    async def pump() -> None:
        engine_turn = index = None
        async for item in stream.events():
            if isinstance(item, EngineWarning):
                await send(protocol.warning_body(item.code, item.description))
                continue
            if item.turn != engine_turn or index is None:
                engine_turn, index = item.turn, next(_turns)
            await send(protocol.turn_info_body(item, turn_index=index, speaker=connection_id))
            if item.event == "EndOfTurn":
                engine_turn = index = None

    task = asyncio.get_running_loop().create_task(pump())
    try:
        async for message in ws:
            if isinstance(message, bytes):
                pcm = aligner.push(message)
                if pcm:
                    stream.feed(pcm)
                continue
            msg = protocol.parse_client_text(message)
            if msg.type == "ForceEndTurn":
                await stream.force_end_turn()
            elif msg.type == "CloseStream":
                break
    except (ConnectionClosed, protocol.BadClientMessage):
        pass
    finally:
        await stream.finish()
        try:
            await asyncio.wait_for(task, 5)
        except (ConnectionClosed, asyncio.TimeoutError):
            task.cancel()


def process_request(connection, request):
    """Plain HTTP GETs (the benchmark's readiness probe) get a 200; upgrades go on."""
    if "upgrade" not in request.headers.get("Connection", "").lower():
        return connection.respond(200, "ok\n")
    return None


async def main(port: int, backlog: int, handler: Any = handler) -> None:
    gc.freeze()
    async with serve(
        handler, "127.0.0.1", port, compression=None, max_size=4 * 1024 * 1024, backlog=backlog, ping_interval=None,
        process_request=process_request,
    ) as server:
        await server.serve_forever()


def cli(handler: Any, description: str) -> None:
    """``--port`` / ``--backlog``, then serve ``handler`` as this baseline serves its own (bench.bare too)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.backlog, handler))


if __name__ == "__main__":
    cli(handler, __doc__.splitlines()[0])
