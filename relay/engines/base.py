"""The engine interface: audio in, turn events out.

An *engine* is built once per process per alias (it owns shared things: a loaded model, a worker
pool, upstream credentials). For every client stream it opens an :class:`EngineStream`, which
takes audio with :meth:`EngineStream.feed` and yields :class:`TurnEvent` (and
:class:`EngineWarning`) objects from :meth:`EngineStream.events`. Engines know nothing about
WebSockets, channel layers or the ORM; the consumer maps their turns onto session-wide indexes.

Turn numbering inside an engine is local (``TurnEvent.turn``); only its changes matter.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from relay.flux import audio
from relay.flux.constants import DEFAULT_MODEL

EventName = Literal["StartOfTurn", "Update", "EagerEndOfTurn", "TurnResumed", "EndOfTurn"]

#: Trigger on the EndOfTurn the relay emits when a stream ends with a turn still open
#: (CloseStream, clean close, abrupt drop). Documented in docs/protocol.md.
TRIGGER_END_OF_STREAM = "end_of_stream"


@dataclass(slots=True)
class Word:
    word: str
    confidence: float
    start: float | None = None
    end: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"word": self.word, "confidence": round(self.confidence, 4)}
        if self.start is not None:
            data["start"] = round(self.start, 3)
        if self.end is not None:
            data["end"] = round(self.end, 3)
        return data


@dataclass(slots=True)
class TurnEvent:
    event: EventName
    turn: int
    transcript: str = ""
    words: list[Word] = field(default_factory=list)
    audio_window_start: float = 0.0
    audio_window_end: float = 0.0
    end_of_turn_confidence: float = 0.0
    trigger: str | None = None
    languages: list[str] | None = None
    #: ``time.monotonic()`` (this process) by which the engine had received the audio up to
    #: ``audio_window_end``: the consumer measures end of speech to EndOfTurn from it
    #: (``relay_end_of_turn_latency_seconds``). None where the engine cannot tell.
    speech_ended_at: float | None = None


@dataclass(slots=True)
class EngineWarning:
    """A non-fatal notice for the client (sent as a Flux ``Warning``)."""

    code: str
    description: str


@dataclass(slots=True)
class StreamOptions:
    """What the client asked for, already validated by relay.flux.protocol."""

    model: str = DEFAULT_MODEL
    encoding: str = "linear16"
    sample_rate: int = 16000
    eot_threshold: float | None = None
    eager_eot_threshold: float | None = None
    eot_timeout_ms: int | None = None
    keyterms: list[str] = field(default_factory=list)
    #: ``language_hint`` values as the client gave them (only with ``flux-general-multi``);
    #: one pins the language, several narrow detection to them, none detects freely.
    language_hints: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)

    #: Fields the client set explicitly (so an engine warns only about what was asked for).
    explicit: set[str] = field(default_factory=set)

    @property
    def bytes_per_second(self) -> int:
        """Exact for PCM and G.711; an estimate for compressed audio (see relay.flux.audio)."""
        return audio.bytes_per_second(self.encoding, self.sample_rate)

    @property
    def sample_width(self) -> int:
        return audio.sample_width(self.encoding)


def model_ignored_warning(
    options: StreamOptions, *, serving: str, supported: str | Collection[str] = DEFAULT_MODEL
) -> EngineWarning | None:
    """``MODEL_IGNORED`` when the client explicitly asked for a model this engine cannot serve.

    A stream that never named a model gets the default silently; one that asked for another
    model is told what transcribes it instead (``serving``, e.g. "using the fake engine").
    """
    models = {supported} if isinstance(supported, str) else set(supported)
    if "model" not in options.explicit or options.model in models:
        return None
    return EngineWarning("MODEL_IGNORED", f"Model {options.model!r} is not available; {serving}.")


def base_language(code: str) -> str:
    """``pt-BR`` -> ``pt``: Whisper knows base languages only (Flux maps unknown locales the same way)."""
    return code.split("-", 1)[0].strip().lower()


def language_ignored_warning(options: StreamOptions, *, serving: str) -> EngineWarning | None:
    """``LANGUAGE_IGNORED`` when the client gave language hints this engine cannot use."""
    if not options.language_hints:
        return None
    hints = ", ".join(options.language_hints)
    return EngineWarning("LANGUAGE_IGNORED", f"Language hint {hints} is not used; {serving}.")


_END = object()


class EngineStream:
    """One client stream inside an engine.

    Subclasses implement :meth:`feed` and the control methods and call :meth:`emit` for events;
    the queue plumbing lives here so a new engine only describes its own behaviour.
    """

    def __init__(self, engine: "Engine", options: StreamOptions) -> None:
        self.engine = engine
        self.options = options
        # A deque made on the first event and one future while the consumer waits: an empty
        # asyncio.Queue costs about 3 KB, and most streams sit idle most of the time.
        self._items: deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    # -- producer side (the engine, on the event loop) ------------------------------------------
    def emit(self, item: TurnEvent | EngineWarning | BaseException) -> None:
        """Queue an event for the consumer; an exception ends the stream with that error."""
        if not self._closed:
            self._put(item)

    def end(self) -> None:
        """No more events will come."""
        if not self._closed:
            self._closed = True
            self._put(_END)

    def _put(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- consumer side --------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[TurnEvent | EngineWarning]:
        while True:
            while not self._items:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            item = self._items.popleft()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def start(self) -> list[EngineWarning]:
        """Prepare the stream; returns warnings about options this engine cannot honour."""
        return []

    def feed(self, audio: bytes) -> None:
        """Take audio in the stream's encoding, whole samples only. Must not block."""
        raise NotImplementedError

    @property
    def backlog_seconds(self) -> float:
        """Audio accepted but not yet processed (the relay refuses more past a limit)."""
        return 0.0

    async def force_end_turn(self) -> None:
        """End the open turn now (EndOfTurn with trigger ``manual``)."""
        raise NotImplementedError

    async def configure(
        self, thresholds: dict[str, Any], keyterms: list[str] | None, *, language_hints: list[str] | None = None
    ) -> list[EngineWarning]:
        """Apply new thresholds/keyterms/language hints mid-stream; raise ConfigureRejected to refuse.

        ``language_hints`` is passed only when the client sent it (so an engine overriding this
        with the two positional arguments alone still works for every other Configure).
        """
        for key, value in thresholds.items():
            setattr(self.options, key, value)
        if keyterms is not None:
            self.options.keyterms = list(keyterms)
        if language_hints is not None:
            self.options.language_hints = list(language_hints)
        return []

    async def finish(self) -> None:
        """Flush: process what was fed, finish an open turn (trigger end_of_stream), then end()."""
        raise NotImplementedError

    async def abort(self) -> None:
        """Drop everything without flushing (used after a fatal error)."""
        self.end()


class Engine:
    """Process-wide engine instance, built from ``settings.RELAY_ENGINES[alias]``."""

    #: Name used in logs, the admin and ``/healthz``.
    name: ClassVar[str] = "engine"
    stream_class: ClassVar[type[EngineStream]] = EngineStream

    def __init__(self, alias: str, options: dict[str, Any] | None = None) -> None:
        self.alias = alias
        self.options = dict(options or {})

    def open_stream(self, options: StreamOptions) -> EngineStream:
        """Create a stream; raise relay.exceptions.Capacity when full."""
        return self.stream_class(self, options)

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for /healthz; must be cheap and never raise."""
        return True, "ok"

    def supported_encodings(self) -> set[str]:
        """Every Flux encoding by default: engines decode through relay.flux.codecs."""
        return set(audio.SUPPORTED_ENCODINGS)
