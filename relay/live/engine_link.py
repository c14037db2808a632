"""One connection's engine stream and the task that reads its events, apart from the socket.

The consumer hands each event to the stream core through ``deliver``; when the engine's event
stream dies, ``failed`` gets the error to end the stream with. ``drain`` finishes the engine
(its open turn becomes a last EndOfTurn) and waits until every event it produced is delivered,
whatever state the pump is in, for as long as the engine makes progress (within a limit), and
says when it had to give up.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from django.db import DatabaseError, InterfaceError

from relay.engines import EngineStream, EngineWarning, TurnEvent
from relay.exceptions import EngineError, FlushIncomplete, RelayError, StorageUnavailable


class EngineLink:
    __slots__ = ("stream", "deliver", "failed", "log", "pump", "delivered")

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
        self.delivered = 0  # events handed to the stream core: a flush's measure of progress

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
                self.delivered += 1
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

    async def drain(self, *, idle: float, limit: float, engine_error: RelayError | None,
                    deadline: Callable[[], float | None] = lambda: None) -> RelayError | None:
        """Finish the engine and deliver what it still produces (the open turn's EndOfTurn).

        An engine that is behind (audio sent faster than real time to a busy decoder) may take a
        while: the flush goes on while the engine makes progress, an event delivered at least
        every ``idle`` seconds, and for ``limit`` seconds at most (and not past ``deadline()``,
        the loop time a stopping process gives its streams). None when all was delivered;
        otherwise the engine stream is stopped and the error that says the flush was cut short
        is returned (the stream's last turns were not transcribed)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        work = loop.create_task(self._flush(engine_error))
        try:
            while True:
                stop_by = deadline()
                give_up = started + limit if stop_by is None else min(started + limit, stop_by)
                seen = self.delivered
                done, _ = await asyncio.wait((work,), timeout=max(0.0, min(idle, give_up - loop.time())))
                if done:
                    work.result()
                    return None
                if loop.time() >= give_up:
                    cut: RelayError = FlushIncomplete(
                        f"The speech engine was still finishing the audio sent before the stream closed after "
                        f"{loop.time() - started:.1f} s (RELAY_FLUSH_LIMIT_SECONDS, or the server stopping); the turns "
                        "after the last EndOfTurn were not transcribed.")
                    break
                if self.delivered == seen:
                    cut = FlushIncomplete(
                        f"The speech engine made no progress for {idle:g} s (RELAY_FLUSH_TIMEOUT_SECONDS) while finishing "
                        "the audio sent before the stream closed; the turns after the last EndOfTurn were not transcribed.")
                    break
        except RelayError as exc:
            cut = exc
        except Exception:
            self.log.exception("flush_failed")
            cut = EngineError()
        finally:
            if not work.done():
                work.cancel()
        self.log.warning("flush_incomplete", code=cut.code, events=self.delivered, seconds=f"{loop.time() - started:.1f}")
        await self.stream.abort()
        if self.pump is not None:
            self.pump.cancel()
        return cut

    async def _flush(self, engine_error: RelayError | None) -> None:
        stream, pump = self.stream, self.pump
        await stream.finish()
        if pump is not None and engine_error is not None and not isinstance(engine_error, StorageUnavailable):
            # The pump died with the engine's event stream, but what finish() produced is
            # queued: deliver it here.
            async for item in stream.events():
                if not isinstance(item, EngineWarning):
                    await self.deliver(item)
                    self.delivered += 1
        elif pump is not None:
            await asyncio.shield(pump)
