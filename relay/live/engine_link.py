"""One connection's engine stream and the task that reads its events, apart from the socket.

The consumer hands each event to the stream core through ``deliver``; when the engine's event
stream dies, ``failed`` gets the error to end the stream with. ``drain`` finishes the engine
(its open turn becomes a last EndOfTurn) and waits until every event it produced is delivered,
within a bound, whatever state the pump is in.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from django.db import DatabaseError, InterfaceError

from relay.engines import EngineStream, EngineWarning, TurnEvent
from relay.exceptions import EngineError, RelayError, StorageUnavailable


class EngineLink:
    __slots__ = ("stream", "deliver", "failed", "log", "pump")

    def __init__(
        self,
        stream: EngineStream,
        *,
        deliver: Callable[[TurnEvent | EngineWarning], Awaitable[None]],
        failed: Callable[[RelayError], None],
        log: Any,
    ) -> None:
        self.stream = stream
        self.deliver = deliver
        self.failed = failed
        self.log = log
        self.pump: asyncio.Task | None = None

    def feed(self, pcm: bytes) -> RelayError | None:
        """Give the engine audio; the error that ends the stream, if it failed."""
        try:
            self.stream.feed(pcm)
        except RelayError as exc:
            return exc
        except Exception:
            self.log.exception("engine_feed_failed")
            return EngineError()
        return None

    async def control(self, call: Awaitable[Any]) -> RelayError | None:
        """Run a control call (ForceEndTurn, Configure); the error that ends the stream, if any."""
        try:
            await call
        except RelayError as exc:
            return exc
        except Exception:
            self.log.exception("control_failed")
            return EngineError()
        return None

    def start_pump(self) -> None:
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for item in self.stream.events():
                await self.deliver(item)
        except asyncio.CancelledError:
            raise
        except RelayError as exc:
            self.failed(exc)
        except (DatabaseError, InterfaceError):
            self.log.exception("storage_failed")
            self.failed(StorageUnavailable())
        except Exception:
            self.log.exception("engine_failed")
            self.failed(EngineError())

    async def drain(self, *, timeout: float, engine_error: RelayError | None) -> None:
        """Finish the engine and deliver what it still produces (the open turn's EndOfTurn)."""
        stream, pump = self.stream, self.pump
        try:
            async with asyncio.timeout(timeout):
                await stream.finish()
            async with asyncio.timeout(timeout):
                if pump is not None and engine_error is not None and not isinstance(engine_error, StorageUnavailable):
                    # The pump died with the engine's event stream, but what finish() produced
                    # is queued: deliver it here.
                    async for item in stream.events():
                        if not isinstance(item, EngineWarning):
                            await self.deliver(item)
                elif pump is not None:
                    await asyncio.shield(pump)
        except (TimeoutError, Exception):
            self.log.warning("flush_incomplete", exc_info=True)
            await stream.abort()
            if pump is not None:
                pump.cancel()
