"""Group commit: database writes that arrive together share one statement and one commit.

A finished turn must be committed before its EndOfTurn is sent (the EndOfTurn is the client's
receipt). Written one by one, each turn costs a transaction, a commit and a thread hop, and at a
few hundred streams per process those writes, not the audio, set the latency
(docs/benchmarks.md). A :class:`Batcher` keeps at most one batch in flight: calls made while it is
being written wait for it to finish and then go together in the next one. Under light load a batch
is a single call, so nothing waits longer than before; under heavy load the cost per call falls.

``write_many`` gets the list of items and returns one result per item, in order; a result that is
an exception instance fails only that item's caller. If the whole batch raises one of
``split_on`` (errors that one item can cause, such as an integrity error), the items are written
again one by one so one bad item cannot fail the others; any other error (the database is down)
fails the whole batch at once.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from relay.ops.logs import get_logger

log = get_logger("relay.store.batching")


class Batcher:
    def __init__(
        self,
        name: str,
        write_many: Callable[[list[Any]], Awaitable[list[Any]]],
        *,
        max_batch: int = 500,
        split_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.name = name
        self.split_on = split_on
        self.write_many = write_many
        self.max_batch = max_batch
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests): start afresh
            self._loop, self._pending, self._task = loop, [], None
        future = loop.create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._pending:
            # One more pass of the event loop before taking the batch: the calls the callbacks
            # already due are about to make join it. On an idle loop that pass costs microseconds;
            # on a busy one it gathers a pass's worth of calls, fewer and larger statements.
            await asyncio.sleep(0)
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            batch = [(item, future) for item, future in batch if not future.done()]  # caller gone
            if not batch:
                continue
            try:
                results = await self._write([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    if not future.done():
                        future.cancel()
                raise
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _write(self, items: list[Any]) -> list[Any]:
        self.batches += 1
        self.items += len(items)
        try:
            return await self.write_many(items)
        except Exception as exc:
            if len(items) == 1 or not isinstance(exc, self.split_on):
                return [exc] * len(items)
            log.warning("batch_failed", name=self.name, size=len(items), error=type(exc).__name__)
        results: list[Any] = []
        for item in items:
            try:
                results.extend(await self.write_many([item]))
            except Exception as exc:
                results.append(exc)
        return results
