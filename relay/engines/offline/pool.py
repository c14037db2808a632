"""Shared plumbing for the embedded (offline) engines: a priority worker pool and an ordered stream.

CPU-heavy work (neural VAD, Whisper decodes, pocketsphinx search) never runs on the event loop.
Every offline engine owns one :class:`WorkerPool` whose threads run native code that releases the
GIL (CTranslate2, onnxruntime, pocketsphinx). :class:`OfflineStream` turns the non-blocking
``feed()`` into ordered processing: one task per stream takes queued audio and control messages
(ForceEndTurn, finish) strictly in arrival order, so a ForceEndTurn applies to exactly the audio
sent before it.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from relay.exceptions import EngineError, InvalidAudio, RelayError
from relay.flux.audio import Resampler
from relay.flux.codecs import INVALID_AUDIO_PACKET, PACKET_ENCODINGS, frame_packet
from relay.ops import metrics
from relay.ops.logs import get_logger

from relay.engines.base import Engine, EngineStream, EngineWarning, StreamOptions, TurnEvent

log = get_logger("relay.engines")

#: Priorities in a WorkerPool: lower runs first.
PRIORITY_FINAL = 0
PRIORITY_STREAM = 1
PRIORITY_UPDATE = 2
#: A turn's later Updates queue behind every turn's first one and are the only low-priority jobs
#: (at most ``workers - 1`` threads): under load the cadence of running turns thins out before a
#: new turn's first words or anyone's final wait.
PRIORITY_LATER_UPDATE = 3
#: The ``kind`` label of relay_engine_job_seconds for each priority.
_JOB_KINDS = {PRIORITY_FINAL: "final", PRIORITY_STREAM: "stream", PRIORITY_UPDATE: "update", PRIORITY_LATER_UPDATE: "update"}


class WorkerPool:
    """A fixed set of threads taking jobs by priority (finals before interim updates).

    ``concurrent.futures.ThreadPoolExecutor`` is first-in first-out; under load that lets a
    stream's interim re-decodes delay another stream's final transcript. Here finals jump the
    queue, and low-priority jobs (a turn's later Updates) may occupy at most ``workers - 1``
    threads, so with two or more workers a final waits at most for a turn's first Update (a
    short decode), never for a later one. :meth:`saturated` tells
    when jobs wait longer than ``max_wait``, so the engine can turn new streams away instead of
    letting every stream fall behind.
    """

    def __init__(self, workers: int, name: str, *, max_wait: float = 1.0, engine: str = "") -> None:
        self.workers = max(1, int(workers))
        # relay_engine_job_seconds, by the job's priority; children made once, not per job.
        self._job_seconds = {
            priority: metrics.ENGINE_JOB_SECONDS.labels(engine=engine or name, kind=kind) for priority, kind in _JOB_KINDS.items()
        }
        self.low_limit = max(1, self.workers - 1)
        self.max_wait = max_wait
        self._heap: list[tuple[int, int, float, Any]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self.busy = 0
        self.busy_low = 0
        self.busy_seconds = 0.0
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            heapq.heappush(self._heap, (priority, next(self._order), time.monotonic(), (future, fn, args)))
            self._cond.notify()
        return future

    async def run(self, priority: int, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(priority, fn, *args))

    def _runnable(self) -> bool:
        return bool(self._heap) and (self._heap[0][0] < PRIORITY_LATER_UPDATE or self.busy_low < self.low_limit)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._runnable():
                    self._cond.wait()
                if self._stopping:
                    return
                priority, _, _, (future, fn, args) = heapq.heappop(self._heap)
                low = priority >= PRIORITY_LATER_UPDATE
                self.busy += 1
                self.busy_low += low
            started = time.monotonic()
            ran = False
            try:
                if future.set_running_or_notify_cancel():
                    ran = True
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # handed to the awaiting stream
                        future.set_exception(exc)
            finally:
                elapsed = time.monotonic() - started
                with self._cond:
                    self.busy -= 1
                    self.busy_low -= low
                    self.busy_seconds += elapsed
                    self._cond.notify_all()
                if ran and priority in self._job_seconds:
                    self._job_seconds[priority].observe(elapsed)

    def alone(self) -> bool:
        """Called from a job: no other job runs or waits, so the other workers' cores are spare."""
        with self._cond:
            return self.busy <= 1 and not self._heap

    def idle(self) -> bool:
        """A worker is free and nothing is waiting."""
        with self._cond:
            return self.busy < self.workers and not self._heap

    @property
    def queued(self) -> int:
        with self._cond:
            return sum(1 for item in self._heap if not item[3][0].cancelled())

    def oldest_wait(self) -> float:
        with self._cond:
            oldest = min((item[2] for item in self._heap if not item[3][0].cancelled()), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def saturated(self) -> bool:
        """Jobs are queueing behind busy workers for longer than ``max_wait``."""
        return self.queued >= self.workers and self.oldest_wait() > self.max_wait

    def shutdown(self, wait: bool = True) -> None:
        with self._cond:
            self._stopping = True
            for _, _, _, (future, _, _) in self._heap:
                future.cancel()
            self._heap.clear()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join(30)


class _Control:
    __slots__ = ("kind", "done")

    def __init__(self, kind: str, done: asyncio.Future | None = None) -> None:
        self.kind = kind
        self.done = done


class OfflineStream(EngineStream):
    """An engine stream whose audio and control messages are processed in order by one task.

    Subclasses implement :meth:`process_audio`, :meth:`end_turn_now` and :meth:`flush`; they may
    await the engine's worker pool inside them. ``feed()`` only queues bytes, so it never blocks.
    """

    engine: "OfflineEngine"
    #: The stream's decoder and resampler, used in the worker pool; the skipped bad packets it
    #: reports go to the client as INVALID_AUDIO_PACKET warnings after each step.
    resampler: Resampler | None = None
    #: ``time.monotonic()`` when the batch being processed was taken off the inbox: the audio in
    #: it had arrived by then. Taken once per batch by the stream's task, never in feed(); while
    #: the stream keeps up that is within one loop turn of the audio's arrival (behind, the
    #: batch's wait in the inbox is not counted). Subclasses put it on EndOfTurn events as
    #: ``TurnEvent.speech_ended_at`` (:meth:`stamped`).
    fed_at: float | None = None

    def __init__(self, engine: "OfflineEngine", options: StreamOptions) -> None:
        super().__init__(engine, options)
        # Raw Opus is a packet per frame: the frames queued here are joined, so keep their edges.
        self._framed = options.encoding in PACKET_ENCODINGS
        self._finishing: _Control | None = None
        self._audio_failed = False
        self._inbox: collections.deque[bytes | _Control] = collections.deque()
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._released = False

    # -- subclass hooks -------------------------------------------------------------------------
    async def process_audio(self, audio: bytes) -> None:
        raise NotImplementedError

    async def end_turn_now(self, trigger: str) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        """Process buffered audio and finish an open turn (trigger end_of_stream)."""
        raise NotImplementedError

    def release(self) -> None:
        """Give back per-stream resources (called exactly once)."""

    async def resume(self) -> None:
        """Go on with work that waited for a decode; runs in order with audio, after :meth:`wake`."""

    def wake(self) -> None:
        """Have the stream's task call :meth:`resume` (from a decode's done callback, on the loop)."""
        if not self._closed:
            self._inbox.append(_Control("resume"))
            self._wake.set()

    # -- engine interface -----------------------------------------------------------------------
    async def start(self) -> list:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return []

    def feed(self, audio: bytes) -> None:
        if self._closed:
            return
        if self._framed:
            audio = frame_packet(audio)
        self._inbox.append(audio)
        self._pending_bytes += len(audio)
        self._wake.set()

    @property
    def backlog_seconds(self) -> float:
        return self._pending_bytes / self.options.bytes_per_second

    async def force_end_turn(self) -> None:
        self._inbox.append(_Control("force"))
        self._wake.set()

    async def finish(self) -> None:
        if self._task is None or self._task.done():
            self._release()
            self.end()
            return
        done = asyncio.get_running_loop().create_future()
        self._inbox.append(_Control("finish", done))
        self._wake.set()
        await asyncio.shield(done)

    async def abort(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._inbox.clear()
        self._pending_bytes = 0
        self._release()
        self.end()

    # -- the ordered loop -----------------------------------------------------------------------
    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.engine.stream_closed(self)
            self.release()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._inbox:
                    item = self._inbox.popleft()
                    if isinstance(item, _Control):
                        if item.kind == "force":
                            await self.end_turn_now("manual")
                            continue
                        if item.kind == "resume":
                            await self.resume()
                            continue
                        self._finishing = item
                        await self.flush()
                        self._audio_warnings()
                        self._release()
                        self.end()
                        if item.done is not None and not item.done.done():
                            item.done.set_result(None)
                        return
                    # Coalesce queued frames: one worker round trip when the stream is behind.
                    parts = [item]
                    while self._inbox and not isinstance(self._inbox[0], _Control):
                        parts.append(self._inbox.popleft())  # type: ignore[arg-type]
                    data = b"".join(parts)
                    self.fed_at = time.monotonic()
                    if not self._audio_failed:
                        try:
                            await self.process_audio(data)
                        except InvalidAudio as exc:
                            # Undecodable audio ends the stream, but not this task: the consumer
                            # still calls finish(), which ends and stores the open turn.
                            self._audio_failed = True
                            self._audio_warnings()
                            self.emit(exc)
                    self._pending_bytes -= len(data)
                    self._audio_warnings()
        except asyncio.CancelledError:
            raise
        except RelayError as exc:
            self._fail(exc)
        except Exception as exc:
            log.exception("engine_stream_failed", engine=self.engine.alias)
            self._fail(EngineError(f"The {self.engine.name} engine failed: {exc.__class__.__name__}."))

    def stamped(self, event: TurnEvent, fed_at: float | None = None) -> TurnEvent:
        """``event`` with ``speech_ended_at`` set when it is an EndOfTurn (``fed_at``: the batch's, by default)."""
        if event.event == "EndOfTurn" and event.speech_ended_at is None:
            event.speech_ended_at = self.fed_at if fed_at is None else fed_at
        return event

    def _audio_warnings(self) -> None:
        if self.resampler is not None:
            for description in self.resampler.take_warnings():
                self.emit(EngineWarning(INVALID_AUDIO_PACKET, description))

    def _fail(self, exc: RelayError) -> None:
        self._release()
        self._audio_warnings()
        self.emit(exc)
        self.end()
        for item in (*self._inbox, self._finishing):
            if isinstance(item, _Control) and item.done is not None and not item.done.done():
                item.done.set_result(None)
        self._inbox.clear()


class OfflineEngine(Engine):
    """An engine with a worker pool and a cap on concurrent streams."""

    def __init__(self, alias: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(alias, options)
        self.max_streams = int(self.options.get("max_streams", 4))
        self.active = 0
        self._count_lock = threading.Lock()

    def reserve(self) -> None:
        """Count a new stream or raise Capacity."""
        from relay.exceptions import Capacity

        with self._count_lock:
            if self.active >= self.max_streams:
                raise Capacity(f"The {self.name} engine is serving its maximum of {self.max_streams} streams; try again later.")
            self.active += 1

    def stream_closed(self, stream: OfflineStream) -> None:
        with self._count_lock:
            self.active = max(0, self.active - 1)
