"""A command-line client: stream an audio file through a running relay and print its turns.

``python manage.py transcribe FILE [--url ws://host:port/v2/listen] [--session ID] [--realtime]``

16-bit mono WAV goes as it is (at its own sample rate); anything else PyAV (FFmpeg, installed
with faster-whisper) opens (MP3, M4A/AAC, Ogg/Opus/Vorbis, FLAC, other WAVs, a video file's
first audio track) is decoded and resampled to 16 kHz mono Int16 as it streams. Finished turns are printed to
stdout as they arrive, with a progress bar on stderr. It speaks only the public protocol, so it
works against any relay (or Flux-compatible endpoint), not just this process's database.

Without ``--realtime`` audio is sent as fast as the relay's engine keeps up: never more than
``--max-ahead`` seconds ahead of both the engine's progress and the wall clock, which keeps it
under the relay's backlog limit even during long silences (when the engine reports nothing).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from relay.flux.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

DEFAULT_URL = "ws://127.0.0.1:8000/v2/listen"
CONVERTED_RATE = 16000


@dataclass
class AudioSource:
    """Int16 mono PCM in chunks, with its rate and (when known) its length."""

    rate: int
    seconds: float | None
    _chunks: Iterator[bytes]
    converted: bool = False

    def chunks(self) -> Iterator[bytes]:
        return self._chunks


def open_audio(path: str, *, chunk_ms: int) -> AudioSource:
    if not os.path.isfile(path):
        raise CommandError(f"No such file: {path}")
    try:
        with wave.open(path, "rb") as w:
            simple = w.getcomptype() == "NONE" and w.getsampwidth() == 2 and w.getnchannels() == 1
            rate, frames = w.getframerate(), w.getnframes()
    except (wave.Error, EOFError):
        simple = False
    if simple and MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        return AudioSource(rate, frames / rate, _wav_chunks(path, rate * chunk_ms // 1000))
    return _decoded_source(path, chunk_ms=chunk_ms)


def _wav_chunks(path: str, frames_per_chunk: int) -> Iterator[bytes]:
    with wave.open(path, "rb") as w:
        while data := w.readframes(frames_per_chunk):
            yield data


def _decoded_source(path: str, *, chunk_ms: int) -> AudioSource:
    """Any file with an audio track, decoded by PyAV and resampled to 16 kHz mono s16 as it streams."""
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av comes with faster-whisper (requirements.txt)
        raise CommandError("This file is not 16-bit mono WAV and PyAV is not installed to decode it (pip install av).") from exc
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise CommandError(f"Cannot decode {path}: no audio track found in it.")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = container.duration / 1_000_000 if container.duration else None
    except av.FFmpegError as exc:
        raise CommandError(f"Cannot decode {path}: {exc}") from exc
    chunk_bytes = CONVERTED_RATE * 2 * chunk_ms // 1000

    def chunks() -> Iterator[bytes]:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=CONVERTED_RATE)
        pending = bytearray()
        try:
            with av.open(path) as container:
                for frame in _with_flush(container.decode(container.streams.audio[0])):
                    for out in resampler.resample(frame):
                        pending += out.to_ndarray().tobytes()  # packed s16 mono: one plane, exact length
                    while len(pending) >= chunk_bytes:
                        yield bytes(pending[:chunk_bytes])
                        del pending[:chunk_bytes]
        except av.FFmpegError as exc:
            raise CommandError(f"Cannot decode {path}: {exc}") from exc
        if pending:
            yield bytes(pending)

    return AudioSource(CONVERTED_RATE, seconds or None, chunks(), converted=True)


def _with_flush(frames: Iterator[Any]) -> Iterator[Any]:
    """The decoded frames, then None, which flushes what the resampler still holds."""
    yield from frames
    yield None


def stream_url(base: str, *, session: str | None, since: int | None, rate: int) -> str:
    parts = urlsplit(base)
    if parts.scheme not in {"ws", "wss"}:
        raise CommandError(f"--url must be a ws:// or wss:// URL, not {base!r}")
    query = dict(parse_qsl(parts.query))
    query.update({"encoding": "linear16", "sample_rate": str(rate)})
    if session:
        query["session"] = session
    if since is not None:
        query["since"] = str(since)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/v2/listen", urlencode(query), ""))


class Command(BaseCommand):
    help = "Stream an audio file through a running relay and print the transcript turns as they come."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="WAV, or any audio or video file FFmpeg (PyAV) decodes: mp3, m4a, ogg, flac...")
        parser.add_argument("--url", default=os.environ.get("RELAY_URL", DEFAULT_URL), help=f"relay WebSocket URL (default {DEFAULT_URL}, or $RELAY_URL)")
        parser.add_argument("--session", help="join or resume this session id (default: a new session)")
        parser.add_argument("--since", type=int, help="replay only turns after this index when resuming")
        parser.add_argument("--realtime", action="store_true", help="send audio at real-time pace, like a microphone")
        parser.add_argument("--chunk-ms", type=int, default=100, help="audio per WebSocket message (default 100 ms)")
        parser.add_argument("--max-ahead", type=float, default=10.0, help="seconds of audio to send ahead of the engine (default 10)")
        parser.add_argument("--token", default=os.environ.get("RELAY_API_TOKEN", ""), help="API token (default $RELAY_API_TOKEN)")
        parser.add_argument("--json", action="store_true", help="print every server message as a JSON line instead of turns")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **options: Any) -> None:
        if not 20 <= options["chunk_ms"] <= 1000:
            raise CommandError("--chunk-ms must be between 20 and 1000.")
        source = open_audio(options["file"], chunk_ms=options["chunk_ms"])
        url = stream_url(options["url"], session=options["session"], since=options["since"], rate=source.rate)
        out = getattr(self.stdout, "_out", sys.stdout)
        err = getattr(self.stderr, "_out", sys.stderr)
        client = StreamClient(
            source, url=url, token=options["token"], realtime=options["realtime"], max_ahead=options["max_ahead"],
            json_lines=options["json"], out=out, err=err,
            progress=not options["no_progress"] and options["verbosity"] > 0,
        )
        try:
            asyncio.run(client.run())
        except OSError as exc:
            raise CommandError(f"Cannot reach the relay at {options['url']}: {exc}") from exc
        if client.error:
            raise CommandError(client.error)
        if options["verbosity"] > 0:
            err.write(
                f"session {client.session_id}: {client.turns} turn(s), {client.sent_seconds:.1f} s of audio "
                f"in {time.monotonic() - client.started:.1f} s\n"
            )


class StreamClient:
    """One streaming run: a sender paced by the engine's progress, and a printing receiver."""

    def __init__(self, source: AudioSource, *, url: str, token: str, realtime: bool, max_ahead: float,
                 json_lines: bool, out: TextIO, err: TextIO, progress: bool) -> None:
        self.source = source
        self.url = url
        self.token = token
        self.realtime = realtime
        self.max_ahead = max_ahead
        self.json_lines = json_lines
        self.out = out
        self.err = err
        self.progress = progress
        self.bytes_per_second = source.rate * 2
        self.session_id = ""
        self.connection_id = ""
        self.turns = 0
        self.sent_seconds = 0.0
        self.engine_seconds = 0.0
        self.error = ""
        self.started = time.monotonic()
        self.bar: tqdm | None = None
        self.caught_up = asyncio.Event()

    def emit(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.clear()
            self.out.write(line + "\n")
            self.out.flush()
            self.bar.refresh()
        else:
            self.out.write(line + "\n")
            self.out.flush()

    def note(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=self.err)
        else:
            self.err.write(line + "\n")

    async def run(self) -> None:
        import websockets

        headers = {"Authorization": f"Token {self.token}"} if self.token else {}
        async with websockets.connect(self.url, additional_headers=headers, max_size=None, compression=None) as ws:
            hello = json.loads(await ws.recv())
            if self.json_lines:
                self.emit(json.dumps(hello))
            if hello.get("type") != "Connected":
                self.error = f"{hello.get('code', 'ERROR')}: {hello.get('description', hello)}"
                return
            self.session_id = hello["session_id"]
            self.connection_id = hello.get("connection_id", "")
            self.note(f"session {self.session_id}{' (resumed)' if hello.get('resumed') else ''}")
            self.bar = tqdm(
                total=self.source.seconds or None, unit="s", unit_scale=False,
                desc="audio", file=self.err, disable=not self.progress, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]{postfix}"
                if self.source.seconds else None,
            )
            self.started = time.monotonic()
            receiver = asyncio.create_task(self.receive(ws))
            try:
                try:
                    await self.send(ws)
                    await ws.send(json.dumps({"type": "CloseStream"}))
                except websockets.ConnectionClosed:
                    pass  # the relay closed first (an Error, or the session ended); the receiver has it
                await receiver
            finally:
                receiver.cancel()
                self.bar.close()
            if ws.close_code not in (1000, None) and not self.error:
                self.error = f"the relay closed the stream with code {ws.close_code} {ws.close_reason or ''}".strip()

    async def send(self, ws: Any) -> None:
        loop = asyncio.get_running_loop()
        chunks = self.source.chunks()
        while True:
            chunk = await loop.run_in_executor(None, next, chunks, None)
            if chunk is None or self.error:
                if chunk is None and self.bar is not None and self.bar.total:
                    self.bar.n = self.bar.total  # float sums of chunk lengths fall a hair short
                    self.bar.refresh()
                return
            await self.wait_for_room()
            await ws.send(chunk)
            seconds = len(chunk) / self.bytes_per_second
            self.sent_seconds += seconds
            if self.bar is not None:
                self.bar.update(seconds)

    async def wait_for_room(self) -> None:
        """Realtime: pace by the clock. Otherwise: stay within max_ahead of the engine or the clock."""
        if self.realtime:
            delay = self.sent_seconds - (time.monotonic() - self.started)
            if delay > 0:
                await asyncio.sleep(delay)
            return
        while True:
            elapsed = time.monotonic() - self.started
            delay = self.sent_seconds - max(self.engine_seconds, elapsed) - self.max_ahead
            if delay <= 0:
                return
            self.caught_up.clear()
            try:
                await asyncio.wait_for(self.caught_up.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def receive(self, ws: Any) -> None:
        import websockets

        try:
            async for raw in ws:
                msg = json.loads(raw)
                if self.json_lines:
                    self.emit(raw if isinstance(raw, str) else raw.decode())
                kind = msg.get("type")
                if kind == "TurnInfo":
                    self.on_turn(msg)
                elif kind == "Error":
                    self.error = f"{msg.get('code')}: {msg.get('description')}"
                elif kind == "Warning" and not self.json_lines:
                    self.note(f"warning {msg.get('code')}: {msg.get('description')}")
        except websockets.ConnectionClosed:
            pass

    def on_turn(self, msg: dict[str, Any]) -> None:
        own = (msg.get("speaker") or "") in ("", self.connection_id)
        if own and not msg.get("replayed"):
            self.engine_seconds = max(self.engine_seconds, float(msg.get("audio_window_end") or 0.0))
            self.caught_up.set()
        if msg.get("event") == "EndOfTurn":
            self.turns += 1
            if not self.json_lines:
                tags = [t for t, on in (("replayed", msg.get("replayed")), ("other speaker", not own)) if on]
                suffix = f"  ({', '.join(tags)})" if tags else ""
                self.emit(f"[{msg.get('turn_index')}] {msg.get('transcript', '')}{suffix}")
            if self.bar is not None:
                self.bar.set_postfix_str("")
        elif self.bar is not None and msg.get("transcript"):
            self.bar.set_postfix_str(msg["transcript"][-40:])
