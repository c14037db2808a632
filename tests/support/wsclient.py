"""Helpers for in-process consumer tests with Channels' WebsocketCommunicator."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from channels.testing import WebsocketCommunicator

from transcription_site.asgi import application


class Client:
    def __init__(self, path: str = "/v2/listen", headers: list[tuple[bytes, bytes]] | None = None, subprotocols=None,
                 relay_events: str | None = "presence,history") -> None:
        """``relay_events``: the relay's extra messages to ask for (None: a plain Flux client)."""
        if relay_events is not None:
            path += ("&" if "?" in path else "?") + "relay_events=" + relay_events
        self.comm = WebsocketCommunicator(application, path, headers=headers or [], subprotocols=subprotocols)
        self.messages: list[dict[str, Any]] = []

    async def connect(self) -> dict[str, Any]:
        connected, _ = await self.comm.connect(timeout=10)
        assert connected
        return await self.recv()

    async def recv(self, timeout: float = 10, *, presence: bool = False) -> dict[str, Any]:
        """Next message; Presence messages are recorded but skipped unless asked for."""
        while True:
            out = await self.comm.receive_output(timeout)
            if out["type"] == "websocket.close":
                self.closed = out
                raise ConnectionClosed(out.get("code"), out.get("reason"))
            msg = json.loads(out["text"])
            self.messages.append(msg)
            if presence or msg.get("type") != "Presence":
                return msg

    async def recv_until(self, pred, timeout: float = 10) -> dict[str, Any]:
        async def loop():
            while True:
                msg = await self.recv(timeout, presence=True)
                if pred(msg):
                    return msg
        return await asyncio.wait_for(loop(), timeout)

    async def recv_turn_end(self, timeout: float = 10) -> dict[str, Any]:
        return await self.recv_until(lambda m: m.get("type") == "TurnInfo" and m["event"] == "EndOfTurn", timeout)

    async def send_audio(self, data: bytes, chunk: int = 2560) -> None:
        for i in range(0, len(data), chunk):
            await self.comm.send_to(bytes_data=data[i : i + chunk])

    async def send_json(self, obj: Any) -> None:
        await self.comm.send_to(text_data=json.dumps(obj))

    async def expect_close(self, timeout: float = 10) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the relay closes; returns (close code, messages read on the way)."""
        seen = []
        while True:
            try:
                seen.append(await self.recv(timeout))
            except ConnectionClosed as closed:
                return closed.code, seen

    async def disconnect(self, code: int = 1000) -> None:
        await self.comm.disconnect(code=code)


class ConnectionClosed(Exception):
    def __init__(self, code, reason=None):
        super().__init__(code)
        self.code = code
        self.reason = reason
