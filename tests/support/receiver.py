"""A real webhook receiver for tests: an HTTP server on a free local port, in a thread.

It records every request (headers, body, and whether the signature checks out with the
secret it was given) and answers with the status codes it is told to, in order, then 200.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from relay.api import signing


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int
    signature_ok: bool | None

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    secret: str = ""
    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def __enter__(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok = None
                if receiver.secret:
                    ok = signing.verify(secret=receiver.secret, header=headers.get("x-relay-signature", ""),
                                        timestamp=headers.get("x-relay-timestamp", ""), body=body)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.received.append(Received(headers=headers, body=body, status=status, signature_ok=ok))
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if status < 300 else b"try later")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def wait_for(self, pred: Callable[[list[Received]], bool], timeout: float = 30.0, poll: Callable[[], Any] | None = None) -> list[Received]:
        """Wait until ``pred(received)`` holds (calling ``poll`` between looks, e.g. a worker tick)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.received):
                return self.received
            if poll is not None:
                poll()
            time.sleep(0.05)
        raise AssertionError(f"receiver did not get what was expected within {timeout} s; got {[(r.headers.get('x-relay-event'), r.status) for r in self.received]}")
