"""A local fake Deepgram Flux server for tests, written with the ``websockets`` library.

It speaks the Flux v2 wire protocol (docs: /work/shared/reference/flux-v2-protocol.md): Connected,
TurnInfo (StartOfTurn / Update / EagerEndOfTurn / TurnResumed / EndOfTurn), Configure ->
ConfigureSuccess / ConfigureFailure, ForceEndTurn, KeepAlive, CloseStream (flush, then close
1000 *without* a final EndOfTurn, as upstream Flux does). Turns come from the relay's fake engine
run on the audio received (tone = speech, 500 ms of silence ends a turn, one word per 250 ms of
tone: "one two three ..."), so a test knows the transcript from the audio it sends.

Turns can also come from a script (:attr:`Plan.script`) for what energy cannot make: eager
end-of-turn, languages, an EndOfTurn that never comes.

Faults, per server or per connection (:class:`Plan`, by connection number): check the auth
header and answer 401/403/503, drop the TCP connection mid-turn, stall (stay connected, answer
pings, say nothing), send malformed frames, send an Error and close, close idle connections
like Deepgram's NET-0001, never hear speech. Everything it saw is recorded for assertions, and
:meth:`FakeFlux.wait_for` waits on that record instead of sleeping.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from relay.flux import protocol
from relay.engines.base import EngineWarning
from relay.engines.fake import FakeEngine
from relay.exceptions import ConfigureRejected, RelayError

# websockets logs request headers at DEBUG; the fake's records are the place to look at them.
quiet = logging.getLogger("tests.support.fakeflux")
quiet.setLevel(logging.WARNING)


@dataclass
class Plan:
    """What one connection does wrong (all counts are 1-based)."""

    drop_after_turninfo: int | None = None  # abort TCP right after sending this TurnInfo
    stall_after_messages: int | None = None  # send nothing after this many messages (Connected = 1)
    junk_before_turninfo: int | None = None  # send malformed frames before this TurnInfo
    error_after_connect: tuple[str, int] | None = None  # send Error(code) then close(close_code)
    #: Accept the socket, then Error(code) and close(close_code) with no Connected: how a relay
    #: (tests/live/test_upstream_chain.py) refuses an API token it does not know.
    refuse_in_band: tuple[str, int] | None = None
    deaf: bool = False  # never hears speech
    refuse_configure: bool = False  # answer every Configure with ConfigureFailure
    drop_on: frozenset[str] = frozenset()  # abort TCP instead of handling these message types
    #: Instead of hearing turns in the audio: (seconds of audio received, message body) pairs,
    #: each sent once that much audio has arrived (request_id and sequence_id are added).
    script: list[tuple[float, dict[str, Any]]] | None = None


@dataclass
class Conn:
    """What one accepted connection saw."""

    index: int
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    audio_bytes: int = 0
    #: How much of that the fake's decoder made audio of (compressed encodings), and what it
    #: said about the rest: INVALID_AUDIO_PACKET per bad packet, INVALID_AUDIO when it gave up.
    decoded_seconds: float = 0.0
    audio_problems: list[str] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    keepalive_times: list[float] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False
    close_code: int | None = None

    def received(self, kind: str) -> list[dict[str, Any]]:
        return [t for t in self.texts if t.get("type") == kind]


class FakeFlux:
    def __init__(
        self,
        *,
        api_key: str = "fake-flux-key",
        scheme: str = "Token",
        reject_status: int | None = None,
        refuse_after: int | None = None,
        plans: dict[int, Plan] | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.api_key = api_key
        self.scheme = scheme
        self.reject_status = reject_status  # answer every handshake with this status
        self.refuse_after = refuse_after  # answer 503 to handshakes after this many attempts
        self.plans = plans or {}
        self.idle_timeout = idle_timeout  # close 1011 "NET-0001" after this long with no audio/KeepAlive
        self.attempts = 0
        self.rejected: list[int] = []
        self.connections: list[Conn] = []
        self._changed = asyncio.Event()
        self._server: Any = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> "FakeFlux":
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._check, logger=quiet, compression=None, max_size=2**22
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    def url(self, path: str = "/v2/listen") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        """Wait until ``predicate()`` holds; re-checked whenever the record changes."""
        async with asyncio.timeout(timeout):
            while not predicate():
                event = self._changed
                await event.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- handshake ----------------------------------------------------------------------------------
    def _check(self, connection: ServerConnection, request: Any) -> Any:
        self.attempts += 1
        self._notify()
        status = self.reject_status
        if status is None and self.refuse_after is not None and self.attempts > self.refuse_after:
            status = 503
        if status is None and request.headers.get("Authorization") != f"{self.scheme} {self.api_key}":
            status = 401
        if status is None:
            try:
                protocol.parse_connect_params(urlsplit(request.path).query)
            except RelayError:
                status = 400
        if status is not None:
            self.rejected.append(status)
            return connection.respond(HTTPStatus(status), f"{HTTPStatus(status).phrase}\n")
        return None

    # -- one connection -----------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        parts = urlsplit(ws.request.path)
        conn = Conn(
            index=len(self.connections),
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers={k: v for k, v in ws.request.headers.raw_items()},
        )
        self.connections.append(conn)
        self._notify()
        plan = self.plans.get(conn.index, Plan())
        options = protocol.parse_connect_params(parts.query).options
        deaf = plan.deaf or plan.script is not None
        script = list(plan.script or [])
        engine = FakeEngine("fakeflux", {"energy_threshold": 1e12 if deaf else 500.0, "eot_silence_ms": 500, "update_interval_ms": 250})
        stream = engine.open_stream(options)
        request_id = str(uuid.uuid4())
        state = {"seq": 0, "turninfos": 0, "stalled": False}
        loop = asyncio.get_running_loop()
        last_activity = [loop.time()]

        async def send(body: dict[str, Any]) -> None:
            if state["stalled"]:
                return
            message = {"type": body.pop("type"), "request_id": request_id, "sequence_id": state["seq"], **body}
            state["seq"] += 1
            conn.sent.append(message)
            await ws.send(json.dumps(message))
            if plan.stall_after_messages is not None and state["seq"] >= plan.stall_after_messages:
                state["stalled"] = True
            self._notify()

        async def junk() -> None:
            for frame in ("{not json", "[1, 2]", '{"type": "Mystery"}', '{"type": "TurnInfo", "event": "Update"}', b"\x00\x01"):
                await ws.send(frame)

        async def pump() -> None:
            try:
                async for item in stream.events():
                    if isinstance(item, EngineWarning):
                        conn.audio_problems.append(item.code)
                    if isinstance(item, EngineWarning) or state["stalled"]:
                        continue
                    await turn_info(item)
                    if plan.drop_after_turninfo == state["turninfos"]:
                        ws.transport.abort()
                        return
            except RelayError as exc:  # the audio could not be decoded: a real Flux would close
                conn.audio_problems.append(exc.code)
                self._notify()

        async def turn_info(item: Any) -> None:
            state["turninfos"] += 1
            if plan.junk_before_turninfo == state["turninfos"]:
                await junk()
            body = {
                "type": "TurnInfo",
                "event": item.event,
                "turn_index": item.turn,
                "audio_window_start": item.audio_window_start,
                "audio_window_end": item.audio_window_end,
                "transcript": item.transcript,
                "words": [w.as_dict() for w in item.words],
                "end_of_turn_confidence": item.end_of_turn_confidence,
            }
            if item.event == "EndOfTurn":
                body["trigger"] = item.trigger
            await send(body)

        async def idle_watch() -> None:
            while True:
                await asyncio.sleep(self.idle_timeout / 4)
                if loop.time() - last_activity[0] > self.idle_timeout:
                    await ws.close(1011, "NET-0001")
                    return

        if plan.refuse_in_band is None:
            await send({"type": "Connected"})
        if plan.error_after_connect is not None or plan.refuse_in_band is not None:
            code, close_code = plan.error_after_connect or plan.refuse_in_band  # type: ignore[misc]
            await send({"type": "Error", "code": code, "description": "The fake refuses this stream."})
            await ws.close(close_code, code)
            conn.closed, conn.close_code = True, close_code
            self._notify()
            return
        pumping = loop.create_task(pump())
        watching = loop.create_task(idle_watch()) if self.idle_timeout else None
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    conn.audio_bytes += len(raw)
                    last_activity[0] = loop.time()
                    stream.feed(raw[: len(raw) - len(raw) % options.sample_width])
                    conn.decoded_seconds = stream.samples_done / stream.rate
                    while script and script[0][0] * options.bytes_per_second <= conn.audio_bytes:
                        await send(dict(script.pop(0)[1]))
                    self._notify()
                    continue
                msg = json.loads(raw)
                conn.texts.append(msg)
                self._notify()
                kind = msg.get("type")
                if kind in plan.drop_on:
                    ws.transport.abort()
                    break
                if kind == "KeepAlive":
                    last_activity[0] = loop.time()
                    conn.keepalive_times.append(loop.time())
                elif kind == "ForceEndTurn":
                    await stream.force_end_turn()
                elif kind == "Configure" and plan.refuse_configure:
                    await send({"type": "ConfigureFailure", "code": "INVALID_CONFIGURE", "description": "The fake refuses this configuration."})
                elif kind == "Configure":
                    try:
                        thresholds, keyterms = protocol.parse_configure(msg, stream.options)
                        await stream.configure(thresholds, keyterms)
                    except ConfigureRejected as exc:
                        await send({"type": "ConfigureFailure", "code": exc.code, "description": exc.description})
                    else:
                        await send({"type": "ConfigureSuccess", **json.loads(protocol.configure_success_body(stream.options))})
                elif kind == "CloseStream" and not state["stalled"]:
                    stream.end()  # flush what was heard; upstream Flux sends no EndOfTurn for an open turn
                    await pumping
                    await ws.close(1000)
                    break
        except ConnectionClosed:
            pass
        finally:
            for task in (pumping, watching):
                if task is not None:
                    task.cancel()
            conn.closed, conn.close_code = True, ws.close_code
            self._notify()
