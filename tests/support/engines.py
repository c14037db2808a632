"""Tiny engines used only by tests (the interface makes them a few lines each)."""
from __future__ import annotations

from relay.engines.base import Engine, EngineStream


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
