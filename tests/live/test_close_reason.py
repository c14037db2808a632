"""A real daphne and a plain `websockets` client: the close frame's reason is the error code.

daphne 4.2.3 drops the reason an application gives; relay/server/close_reason.py puts it back.
"""
from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from tests.support.live import LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]


async def _close_of(url: str, first: bytes | str = json.dumps({"type": "CloseStream"})) -> tuple[int | None, str, list[dict]]:
    """Connect, send ``first`` after Connected, read until the relay closes: (code, reason, messages)."""
    messages = []
    async with websockets.connect(url, max_size=None) as ws:
        try:
            async for raw in ws:
                messages.append(json.loads(raw))
                if messages[-1].get("type") == "Connected":
                    await ws.send(first)
        except websockets.ConnectionClosed:
            pass
    return ws.close_code, ws.close_reason, messages


def test_close_frames_carry_the_error_code_as_their_reason(tmp_path):
    env = {**sqlite_env(tmp_path), "RELAY_CONNECTS_PER_MINUTE": "3"}
    with LiveServer(env) as server:
        url = server.ws_url + "/v2/listen"
        code, reason, messages = asyncio.run(_close_of(url + "?session=no%20spaces%20allowed"))
        assert messages[-1]["type"] == "Error" and messages[-1]["code"] == "INVALID_SESSION"
        assert (code, reason) == (4008, "INVALID_SESSION")

        code, reason, messages = asyncio.run(_close_of(url))
        assert messages[0]["type"] == "Connected" and (code, reason) == (1000, "")  # a clean close has none

        # Exactly 1 MiB (RELAY_MAX_FRAME_BYTES) of 16 kHz audio is 32.8 s, more than the 30 s backlog.
        code, reason, messages = asyncio.run(_close_of(url, b"\0" * 1024 * 1024))  # the third attempt of three
        assert messages[-1]["code"] == "FRAME_TOO_LARGE" and (code, reason) == (4009, "FRAME_TOO_LARGE")

        code, reason, messages = asyncio.run(_close_of(url))
        assert messages[-1]["code"] == "RATE_LIMITED"
        assert (code, reason) == (4029, "RATE_LIMITED")
