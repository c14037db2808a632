"""Tiny engines used only by tests (the interface makes them a few lines each)."""
from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from relay.engines.base import Engine, EngineStream, StreamOptions
from relay.engines.fake import FakeEngine, FakeStream


class BacklogStream(EngineStream):
    """Accepts audio and never processes it: its backlog only grows."""

    def __init__(self, engine, options):
        super().__init__(engine, options)
        self.queued = 0

    def feed(self, audio: bytes) -> None:
        self.queued += len(audio)

    @property
    def backlog_seconds(self) -> float:
        return self.queued / self.options.bytes_per_second

    async def force_end_turn(self) -> None:
        pass

    async def finish(self) -> None:
        self.end()


class BacklogEngine(Engine):
    name = "backlog"
    stream_class = BacklogStream


class FailOnFinishStream(BacklogStream):
    """Fails while flushing, as an upstream that rejects the stream's end would."""

    async def finish(self) -> None:
        from relay.exceptions import EngineError

        self.emit(EngineError("The engine failed while finishing the stream."))


class FailOnFinishEngine(Engine):
    name = "fail-on-finish"
    stream_class = FailOnFinishStream


class SlowFlushStream(FakeStream):
    """Finishes like an engine behind on its audio: ``steps`` Updates ``step_s`` apart before the
    open turn's EndOfTurn; with ``hang``, the EndOfTurn never comes (a decoder that stopped);
    with ``hang: "first"``, only in the process's first stream that closes inside a turn."""

    open_turn_flushes = itertools.count()

    async def finish(self) -> None:
        options = self.engine.options
        for _ in range(int(options.get("steps", 0))):
            await asyncio.sleep(float(options.get("step_s", 0.1)))
            if self.in_turn:
                self.emit(self._event("Update", end_of_turn_confidence=0.05))
        hang = options.get("hang")
        if hang == "first":
            hang = self.in_turn and next(SlowFlushStream.open_turn_flushes) == 0
        if hang:
            await asyncio.Event().wait()
        await super().finish()


class SlowFlushEngine(FakeEngine):
    name = "slow-flush"
    stream_class = SlowFlushStream


class RecordingEngine(Engine):
    """Writes the bytes every stream is fed to a file, then hands them to another engine.

    Lets a test see exactly what the relay received from a client (the demo page in a browser),
    after the WebSocket and the consumer and before any engine touches it. Options: ``engine``,
    the alias that transcribes (``fake``, ``whisper``...), and ``directory``, where stream *n*
    writes ``<n>-<encoding>-<sample_rate>.pcm`` from its first audio frame on.
    """

    name = "recording"

    def __init__(self, alias: str, options: dict | None = None) -> None:
        from django.conf import settings
        from django.utils.module_loading import import_string

        super().__init__(alias, options)
        inner_alias = self.options["engine"]
        config = settings.RELAY_ENGINES[inner_alias]
        # Built here, not through the registry: get_engine() holds its lock while this runs.
        self.inner: Engine = import_string(config["BACKEND"])(inner_alias, config.get("OPTIONS", {}))
        self.directory = Path(self.options["directory"])
        self.directory.mkdir(parents=True, exist_ok=True)
        self.streams = itertools.count(1)

    def open_stream(self, options: StreamOptions) -> EngineStream:
        stream = self.inner.open_stream(options)
        path = self.directory / f"{next(self.streams):03d}-{options.encoding}-{options.sample_rate}.pcm"
        feed = stream.feed

        def recording_feed(audio: bytes) -> None:
            with path.open("ab") as file:  # a test engine: a small write per frame is fine
                file.write(audio)
            feed(audio)

        stream.feed = recording_feed  # type: ignore[method-assign]
        return stream

    def __getattr__(self, name: str):
        # Everything else (model loading, pools, options of the inner engine) is the inner one's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def readiness(self) -> tuple[bool, str]:
        return self.inner.readiness()

    def supported_encodings(self) -> set[str]:
        return self.inner.supported_encodings()

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
