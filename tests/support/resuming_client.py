"""A relay client that survives server faults, for the fault tests.

It does what a robust client (the demo page, an SDK) must do to lose nothing:

- keeps every byte of audio it sent on the current connection until an ``EndOfTurn`` of its own
  covers it (``audio_window_end`` is in the stream's own clock, so it maps to a byte offset);
- on any unexpected close, reconnects (backoff) with ``since=`` its last finished index, never
  past a turn it saw open;
- waits until the relay has finished the history replay before re-sending (it sends a message
  and waits for the answer: the relay handles messages in order, after the replay), so a turn
  that was stored but whose EndOfTurn never arrived is acknowledged by the replay, not re-sent;
- re-sends the unacknowledged audio, then goes on with new audio;
- on ``close()``, sends CloseStream and waits for the relay to finish; a close the relay answers
  with an Error while audio is still unacknowledged (``FLUSH_INCOMPLETE``: the engine did not
  finish the open turn; ``SERVER_RESTARTING``) reconnects, re-sends that audio and closes again.

With ``resend=False`` it behaves like a plain Flux client: reconnects, gets the replay, but the
audio the dead connection had not turned into finished turns is gone.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import ssl as ssl_module
from typing import Any
from urllib.parse import urlencode

import websockets

_WORDS = "one two three four five six seven eight nine ten".split()
BYTES_PER_SECOND = 32000
CHUNK = 2560  # 80 ms
#: A message the relay answers (ConfigureFailure: needs thresholds or keyterms) without changing
#: anything; its answer marks the end of the replay.
BARRIER = json.dumps({"type": "Configure", "thresholds": {}})
CLOSE_STREAM = json.dumps({"type": "CloseStream"})
#: Errors after which a reconnect cannot help.
FATAL = {"UNAUTHORIZED", "FORBIDDEN", "INVALID_SESSION", "INVALID_PARAMETER", "UNSUPPORTED_ENCODING",
         "UNSUPPORTED_SAMPLE_RATE", "FRAME_TOO_LARGE", "SESSION_ENDED"}


class GaveUp(Exception):
    """The client could not reconnect."""


class ResumingClient:
    def __init__(self, base_url: str, session: str, *, ssl: ssl_module.SSLContext | None = None,
                 resend: bool = True, max_attempts: int = 60) -> None:
        self.base_url = base_url
        self.session = session
        self.ssl = ssl
        self.resend = resend
        self.max_attempts = max_attempts
        self.messages: list[dict[str, Any]] = []
        self.finals: dict[int, dict[str, Any]] = {}
        self.duplicates: list[int] = []  # finals received twice (live + replay is not a duplicate)
        self.open_turns: dict[int, str] = {}  # turn_index -> speaker, seen but not finished
        self.connection_ids: list[str] = []
        self.closes: list[tuple[int | None, str]] = []  # (close code, error code) of every lost connection
        self.errors: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self.resent_bytes = 0
        self.dropped_bytes = 0
        self.buffer = bytearray()  # unacknowledged audio, on the timeline of ``buffer_conn``
        self.buffer_start = 0  # that timeline's byte offset of buffer[0]
        self.buffer_conn = ""
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self.ws: Any = None
        self._lock = asyncio.Lock()
        self._closing = False  # close() was called: CloseStream on every connection once its replay is over
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    # -- public --------------------------------------------------------------------------------
    @property
    def connection_id(self) -> str:
        return self.connection_ids[-1]

    async def start(self) -> "ResumingClient":
        self._task = asyncio.create_task(self._run())
        await self._wait_ready()
        return self

    async def speak(self, audio: bytes, chunk: int = CHUNK) -> None:
        """Send audio; chunks sent while the connection dies are re-sent after the reconnect."""
        for i in range(0, len(audio), chunk):
            piece = audio[i : i + chunk]
            while True:
                await self._wait_ready()
                async with self._lock:
                    if not self.ready.is_set():
                        continue
                    self.buffer += piece
                    try:
                        await self.ws.send(piece)
                    except websockets.ConnectionClosed:
                        pass  # kept in the buffer: re-sent on the next connection
                    break

    async def reconnected(self, connections: int = 2, timeout: float = 30) -> None:
        """Wait until the client is streaming again on its ``connections``-th connection."""
        async def loop():
            while not (len(self.connection_ids) >= connections and self.ready.is_set()):
                if self.failed:
                    raise self.failed
                self._changed.clear()
                await self._changed.wait()
        try:
            await asyncio.wait_for(loop(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.session}: not reconnected within {timeout:g} s; closes {self.closes}") from None

    async def send_raw(self, frame: bytes) -> None:
        """A frame that is not audio (a fault marker): sent once, never buffered or re-sent."""
        await self._wait_ready()
        async with self._lock:
            await self.ws.send(frame)

    def mark(self) -> int:
        """Position in ``messages``; pass as ``after`` to wait only for later messages."""
        return len(self.messages)

    async def wait_for(self, pred, timeout: float = 30, what: str = "message", *, after: int = 0) -> dict[str, Any]:
        async def loop():
            seen = after
            while True:
                for m in self.messages[seen:]:
                    if pred(m):
                        return m
                seen = len(self.messages)
                if self.failed:
                    raise self.failed
                self._changed.clear()
                await self._changed.wait()
        try:
            return await asyncio.wait_for(loop(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.session}: no {what} within {timeout:g} s; last messages: {self.messages[-5:]}") from None

    async def wait_final(self, transcript: str, timeout: float = 30, *, after: int = 0) -> dict[str, Any]:
        return await self.wait_for(
            lambda m: m.get("event") == "EndOfTurn" and m.get("transcript") == transcript,
            timeout, f"EndOfTurn {transcript!r}", after=after,
        )

    async def say(self, n_words: int, audio: bytes, timeout: float = 30) -> dict[str, Any]:
        """Speak a whole turn and wait for its EndOfTurn (live, on whichever connection)."""
        mark = self.mark()
        await self.speak(audio)
        return await self.wait_for(
            lambda m: m.get("event") == "EndOfTurn" and not m.get("replayed") and m.get("speaker") in self.connection_ids
            and m["transcript"] == " ".join(_WORDS[:n_words]),
            timeout, f"EndOfTurn of {n_words} words", after=mark,
        )

    def final_transcripts(self) -> list[str]:
        return [self.finals[i]["transcript"] for i in sorted(self.finals)]

    def since(self) -> int | None:
        """Last finished index, but never past a turn still open (it may finish while away)."""
        since = max(self.finals, default=-1)
        for index in self.open_turns:
            since = min(since, index - 1)
        return since if since >= 0 else None

    async def close(self, timeout: float = 90) -> None:
        """CloseStream, then wait until the relay is done: a clean close, or an Error that leaves
        nothing unacknowledged. An Error with audio still unacknowledged reconnects, re-sends it and
        closes again (docs/guarantees.md). ``timeout`` bounds the whole."""
        async with self._lock:  # one CloseStream per connection: here, or after the replay's re-send
            self._closing = True
            if self.ws is not None and self.ready.is_set():
                with contextlib.suppress(websockets.ConnectionClosed):
                    await self.ws.send(CLOSE_STREAM)
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
        self._stopping = True
        if self.ws is not None:
            await self.ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def abort(self) -> None:
        """Stop without closing: the TCP connection just ends (a crashed client)."""
        self._stopping = True
        if self.ws is not None:
            self.ws.transport.abort()
        if self._task is not None:
            self._task.cancel()

    # -- internals -----------------------------------------------------------------------------
    async def _wait_ready(self) -> None:
        while not self.ready.is_set():
            if self.failed:
                raise self.failed
            self._changed.clear()
            await self._changed.wait()

    def _url(self) -> str:
        query = {"session": self.session, "encoding": "linear16", "sample_rate": 16000}
        since = self.since()
        if since is not None:
            query["since"] = since
        if self.connection_ids:  # the one this resumes: the relay pairs them for reconnection time
            query["previous_connection"] = self.connection_ids[-1]
        return f"{self.base_url}/v2/listen?{urlencode(query)}"

    def _notify(self) -> None:
        self._changed.set()

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._stopping:
                try:
                    ws = await websockets.connect(self._url(), ssl=self.ssl, max_size=None, open_timeout=10)
                except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
                    if self._closing and not self.buffer:
                        return  # closing, and nothing to re-send
                    attempt += 1
                    if attempt >= self.max_attempts:
                        raise GaveUp(f"{self.session}: {attempt} connection attempts failed, last: {exc!r}") from exc
                    await asyncio.sleep(min(1.0, 0.05 * 2 ** min(attempt, 5)))
                    continue
                self.ws = ws
                error_code = await self._serve(ws)
                self.ready.clear()
                self._notify()
                if self._stopping:
                    return
                if self._closing and (not error_code or error_code in FATAL or not self.resend or not self.buffer):
                    return  # closed, and nothing left that another connection could finish
                self.closes.append((ws.close_code, error_code))
                if error_code in FATAL:
                    raise GaveUp(f"{self.session}: fatal error {error_code}")
                attempt = attempt + 1 if not self.connection_ids or error_code else 0
                if attempt >= self.max_attempts:
                    raise GaveUp(f"{self.session}: gave up after {attempt} attempts")
                await asyncio.sleep(min(1.0, 0.05 * 2 ** min(attempt, 5)))
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.failed = exc
                self._notify()
            raise

    async def _serve(self, ws) -> str:
        """One connection: hello, replay barrier, re-send, then read until it closes."""
        error_code = ""
        barrier_done = False
        try:
            await ws.send(BARRIER)
            async for raw in ws:
                m = json.loads(raw)
                self.messages.append(m)
                kind = m.get("type")
                if kind == "Connected":
                    self.connection_ids.append(m["connection_id"])
                elif kind == "Error":
                    error_code = m.get("code", "")
                    self.errors.append(m)
                elif kind == "Warning":
                    self.warnings.append(m)
                elif kind == "TurnInfo":
                    self._on_turn(m)
                elif kind in ("ConfigureFailure", "ConfigureSuccess") and not barrier_done:
                    barrier_done = True
                    await self._after_replay()
                self._notify()
        except websockets.ConnectionClosed:
            pass
        return error_code

    def _on_turn(self, m: dict[str, Any]) -> None:
        index = m["turn_index"]
        if m["event"] != "EndOfTurn":
            self.open_turns.setdefault(index, m.get("speaker", ""))
            return
        self.open_turns.pop(index, None)
        if index in self.finals and not m.get("replayed"):
            self.duplicates.append(index)
        self.finals.setdefault(index, m)
        if m.get("speaker") == self.buffer_conn and self.buffer_conn:
            acked = int(round(m["audio_window_end"] * BYTES_PER_SECOND)) & ~1
            drop = acked - self.buffer_start
            if drop > 0:
                del self.buffer[:drop]
                self.buffer_start = acked

    async def _after_replay(self) -> None:
        """The replay is over: what the old connection left unacknowledged is re-sent (or dropped)."""
        async with self._lock:
            previous = self.buffer_conn
            for index, speaker in list(self.open_turns.items()):
                if speaker == previous:
                    del self.open_turns[index]  # it will never finish (or was replayed just now)
            self.buffer_conn = self.connection_id
            self.buffer_start = 0
            if previous and self.buffer:
                if self.resend:
                    self.resent_bytes += len(self.buffer)
                    data = bytes(self.buffer)
                    try:
                        for i in range(0, len(data), CHUNK):
                            await self.ws.send(data[i : i + CHUNK])
                    except websockets.ConnectionClosed:
                        return
                else:
                    self.dropped_bytes += len(self.buffer)
                    self.buffer.clear()
            if self._closing:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await self.ws.send(CLOSE_STREAM)
            self.ready.set()
            self._notify()
