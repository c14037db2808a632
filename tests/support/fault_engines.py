"""Engines that fail on purpose, for the fault tests (tests/live/test_faults.py).

The fake engine, plus faults triggered by marker frames in the audio, so a test decides exactly
when an engine breaks while a real daphne process serves the stream. A marker frame is not
audio: it is never fed to the engine.
"""
from __future__ import annotations

import asyncio

from relay.engines.base import EngineWarning
from relay.engines.fake import FakeEngine, FakeStream

#: feed() raises, as an engine whose decoder chokes on input does.
FEED_CRASH = b"FAULT:FEED-CRASH"
#: The engine's worker thread raises; the exception arrives through the event stream, as a
#: thread-pool engine reports a dead worker.
WORKER_CRASH = b"FAULT:WORKERDIES"
#: The worker dies but the engine restarts it itself and only warns; the stream goes on.
WORKER_RESTART = b"FAULT:WORKER-RST"

#: The next ForceEndTurn takes a second, as a handler stuck behind a busy process would: frames
#: the client sends meanwhile queue up in daphne.
SLOW_CONTROL = b"FAULT:SLOW-CTRL!"

MARKERS = (FEED_CRASH, WORKER_CRASH, WORKER_RESTART, SLOW_CONTROL)


def _worker_crash() -> None:
    raise RuntimeError("fault injected: the engine worker died")


class FaultyStream(FakeStream):
    slow_control = 0.0

    async def force_end_turn(self) -> None:
        if self.slow_control:
            await asyncio.sleep(self.slow_control)
            self.slow_control = 0.0
        await super().force_end_turn()

    def feed(self, audio: bytes) -> None:
        marker = audio[: len(FEED_CRASH)]
        if marker == SLOW_CONTROL:
            self.slow_control = 1.0
            return
        if marker == FEED_CRASH:
            raise RuntimeError("fault injected: feed crashed")
        if marker == WORKER_CRASH:
            future = asyncio.get_running_loop().run_in_executor(None, _worker_crash)
            future.add_done_callback(lambda f: self.emit(f.exception()))
            return
        if marker == WORKER_RESTART:
            self.emit(EngineWarning("ENGINE_WORKER_RESTARTED", "The engine's worker died and was restarted; the stream goes on."))
            return
        super().feed(audio)


class FaultyEngine(FakeEngine):
    name = "faulty"
    stream_class = FaultyStream
