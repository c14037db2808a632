#!/usr/bin/env python
"""Deepgram's own Python SDK (``deepgram-sdk``, ``client.listen.v2`` = Flux) against a base URL.

The only thing that differs from a program written for Deepgram is the client's environment (the
base URL); the key is whatever the caller passes (a made-up ``dg-...`` key in the tests).

    flux_script.py BASE_URL KEY [--mode sync|async] [--audio A.wav B.wav | --tones]
                   [--resume] [--expect-refusal] [--speed 2]
    flux_script.py BASE_URL KEY [--mode sync|async] --clip C.wav [--speed 1]

One connection streams clip A (then silence) and waits for its EndOfTurn, sends Configure and waits
for the answer, sends KeepAlive, streams clip B and sends ForceEndTurn once a turn is open (waits for
the ``manual`` EndOfTurn), then CloseStream and reads until the server closes. With ``--resume`` a
second connection adds ``?session=<Connected.session_id>`` (through the SDK's
``request_options["additional_query_parameters"]``) and collects the replayed turns (a relay
feature: Deepgram has no sessions). ``--expect-refusal`` only connects and records how the SDK
surfaces a refusal. ``--clip`` only streams one clip and closes (the browser tests compare the
demo page's transcript with the SDK's). Prints one JSON summary on stdout; tests/live/test_sdk_compat.py asserts on it.

``--mode sync`` uses ``DeepgramClient`` with event handlers and ``start_listening()`` on a thread
(Deepgram's documented sync pattern); ``--mode async`` uses ``AsyncDeepgramClient`` and iterates
the socket with ``async for``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import struct
import sys
import threading
import time
import traceback
import wave
from importlib import metadata
from typing import Any

from deepgram import AsyncDeepgramClient, DeepgramClient
from deepgram.core.events import EventType
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v2.types import ListenV2Configure

FLUX_TYPES = {"Connected", "TurnInfo", "ConfigureSuccess", "ConfigureFailure", "Warning", "Error"}
RATE = 16000
CHUNK = 2560  # 80 ms of 16 kHz linear16


# -- audio ---------------------------------------------------------------------------------------------
def read_wav(path: str) -> bytes:
    with wave.open(path) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), path
        return w.readframes(w.getnframes())


def tone(seconds: float, freq: float = 440.0, amplitude: int = 8000) -> bytes:
    n = int(seconds * RATE)
    return struct.pack(f"<{n}h", *(int(math.sin(2 * math.pi * freq * i / RATE) * amplitude) for i in range(n)))


def silence(seconds: float) -> bytes:
    return bytes(2 * int(seconds * RATE))


# -- what the SDK hands us -----------------------------------------------------------------------------
class UnknownMessageLog(logging.Handler):
    """Counts the SDK's "Skipping unknown WebSocket message" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "unknown" in record.getMessage().lower():
            self.count += 1


class Record:
    """Everything one connection received, as the SDK handed it over."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.messages: list[dict[str, Any]] = []
        self.classes: list[str] = []
        self.none = 0
        self.binary = 0
        self.errors: list[str] = []
        self.closed = False
        self.open_turn: int | None = None
        self.lock = threading.Condition()
        self.url: str | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None

    # Called from the SDK's handler / iterator.
    def add(self, message: Any) -> None:
        with self.lock:
            if message is None:
                self.none += 1
            elif isinstance(message, (bytes, bytearray)):
                self.binary += 1
            elif isinstance(message, dict):  # the SDK's recv() fallback for a message it could not type
                self.classes.append("dict")
                self.messages.append({"_untyped": True, **message})
            else:
                self.classes.append(type(message).__name__)
                body = message.model_dump() if hasattr(message, "model_dump") else message.dict()
                self.messages.append(body)
                if body.get("type") == "TurnInfo":
                    if body.get("event") == "StartOfTurn":
                        self.open_turn = body.get("turn_index")
                    elif body.get("event") == "EndOfTurn":
                        self.open_turn = None
            self.lock.notify_all()

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
            self.lock.notify_all()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    # Queries.
    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    def ends(self) -> list[dict[str, Any]]:
        return [m for m in self.of("TurnInfo") if m.get("event") == "EndOfTurn"]

    def summary(self) -> dict[str, Any]:
        connected = self.of("Connected")
        return {
            "phase": self.phase,
            "url": self.url,
            "classes": sorted(set(self.classes)),
            "types": [m.get("type") for m in self.messages],
            "events": [m.get("event") for m in self.of("TurnInfo")],
            "none": self.none,
            "binary": self.binary,
            "non_flux": [m for m in self.messages if m.get("type") not in FLUX_TYPES],
            "session_id": connected[0].get("session_id") if connected else None,
            "request_id": connected[0].get("request_id") if connected else None,
            "sequence_ids": [m.get("sequence_id") for m in self.messages],
            "warnings": [m.get("code") for m in self.of("Warning")],
            "error_messages": [{"code": m.get("code"), "description": m.get("description")} for m in self.of("Error")],
            "configure": [m for m in self.messages if m.get("type") in {"ConfigureSuccess", "ConfigureFailure"}],
            "ends": [
                {k: m.get(k) for k in ("turn_index", "transcript", "trigger", "replayed", "words")} for m in self.ends()
            ],
            "exceptions": self.errors,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
        }


class Timeout(AssertionError):
    pass


# -- the scenario, as steps a sync or an async driver carries out --------------------------------------
def stream_steps(rec: Record, a: bytes, b: bytes, pace: float):
    yield ("wait", lambda: rec.of("Connected"), 15, "Connected")
    for i in range(0, len(a), CHUNK):
        yield ("media", a[i : i + CHUNK])
        yield ("sleep", pace)
    yield ("wait", lambda: rec.ends(), 90, "the first EndOfTurn")
    yield ("configure", ListenV2Configure(type="Configure", thresholds={"eot_threshold": 0.8}, keyterms=["relay"]))
    yield ("wait", lambda: rec.of("ConfigureSuccess") or rec.of("ConfigureFailure"), 15, "the Configure answer")
    yield ("keepalive",)
    before = len(rec.ends())
    forced = False
    for i in range(0, len(b), CHUNK):
        yield ("media", b[i : i + CHUNK])
        yield ("sleep", pace)
        if not forced and i >= RATE * 2 * 1.2 and rec.open_turn is not None:
            yield ("force",)
            forced = True
    if not forced:
        yield ("wait", lambda: rec.open_turn is not None, 60, "a StartOfTurn in clip B")
        yield ("force",)
    yield ("wait", lambda: any(e.get("trigger") == "manual" for e in rec.ends()[before:]), 90, "the manual EndOfTurn")
    yield ("close_stream",)
    yield ("wait", lambda: rec.closed, 60, "the server's close after CloseStream")


def clip_steps(rec: Record, audio: bytes, pace: float):
    """Only speech: the clip in 80 ms chunks, then CloseStream, and read until the server closes."""
    yield ("wait", lambda: rec.of("Connected"), 15, "Connected")
    for i in range(0, len(audio), CHUNK):
        yield ("media", audio[i : i + CHUNK])
        yield ("sleep", pace)
    yield ("close_stream",)
    yield ("wait", lambda: rec.closed, 90, "the server's close after CloseStream")


def resume_steps(rec: Record, expect_turns: int):
    yield ("wait", lambda: rec.of("Connected"), 15, "Connected")
    yield ("wait", lambda: len(rec.ends()) >= expect_turns, 30, f"{expect_turns} replayed EndOfTurns")
    yield ("close_stream",)
    yield ("wait", lambda: rec.closed, 30, "the server's close after CloseStream")


def refusal_steps(rec: Record, pace: float):
    for i in range(0, 5 * CHUNK, CHUNK):  # a little audio, as a client would send right away
        if rec.closed:
            break
        yield ("media", silence(CHUNK / 2 / RATE), True)
        yield ("sleep", pace)
    yield ("wait", lambda: rec.closed, 15, "the server's close")


# -- drivers -------------------------------------------------------------------------------------------
def environment(base_url: str) -> DeepgramClientEnvironment:
    """The one change from a Deepgram program: where the client connects."""
    ws = base_url.rstrip("/")
    http = ws.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
    return DeepgramClientEnvironment(base=http, production=ws, agent=ws, agent_rest=http)


CONNECT = {"model": "flux-general-en", "encoding": "linear16", "sample_rate": 16000}


def run_sync(args, rec: Record, steps, extra_query: dict[str, str] | None) -> None:
    client = DeepgramClient(api_key=args.key, environment=environment(args.base_url))
    options = {"additional_query_parameters": extra_query} if extra_query else None
    try:
        with client.listen.v2.connect(**CONNECT, request_options=options) as socket:
            rec.url = str(getattr(socket._websocket.request, "path", None))  # observation only
            socket.on(EventType.MESSAGE, rec.add)
            socket.on(EventType.ERROR, rec.error)
            socket.on(EventType.CLOSE, lambda _: rec.close())
            listener = threading.Thread(target=socket.start_listening, daemon=True)
            listener.start()
            for step in steps:
                kind = step[0]
                if kind == "wait":
                    _, predicate, timeout, what = step
                    with rec.lock:
                        if not rec.lock.wait_for(predicate, timeout):
                            raise Timeout(f"timed out after {timeout}s waiting for {what}")
                elif kind == "sleep":
                    time.sleep(step[1])
                else:
                    if rec.closed and len(step) > 2:
                        continue
                    send_sync(socket, step)
            listener.join(10)
            rec.close_code, rec.close_reason = socket._websocket.close_code, socket._websocket.close_reason
    except Timeout:
        raise
    except Exception as exc:  # what the SDK raised out of connect()/send: part of the record
        rec.error(exc)


def send_sync(socket, step) -> None:
    kind = step[0]
    try:
        if kind == "media":
            socket.send_media(step[1])
        elif kind == "configure":
            socket.send_configure(step[1])
        elif kind == "keepalive":
            # listen.v2 has no KeepAlive method (Flux defines none); the socket's own JSON send path.
            socket._send({"type": "KeepAlive"})
        elif kind == "force":
            socket.send_force_end_turn()
        elif kind == "close_stream":
            socket.send_close_stream()
    except Exception:
        if len(step) <= 2:  # audio during a refusal may meet a closing socket: tolerated
            raise


async def run_async(args, rec: Record, steps, extra_query: dict[str, str] | None) -> None:
    client = AsyncDeepgramClient(api_key=args.key, environment=environment(args.base_url))
    options = {"additional_query_parameters": extra_query} if extra_query else None
    try:
        async with client.listen.v2.connect(**CONNECT, request_options=options) as socket:
            rec.url = str(getattr(socket._websocket, "path", None))  # observation only

            async def iterate() -> None:
                try:
                    async for message in socket:
                        rec.add(message)
                except Exception as exc:
                    rec.error(exc)
                finally:
                    rec.close()

            reader = asyncio.get_running_loop().create_task(iterate())
            for step in steps:
                kind = step[0]
                if kind == "wait":
                    _, predicate, timeout, what = step
                    deadline = time.monotonic() + timeout
                    while not predicate():
                        if time.monotonic() > deadline:
                            raise Timeout(f"timed out after {timeout}s waiting for {what}")
                        await asyncio.sleep(0.01)
                elif kind == "sleep":
                    await asyncio.sleep(step[1])
                else:
                    if rec.closed and len(step) > 2:
                        continue
                    try:
                        if kind == "media":
                            await socket.send_media(step[1])
                        elif kind == "configure":
                            await socket.send_configure(step[1])
                        elif kind == "keepalive":
                            await socket._send({"type": "KeepAlive"})  # no KeepAlive method in listen.v2
                        elif kind == "force":
                            await socket.send_force_end_turn()
                        elif kind == "close_stream":
                            await socket.send_close_stream()
                    except Exception:
                        if len(step) <= 2:
                            raise
            await asyncio.wait_for(reader, 10)
            rec.close_code, rec.close_reason = socket._websocket.close_code, socket._websocket.close_reason
    except Timeout:
        raise
    except Exception as exc:
        rec.error(exc)


def run(args, rec: Record, steps, extra_query: dict[str, str] | None = None) -> None:
    if args.mode == "sync":
        run_sync(args, rec, steps, extra_query)
    else:
        asyncio.run(run_async(args, rec, steps, extra_query))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url", help="ws://host:port (what replaces wss://api.deepgram.com)")
    parser.add_argument("key", help="the API key the SDK sends as 'Authorization: Token <key>'")
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--audio", nargs=2, metavar=("A_WAV", "B_WAV"), help="16 kHz mono 16-bit clips")
    parser.add_argument("--clip", metavar="WAV", help="only stream this clip (then 1.5 s of silence) and close")
    parser.add_argument("--tones", action="store_true", help="tone bursts instead of speech (the fake engine)")
    parser.add_argument("--resume", action="store_true", help="reconnect with ?session= and collect the replay")
    parser.add_argument("--expect-refusal", action="store_true", help="only connect and record the refusal")
    parser.add_argument("--speed", type=float, default=2.0, help="times real time (80 ms chunks)")
    args = parser.parse_args(argv)

    unknown = UnknownMessageLog()
    logging.getLogger("deepgram").addHandler(unknown)
    pace = CHUNK / 2 / RATE / args.speed
    summary: dict[str, Any] = {
        "sdk": "deepgram-sdk",
        "sdk_version": metadata.version("deepgram-sdk"),
        "websockets_version": metadata.version("websockets"),
        "mode": args.mode,
        "base_url": args.base_url,
        "connections": [],
        "failure": None,
    }
    records: list[Record] = []
    try:
        if args.expect_refusal:
            rec = Record("refusal")
            records.append(rec)
            run(args, rec, refusal_steps(rec, pace))
        elif args.clip:
            rec = Record("clip")
            records.append(rec)
            run(args, rec, clip_steps(rec, read_wav(args.clip) + silence(1.5), pace))
        else:
            if args.tones:
                a = tone(0.75) + silence(0.8)
                b = tone(2.4) + silence(0.2)
            else:
                a = read_wav(args.audio[0]) + silence(1.2)
                b = read_wav(args.audio[1])
            rec = Record("stream")
            records.append(rec)
            run(args, rec, stream_steps(rec, a, b, pace))
            if args.resume:
                session = rec.summary()["session_id"]
                if not session:
                    raise AssertionError("Connected carried no session_id to resume")
                again = Record("resume")
                records.append(again)
                run(args, again, resume_steps(again, len(rec.ends())), {"session": session})
    except Exception as exc:
        summary["failure"] = f"{type(exc).__name__}: {exc}"
        summary["traceback"] = traceback.format_exc()
    summary["connections"] = [r.summary() for r in records]
    summary["unknown_logged"] = unknown.count
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")
    return 0 if summary["failure"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
