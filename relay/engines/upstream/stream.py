"""Upstream Flux engines: the relay as a client of Deepgram Flux (or anything that speaks it).

Split the way python-websockets splits protocol from I/O:

* sans-I/O pieces, testable without sockets: :func:`flux_query` (the client's options as query
  parameters), :func:`parse_server_message` (upstream JSON -> :class:`ServerMessage`),
  :class:`AudioLog` (the bounded buffer of audio the upstream has not answered for) and
  :class:`TurnMapper` (the stream's own turn numbers across reconnects and a fallback);
* :class:`UpstreamStream`, the I/O: one task per stream that connects, replays, relays, watches
  for stalls and reconnects, and finally hands the stream to a fallback engine.

The reconnect loop is the relay's own rather than ``async for ws in connect(...)`` because it
must refuse to retry 401/403, resend unanswered audio on every new connection, count an outage
towards the fallback limit, and take its backoff from settings (websockets reads its backoff from
process-wide environment variables). docs/upstream.md explains the choices.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from relay.flux.audio import to_int16
from relay.exceptions import ConfigureRejected, EngineError, EngineUnavailable, RelayError, UpstreamAuthFailed

from relay.engines.base import TRIGGER_END_OF_STREAM, Engine, EngineStream, EngineWarning, StreamOptions, TurnEvent, Word

log = logging.getLogger("relay.upstream")

#: The websockets library logs every handshake header at DEBUG, Authorization included. Its
#: connections get this logger, which never goes below INFO whatever RELAY_LOG_LEVEL says.
wire_log = logging.getLogger("relay.upstream.wire")
wire_log.setLevel(logging.INFO)

# Warning codes sent to the client (docs/upstream.md).
RECONNECTING = "UPSTREAM_RECONNECTING"
RECONNECTED = "UPSTREAM_RECONNECTED"
AUDIO_LOST = "UPSTREAM_AUDIO_LOST"
FALLBACK = "UPSTREAM_FALLBACK"

TURN_EVENTS = frozenset({"StartOfTurn", "Update", "EagerEndOfTurn", "TurnResumed", "EndOfTurn"})
#: Upstream Error codes (and close codes) that mean "your credentials", so retrying cannot help.
AUTH_ERROR_CODES = frozenset({"UNAUTHORIZED", "FORBIDDEN", "INVALID_AUTH", "UPSTREAM_AUTH_FAILED"})
AUTH_CLOSE_CODES = frozenset({4001, 4003})

KEEPALIVE = json.dumps({"type": "KeepAlive"})
CLOSE_STREAM = json.dumps({"type": "CloseStream"})
FORCE_END_TURN = json.dumps({"type": "ForceEndTurn"})

#: Speech-loud audio this far past the upstream's last reported audio_window_end is "unanswered".
UNANSWERED_SLACK_SECONDS = 0.5
#: Audio kept before a turn's start when it is replayed, so the upstream hears the onset.
TURN_LEAD_SECONDS = 1.0


# --- configuration and secrets -------------------------------------------------------------------
class Secret:
    """A credential that never prints: repr/str are masked, :meth:`reveal` builds the header."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Timeouts and limits for one stream, from RELAY_UPSTREAM_* settings or engine OPTIONS."""

    connect_timeout: float = 10.0
    stall_seconds: float = 5.0
    keepalive_seconds: float = 4.0
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    fallback_after: float = 30.0
    fallback_engine: str = "whisper"
    replay_seconds: float = 30.0
    close_timeout: float = 5.0
    speech_rms: float = 500.0

    SETTINGS: ClassVar[dict[str, str]] = {
        "connect_timeout": "RELAY_UPSTREAM_CONNECT_TIMEOUT_SECONDS",
        "stall_seconds": "RELAY_UPSTREAM_STALL_SECONDS",
        "keepalive_seconds": "RELAY_UPSTREAM_KEEPALIVE_SECONDS",
        "backoff_initial": "RELAY_UPSTREAM_BACKOFF_INITIAL_SECONDS",
        "backoff_max": "RELAY_UPSTREAM_BACKOFF_MAX_SECONDS",
        "fallback_after": "RELAY_UPSTREAM_FALLBACK_AFTER_SECONDS",
        "fallback_engine": "RELAY_UPSTREAM_FALLBACK_ENGINE",
        "replay_seconds": "RELAY_UPSTREAM_REPLAY_SECONDS",
        "close_timeout": "RELAY_UPSTREAM_CLOSE_TIMEOUT_SECONDS",
        "speech_rms": "RELAY_UPSTREAM_SPEECH_RMS",
    }

    @classmethod
    def resolve(cls, overrides: Mapping[str, Any]) -> "UpstreamConfig":
        """Engine OPTIONS win over settings, settings over the defaults above."""
        values: dict[str, Any] = {}
        for name, setting in cls.SETTINGS.items():
            if name in overrides:
                values[name] = overrides[name]
            elif hasattr(settings, setting):
                values[name] = getattr(settings, setting)
        return cls(**values)

    def backoff(self, attempt: int) -> float:
        """Delay before reconnect ``attempt`` (0 = at once: most drops are one-off)."""
        if attempt <= 0:
            return 0.0
        delay = min(self.backoff_initial * 2 ** (attempt - 1), self.backoff_max)
        return delay * random.uniform(0.8, 1.0)


# --- sans-I/O: query parameters, server messages ---------------------------------------------------
def _number(value: float | int) -> str:
    return format(value, "g")


def flux_query(options: StreamOptions, *, include_model: bool = True) -> str:
    """The client's Flux parameters, passed through to the upstream."""
    pairs: list[tuple[str, str]] = []
    if include_model:
        pairs.append(("model", options.model))
    pairs += [("encoding", options.encoding), ("sample_rate", str(options.sample_rate))]
    for name in ("eot_threshold", "eager_eot_threshold", "eot_timeout_ms"):
        value = getattr(options, name)
        if value is not None:
            pairs.append((name, _number(value)))
    pairs += [("keyterm", term) for term in options.keyterms]
    for name in ("tag", "mip_opt_out"):
        pairs += [(name, value) for value in options.extra.get(name, [])]
    return urlencode(pairs)


def with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query and query else parts.query or query
    return urlunsplit(parts._replace(query=joined))


def loggable_url(url: str) -> str:
    """scheme://host/path: no credentials, no query (keyterms are the client's words)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class BadUpstreamMessage(ValueError):
    """An upstream text frame that is not a Flux message we can use (logged and skipped)."""


@dataclass(slots=True)
class ServerMessage:
    type: str
    data: dict[str, Any]
    event: TurnEvent | None = None


def _finite(data: dict[str, Any], name: str, default: float | None = None) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadUpstreamMessage(f"{name} is not a number")
    return float(value)


def _words(raw: Any) -> list[Word]:
    if not isinstance(raw, list):
        raise BadUpstreamMessage("words is not a list")
    words = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("word"), str):
            raise BadUpstreamMessage("a word is malformed")
        start = _finite(item, "start") if item.get("start") is not None else None
        end = _finite(item, "end") if item.get("end") is not None else None
        words.append(Word(item["word"], _finite(item, "confidence", 0.0), start, end))
    return words


def parse_server_message(text: str) -> ServerMessage:
    """Parse one upstream text frame; raises BadUpstreamMessage for anything unusable."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise BadUpstreamMessage("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise BadUpstreamMessage("not an object with a type")
    if data["type"] != "TurnInfo":
        return ServerMessage(data["type"], data)
    event = data.get("event")
    if event not in TURN_EVENTS:
        raise BadUpstreamMessage("unknown TurnInfo event")
    turn = data.get("turn_index")
    if isinstance(turn, bool) or not isinstance(turn, (int, float)) or turn < 0 or turn != int(turn):
        raise BadUpstreamMessage("turn_index is not a whole number")
    transcript = data.get("transcript", "")
    if not isinstance(transcript, str):
        raise BadUpstreamMessage("transcript is not a string")
    trigger = data.get("trigger")
    languages = data.get("languages")
    return ServerMessage(
        "TurnInfo",
        data,
        TurnEvent(
            event=event,
            turn=int(turn),
            transcript=transcript,
            words=_words(data.get("words", [])),
            audio_window_start=_finite(data, "audio_window_start"),
            audio_window_end=_finite(data, "audio_window_end"),
            end_of_turn_confidence=_finite(data, "end_of_turn_confidence", 0.0),
            trigger=trigger if isinstance(trigger, str) else None,
            languages=[x for x in languages if isinstance(x, str)] if isinstance(languages, list) else None,
        ),
    )


def shift(event: TurnEvent, seconds: float) -> TurnEvent:
    """The event with its times moved from a connection's clock to the stream's."""
    if not seconds:
        return event

    def at(t: float | None) -> float | None:
        return None if t is None else round(t + seconds, 3)

    return dataclasses.replace(
        event,
        audio_window_start=round(event.audio_window_start + seconds, 3),
        audio_window_end=round(event.audio_window_end + seconds, 3),
        words=[Word(w.word, w.confidence, at(w.start), at(w.end)) for w in event.words],
    )


# --- sans-I/O: the replay buffer -------------------------------------------------------------------
class AudioLog:
    """Audio the upstream has not answered for, as the client's frames at absolute byte positions.

    ``commit(pos)`` says audio before ``pos`` needs no resend (a turn ended there, or it is old
    silence). The log never holds more than ``max_bytes``; past that the oldest audio goes, and
    :attr:`lost` says how much of it had not been answered for.
    """

    def __init__(self, *, max_bytes: int, width: int) -> None:
        self.max_bytes = max(max_bytes, width)
        self.width = width
        self.base = 0  # absolute position of the first byte held
        self.fed = 0  # absolute position after the last byte held
        self.answered = 0  # highest position committed
        self._chunks: deque[bytes] = deque()

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self.fed += len(data)
        while self.fed - self.base > self.max_bytes and len(self._chunks) > 1:
            self.base += len(self._chunks.popleft())

    def commit(self, pos: int) -> None:
        pos = min(pos - pos % self.width, self.fed)
        self.answered = max(self.answered, pos)
        while self._chunks and self.base + len(self._chunks[0]) <= pos:
            self.base += len(self._chunks.popleft())
        if self._chunks and self.base < pos:
            self._chunks[0] = self._chunks[0][pos - self.base :]
            self.base = pos

    def clear(self) -> None:
        self._chunks.clear()
        self.base = self.answered = self.fed

    def chunks(self) -> list[bytes]:
        return list(self._chunks)

    @property
    def size(self) -> int:
        return self.fed - self.base

    @property
    def lost(self) -> int:
        """Bytes dropped for space before they were answered for."""
        return max(0, self.base - self.answered)


# --- sans-I/O: turn numbering ----------------------------------------------------------------------
class TurnMapper:
    """Maps a source's turns (an upstream connection, a fallback stream) onto the stream's own.

    Every new source numbers its turns from 0 again. The stream's counter only grows, so the
    consumer's session-wide turn_index stays monotonic. When a source starts while a turn is open,
    its first turn continues that turn (the replayed audio holds it): the repeated StartOfTurn and
    Updates that only repeat words already shown are dropped, so the client sees the turn go on.
    """

    def __init__(self) -> None:
        self.turn = 0
        self.open = False
        self.last: TurnEvent | None = None
        self._source_turn: int | None = None
        self._resume = False
        self._catching_up = False
        self._shown = 0

    def new_source(self) -> None:
        self._source_turn = None
        self._resume = self.open
        self._catching_up = False

    def map(self, event: TurnEvent, *, skipped_trigger: str = "model") -> list[TurnEvent]:
        out: list[TurnEvent] = []
        if event.turn != self._source_turn:
            self._source_turn = event.turn
            if self.open and self._resume:
                self._catching_up = True
            elif self.open:  # the source moved on without an EndOfTurn we could read
                out += self.close(skipped_trigger)
            self._resume = False
        if self._catching_up:
            if event.event == "StartOfTurn" or (event.event == "Update" and len(event.words) <= self._shown):
                return out
            self._catching_up = False
        if not self.open:
            self.open = True
            self._shown = 0
        mapped = dataclasses.replace(event, turn=self.turn)
        out.append(mapped)
        self._shown = max(self._shown, len(mapped.words))
        if event.event == "EndOfTurn":
            self._end()
        else:
            self.last = mapped
        return out

    def close(self, trigger: str) -> list[TurnEvent]:
        """End the open turn with what was last said (upstream Flux sends no EndOfTurn on close)."""
        if not self.open:
            return []
        last = self.last or TurnEvent(event="Update", turn=self.turn)
        end = dataclasses.replace(last, event="EndOfTurn", turn=self.turn, trigger=trigger)
        self._end()
        return [end]

    def _end(self) -> None:
        self.open = False
        self.last = None
        self._shown = 0
        self._catching_up = False
        self.turn += 1


# --- I/O -------------------------------------------------------------------------------------------
class _Stalled(Exception):
    """The upstream stopped answering."""


class _Dropped(Exception):
    """The upstream connection ended under us."""


class _Rejected(Exception):
    """The upstream refused the request for good (a 4xx other than auth, timeout, rate limit)."""


@dataclass(eq=False)
class _Link:
    """One upstream connection and what it has and has not answered for."""

    ws: ClientConnection
    start: int  # absolute byte position of the first byte sent on it
    offset: float  # the same in seconds
    opened_at: float
    sent: int = 0
    processed: int = 0  # absolute end of the last audio window it reported
    up_open: bool = False  # it reported a turn that has not ended
    audio_since_message: bool = False
    clock: float | None = None  # since when it owes an answer
    probe_at: float | None = None
    probe_pos: int = 0
    answered: bool = False  # it sent a TurnInfo or a Configure reply
    close_sent: bool = False
    last_send: float = 0.0
    request_id: str = ""
    configures: deque[tuple[asyncio.Future, bool]] = field(default_factory=deque)


class UpstreamStream(EngineStream):
    """A client stream relayed to an upstream Flux service, surviving its failures."""

    engine: "UpstreamEngine"

    def __init__(self, engine: "UpstreamEngine", options: StreamOptions) -> None:
        super().__init__(engine, options)
        self.config = engine.config()
        self.bps = options.bytes_per_second
        self.width = options.sample_width
        self.rate = options.sample_rate
        self.log = AudioLog(max_bytes=int(self.config.replay_seconds * self.bps), width=self.width)
        self.turns = TurnMapper()
        self._outbox: deque[bytes | str] = deque()
        self._outbox_bytes = 0
        self._wake = asyncio.Event()
        self._link: _Link | None = None
        self._task: asyncio.Task | None = None
        self._started: asyncio.Future | None = None
        self._finishing = False
        self._failed = False
        self._force_pos: int | None = None
        self._loud_end = 0
        self._loud_limit = self.config.speech_rms**2
        self._preroll = int((2 * self.config.stall_seconds + TURN_LEAD_SECONDS) * self.rate) * self.width
        self._last_link: _Link | None = None
        self._fallback: EngineStream | None = None
        self._fallback_pump: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    # -- engine interface -------------------------------------------------------------------------
    async def start(self) -> list[EngineWarning]:
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._task = loop.create_task(self._run())
        self._task.add_done_callback(self._run_ended)
        await asyncio.wait({self._started, self._task}, timeout=self.config.connect_timeout + 1, return_when=asyncio.FIRST_COMPLETED)
        if not self._started.done():
            self._started.cancel()  # still trying: later failures reach the client as events
        elif self._started.exception() is not None:
            raise self._started.exception()  # type: ignore[misc]
        return self.engine.option_warnings(self.options)

    def feed(self, audio: bytes) -> None:
        if self._fallback is not None:
            self._fallback.feed(audio)
            return
        if not audio or self._failed:
            return
        self.log.append(audio)
        if self._is_loud(audio):
            self._loud_end = self.log.fed
        if self._link is not None:
            self._outbox.append(audio)
            self._outbox_bytes += len(audio)
            self._wake.set()
        if self._link is not None and not self.turns.open:
            # With no turn open, audio sent more than two stall limits ago was silence to a live
            # upstream (it would have started a turn, or the watchdog would have declared it
            # stalled, by now): no need to resend it. During an outage nothing is dropped but
            # by the replay buffer's own bound.
            self.log.commit(self._link.sent - self._preroll)

    @property
    def backlog_seconds(self) -> float:
        if self._fallback is not None:
            return self._fallback.backlog_seconds
        return self._outbox_bytes / self.bps if self._link is not None else 0.0

    async def force_end_turn(self) -> None:
        if self._fallback is not None:
            await self._fallback.force_end_turn()
            return
        if self._link is None:
            if self.turns.open:  # reconnecting: end the turn with what the upstream said so far
                self._end_open_turn("manual", at=self.log.fed)
            return
        if self.turns.open:
            self._force_pos = self.log.fed
        self._send_text(FORCE_END_TURN)

    async def configure(self, thresholds: dict[str, Any], keyterms: list[str] | None) -> list[EngineWarning]:
        if self._fallback is not None:
            warnings = await self._fallback.configure(thresholds, keyterms)
            await super().configure(thresholds, keyterms)  # the consumer reports our options
            return warnings
        before = {name: getattr(self.options, name) for name in thresholds}
        old_keyterms = list(self.options.keyterms)
        # Applied locally first: a reconnect sends the new values as query parameters.
        await super().configure(thresholds, keyterms)
        link = self._link
        if link is None:
            return []
        body: dict[str, Any] = {"type": "Configure"}
        if thresholds:
            body["thresholds"] = thresholds
        if keyterms is not None:
            body["keyterms"] = keyterms
        reply: asyncio.Future = asyncio.get_running_loop().create_future()
        link.configures.append((reply, False))
        self._send_text(json.dumps(body))
        try:
            rejected = await asyncio.wait_for(asyncio.shield(reply), self.config.stall_seconds)
        except asyncio.TimeoutError:
            return []  # unconfirmed; a silent upstream is the stall watchdog's business
        if rejected is not None:
            for name, value in before.items():
                setattr(self.options, name, value)
            self.options.keyterms = old_keyterms
            raise ConfigureRejected(rejected)
        return []

    async def finish(self) -> None:
        self._finishing = True
        self._wake.set()
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), self.config.close_timeout)
            except asyncio.TimeoutError:
                log.warning("upstream_flush_incomplete engine=%s timeout=%.1fs", self.engine.alias, self.config.close_timeout)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._fallback is not None:
            await self._fallback.finish()
            if self._fallback_pump is not None:
                await self._fallback_pump
        self._emit_all(self.turns.close(TRIGGER_END_OF_STREAM))
        self.end()

    async def abort(self) -> None:
        for task in (self._task, self._fallback_pump):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._fallback is not None:
            await self._fallback.abort()
        self.end()

    # -- helpers ----------------------------------------------------------------------------------
    def _is_loud(self, audio: bytes) -> bool:
        samples = to_int16(audio, self.options.encoding).astype(np.float32)
        return bool(samples.size) and float(np.dot(samples, samples)) / samples.size > self._loud_limit

    def _pos(self, link: _Link, seconds: float) -> int:
        return link.start + int(round(seconds * self.rate)) * self.width

    def _send_text(self, text: str) -> None:
        self._outbox.append(text)
        self._wake.set()

    def _emit_all(self, events: list[TurnEvent]) -> None:
        for event in events:
            self.emit(event)

    def _end_open_turn(self, trigger: str, *, at: int) -> None:
        self._emit_all(self.turns.close(trigger))
        self._force_pos = None
        self.log.commit(at)

    def _owes_answer(self, link: _Link) -> bool:
        """Audio the upstream should have answered: more audio in an open turn (Flux sends an
        Update about every 0.25 s), or speech-loud audio past its last reported window."""
        slack = int(UNANSWERED_SLACK_SECONDS * self.rate) * self.width
        return (link.up_open and link.audio_since_message) or min(self._loud_end, link.sent) - link.processed > slack

    def _warn(self, code: str, description: str) -> None:
        self.emit(EngineWarning(code, description))

    def _signal_started(self, exc: BaseException | None = None) -> None:
        if self._started is not None and not self._started.done():  # start() is waiting
            if exc is None:
                self._started.set_result(None)
            else:
                self._started.set_exception(exc)
        elif exc is not None:
            self._failed = True
            self.emit(exc)

    def _run_ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("upstream_failed engine=%s", self.engine.alias, exc_info=task.exception())
        self._signal_started(EngineError())

    # -- the connection loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        alias, url = self.engine.alias, self.engine.loggable_url()
        attempt = 0
        outage_since: float | None = None
        warned = False
        while True:
            if outage_since is not None and loop.time() - outage_since >= self.config.fallback_after:
                self._signal_started()
                await self._switch_to_fallback(loop.time() - outage_since)
                return
            if outage_since is not None:
                await asyncio.sleep(self.config.backoff(attempt))
                attempt += 1
            try:
                ws = await self._connect()
            except UpstreamAuthFailed as exc:
                log.warning("upstream_auth_failed engine=%s url=%s", alias, url)
                self._signal_started(exc)
                return
            except _Rejected as exc:
                log.warning("upstream_rejected engine=%s url=%s status=%s", alias, url, exc)
                self._signal_started()
                await self._switch_to_fallback(0.0, reason=f"refused the stream (HTTP {exc})")
                return
            except InvalidURI:
                log.error("upstream_bad_url engine=%s", alias)
                self._signal_started(EngineUnavailable(f"The {alias} engine's upstream URL is not valid."))
                return
            except (OSError, asyncio.TimeoutError, WebSocketException) as exc:
                status = getattr(getattr(exc, "response", None), "status_code", "")
                log.warning("upstream_connect_failed engine=%s url=%s error=%s status=%s attempt=%d", alias, url, type(exc).__name__, status, attempt)
                self._signal_started()
                if outage_since is None:
                    outage_since = loop.time()
                if not warned:
                    self._warn(RECONNECTING, "The upstream speech service cannot be reached; retrying. Audio is kept and will be sent when it is back.")
                    warned = True
                continue
            self._signal_started()
            replay = self.log.size / self.bps
            if warned:
                lost = self.log.lost / self.bps
                down = loop.time() - outage_since if outage_since is not None else 0.0
                self._warn(RECONNECTED, f"Reconnected to the upstream speech service after {down:.1f} s; resent {replay:.1f} s of audio.")
                if lost:
                    self._warn(AUDIO_LOST, f"{lost:.1f} s of audio from the outage was more than the replay buffer holds and was not transcribed.")
                warned = False
            log.info("upstream_connected engine=%s url=%s attempt=%d replay=%.2fs", alias, url, attempt, replay)
            opened = loop.time()
            try:
                link = await self._serve(ws)
            except UpstreamAuthFailed as exc:
                log.warning("upstream_auth_failed engine=%s url=%s", alias, url)
                self._signal_started(exc)
                return
            except (_Stalled, _Dropped) as exc:
                kind = "stalled" if isinstance(exc, _Stalled) else "dropped"
                link = self._last_link
                healthy = link is not None and (link.answered or (kind == "dropped" and loop.time() - opened >= self.config.stall_seconds))
                log.warning("upstream_lost engine=%s url=%s reason=%s detail=%r healthy=%s", alias, url, kind, str(exc), healthy)
                if healthy or outage_since is None:
                    outage_since = loop.time()
                    attempt = 0
                self._warn(RECONNECTING, f"The upstream speech service {'stopped answering' if kind == 'stalled' else 'connection dropped'}; reconnecting. No audio is lost.")
                warned = True
                continue
            log.info("upstream_closed engine=%s url=%s request_id=%s", alias, url, link.request_id)
            return

    async def _connect(self) -> ClientConnection:
        cfg = self.config
        try:
            return await connect(
                self.engine.url_for(self.options),
                additional_headers={"Authorization": self.engine.authorization()},
                open_timeout=cfg.connect_timeout,
                ping_interval=cfg.keepalive_seconds,
                ping_timeout=cfg.stall_seconds,
                close_timeout=1.0,
                max_size=2**22,
                compression=None,
                logger=wire_log,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise UpstreamAuthFailed(f"The upstream speech service rejected the relay's credentials (HTTP {status}).") from None
            if 400 <= status < 500 and status not in (408, 429):
                raise _Rejected(status) from None
            raise

    async def _serve(self, ws: ClientConnection) -> _Link:
        """Relay over one connection until it closes after CloseStream (returned) or fails (raised)."""
        loop = asyncio.get_running_loop()
        if self._force_pos is not None and self.turns.open:
            # A ForceEndTurn the last connection never answered: honour it before replaying.
            self._end_open_turn("manual", at=self._force_pos)
        link = _Link(ws=ws, start=self.log.base, offset=self.log.base / self.bps, opened_at=loop.time())
        link.sent = link.processed = link.start
        link.last_send = loop.time()
        self._last_link = link
        self._outbox = deque(self.log.chunks())
        self._outbox_bytes = self.log.size
        self.turns.new_source()
        self._link = link
        tasks = [
            loop.create_task(self._read(link)),
            loop.create_task(self._write(link)),
            loop.create_task(self._watch(link)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            self._link = None
            self._outbox.clear()
            self._outbox_bytes = 0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for reply, _probe in link.configures:
                if not reply.done():
                    reply.set_result(None)  # the next connection carries the values in its query
            if ws.state.name != "CLOSED":
                closing = loop.create_task(ws.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def _read(self, link: _Link) -> _Link:
        loop = asyncio.get_running_loop()
        try:
            async for raw in link.ws:
                if isinstance(raw, bytes):
                    continue
                try:
                    msg = parse_server_message(raw)
                except BadUpstreamMessage as exc:
                    log.warning("upstream_bad_message engine=%s reason=%r chars=%d", self.engine.alias, str(exc), len(raw))
                else:
                    self._on_message(link, msg)
                link.audio_since_message = False
                link.clock = loop.time() if self._owes_answer(link) else None
        except ConnectionClosed:
            pass  # a close without a clean handshake: judged below like any other
        code = link.ws.close_code
        if code in AUTH_CLOSE_CODES:
            raise UpstreamAuthFailed()
        if not link.close_sent or code not in (1000, 1001):
            raise _Dropped(f"closed by the upstream ({code})")
        return link

    def _on_message(self, link: _Link, msg: ServerMessage) -> None:
        if msg.event is not None:
            self._on_turn_info(link, msg.event)
        elif msg.type in ("ConfigureSuccess", "ConfigureFailure"):
            link.answered = True
            if link.configures:
                reply, probe = link.configures.popleft()
                if probe:
                    link.probe_at = None
                    link.processed = max(link.processed, link.probe_pos)
                elif not reply.done():
                    reply.set_result(None if msg.type == "ConfigureSuccess" else str(msg.data.get("description") or "The upstream refused the configuration."))
        elif msg.type == "Connected":
            link.request_id = str(msg.data.get("request_id", ""))[:64]
        elif msg.type == "Warning":
            code, description = msg.data.get("code"), msg.data.get("description")
            if isinstance(code, str) and isinstance(description, str):
                self._warn(code[:64], description[:500])
        elif msg.type == "Error":
            code = str(msg.data.get("code", ""))[:64]
            log.warning("upstream_error engine=%s code=%s", self.engine.alias, code)
            if code in AUTH_ERROR_CODES:
                raise UpstreamAuthFailed()
            raise _Dropped(f"upstream error {code}")

    def _on_turn_info(self, link: _Link, event: TurnEvent) -> None:
        link.answered = True
        link.probe_at = None  # it is transcribing: alive
        end = self._pos(link, event.audio_window_end)
        link.processed = max(link.processed, end)
        link.up_open = event.event != "EndOfTurn"
        was_open = self.turns.open
        trigger = "manual" if self._force_pos is not None else "model"
        self._emit_all(self.turns.map(shift(event, link.offset), skipped_trigger=trigger))
        if not was_open and self.turns.open:
            lead = int(TURN_LEAD_SECONDS * self.rate) * self.width
            self.log.commit(self._pos(link, event.audio_window_start) - lead)
        if event.event == "EndOfTurn":
            self._force_pos = None
            self.log.commit(end)

    async def _write(self, link: _Link) -> None:
        try:
            await self._write_loop(link)
        except ConnectionClosed:
            raise _Dropped("send failed: the connection is closed") from None

    async def _write_loop(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        ws = link.ws
        while True:
            self._wake.clear()
            while self._outbox:
                item = self._outbox.popleft()
                if isinstance(item, bytes):
                    self._outbox_bytes -= len(item)
                    await ws.send(item)
                    link.sent += len(item)
                    link.audio_since_message = True
                    if link.clock is None and self._owes_answer(link):
                        link.clock = loop.time()
                else:
                    await ws.send(item)
                link.last_send = loop.time()
            if self._finishing and not link.close_sent:
                await ws.send(CLOSE_STREAM)
                link.close_sent = True
            idle = loop.time() - link.last_send
            try:
                await asyncio.wait_for(self._wake.wait(), max(self.config.keepalive_seconds - idle, 0.001))
            except asyncio.TimeoutError:
                if not link.close_sent:
                    # The client is silent: keep the upstream from closing an idle connection.
                    await ws.send(KEEPALIVE)
                    link.last_send = loop.time()

    async def _watch(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        stall = self.config.stall_seconds
        while True:
            await asyncio.sleep(stall / 5)
            now = loop.time()
            if link.probe_at is not None:
                if now - link.probe_at >= stall:
                    raise _Stalled("no answer to a liveness probe")
                continue
            if link.clock is None or now - link.clock < stall:
                continue
            if link.up_open:
                raise _Stalled(f"no update for {now - link.clock:.1f} s inside a turn")
            # Loud audio and no turn: stalled, or the upstream heard noise rather than speech. A
            # Configure that changes nothing must be answered by a live upstream: ask.
            eot = self.options.eot_threshold if self.options.eot_threshold is not None else 0.7
            reply: asyncio.Future = loop.create_future()
            link.configures.append((reply, True))
            link.probe_at, link.probe_pos = now, link.sent
            self._send_text(json.dumps({"type": "Configure", "thresholds": {"eot_threshold": eot}}))

    # -- fallback ---------------------------------------------------------------------------------
    async def _switch_to_fallback(self, down: float, *, reason: str = "") -> None:
        from relay.engines import get_engine

        alias = self.config.fallback_engine
        why = reason or f"has been unreachable for {down:.1f} s"
        try:
            if not alias or alias == self.engine.alias:
                raise EngineUnavailable("no fallback engine is configured")
            engine = get_engine(alias)
            if self.options.encoding not in engine.supported_encodings():
                raise EngineUnavailable(f"{alias} does not accept {self.options.encoding}")
            options = dataclasses.replace(
                self.options, keyterms=list(self.options.keyterms), extra=dict(self.options.extra), explicit=set(self.options.explicit)
            )
            stream = engine.open_stream(options)
            try:
                warnings = await stream.start()
            except BaseException:
                await stream.abort()
                raise
        except RelayError as exc:
            log.error("upstream_fallback_failed engine=%s fallback=%s error=%r", self.engine.alias, alias, exc.description)
            self._failed = True
            self.emit(EngineUnavailable(f"The upstream speech service {why} and no fallback engine is available."))
            return
        log.warning("upstream_fallback engine=%s fallback=%s reason=%r replay=%.2fs", self.engine.alias, alias, why, self.log.size / self.bps)
        if self._force_pos is not None and self.turns.open:
            self._end_open_turn("manual", at=self._force_pos)
        self._warn(FALLBACK, f"The upstream speech service {why}; this stream continues on the {alias!r} engine.")
        for warning in warnings:
            self.emit(warning)
        self.turns.new_source()
        self._fallback_pump = asyncio.get_running_loop().create_task(self._pump_fallback(stream, self.log.base / self.bps))
        self._fallback = stream
        for chunk in self.log.chunks():
            stream.feed(chunk)
        self.log.clear()

    async def _pump_fallback(self, stream: EngineStream, offset: float) -> None:
        try:
            async for item in stream.events():
                if isinstance(item, EngineWarning):
                    self.emit(item)
                else:
                    self._emit_all(self.turns.map(shift(item, offset)))
        except RelayError as exc:
            self.emit(exc)


class UpstreamEngine(Engine):
    """Base for engines that relay to a Flux service; subclasses say where and how to sign in."""

    name = "upstream"
    stream_class = UpstreamStream
    #: ``Authorization: <scheme> <secret>``.
    auth_scheme: ClassVar[str] = "Token"
    #: Whether the upstream takes a ``model`` query parameter.
    sends_model: ClassVar[bool] = True

    def __init__(self, alias: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(alias, options)
        # A key given in OPTIONS leaves the options dict at once, so nothing that shows engine
        # options (health checks, debug pages) can print it.
        key = self.options.pop("api_key", None)
        self._key_override = Secret(key) if key else None

    # -- what subclasses provide --------------------------------------------------------------------
    def endpoint(self) -> str:
        """The upstream WebSocket URL without query; raise EngineUnavailable if not configured."""
        raise NotImplementedError

    def secret(self) -> Secret:
        """The credential; raise EngineUnavailable when it is missing."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------
    def config(self) -> UpstreamConfig:
        return UpstreamConfig.resolve(self.options)

    def url_for(self, options: StreamOptions) -> str:
        return with_query(self.endpoint(), flux_query(options, include_model=self.sends_model))

    def loggable_url(self) -> str:
        try:
            return loggable_url(self.endpoint())
        except EngineUnavailable:
            return "-"

    def authorization(self) -> str:
        return f"{self.auth_scheme} {self.secret().reveal()}"

    def option_warnings(self, options: StreamOptions) -> list[EngineWarning]:
        """Warnings about options this upstream cannot honour (sent after Connected)."""
        return []

    def open_stream(self, options: StreamOptions) -> EngineStream:
        self.endpoint()
        self.secret()
        return super().open_stream(options)

    def readiness(self) -> tuple[bool, str]:
        try:
            self.endpoint()
            self.secret()
        except EngineUnavailable as exc:
            return False, exc.description
        return True, f"relays to {self.loggable_url()}"
