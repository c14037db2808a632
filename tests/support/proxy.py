"""A TCP proxy between the browser and daphne that a test can cut, to drop WebSockets for real.

Playwright's ``set_offline`` does not close open WebSockets, and killing daphne would lose the
relay's state; cutting the proxied TCP connections is what a flaky network or a load balancer
restart does. ``hold()`` makes the proxy accept and immediately close new connections (the
browser's reconnects fail) until ``release()``.
"""
from __future__ import annotations

import asyncio
import threading


class CuttableProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.holding = False
        self.accepted = 0
        self.cuts = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cuttable-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> "CuttableProxy":
        self._thread.start()

        async def listen():
            self._server = await asyncio.start_server(self._handle, self.host, 0)
            return self._server.sockets[0].getsockname()[1]

        self.port = self._call(listen())
        return self

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.holding:
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update((client_writer, server_writer))

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()
                self._writers.discard(writer)

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    def cut(self) -> int:
        """Abort every proxied connection at once (both sides see a reset, no close frame)."""

        async def abort_all() -> int:
            writers = list(self._writers)
            for writer in writers:
                writer.transport.abort()
            self._writers.clear()
            return len(writers)

        self.cuts += 1
        return self._call(abort_all())

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False

    def stop(self) -> None:
        async def close():
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "CuttableProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
