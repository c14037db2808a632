"""Real servers for tests: daphne processes on free ports, waited on by readiness, not sleep.

``LiveServer`` runs ``daphne transcription_site.asgi:application`` in a subprocess with its own
environment (database URL, engine, Redis). Migrations run first with the same environment.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DAPHNE = str(Path(sys.executable).with_name("daphne"))


def daphne_flags() -> list[str]:
    """The flags `make run` gives daphne (the Makefile's DAPHNE_FLAGS: frame sizes, the close
    timeout a disconnected stream's flush needs), so the test and bench servers run as it does."""
    found = re.search(r"^DAPHNE_FLAGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    if not found:
        raise RuntimeError("the Makefile sets no DAPHNE_FLAGS")
    return shlex.split(found.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrate(env: dict[str, str], root: Path = ROOT) -> None:
    """Migrate with the ``manage.py`` of ``root`` (another tree's schema for a benchmark's "before")."""
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=root, env=env, check=True)


class LiveServer:
    """One daphne process. ``env`` overrides the test environment (DATABASE_URL, RELAY_ENGINE...)."""

    def __init__(self, env: dict[str, str] | None = None, port: int | None = None, log_name: str = "daphne") -> None:
        self.port = port or free_port()
        self.env = {**os.environ, "DJANGO_DEBUG": "1", "RELAY_ENGINE": "fake", "PYTHONUNBUFFERED": "1", "RELAY_PRELOAD_ENGINE": "1", **(env or {})}
        if "DJANGO_SETTINGS_MODULE" not in (env or {}):  # pytest's own settings are not the server's
            self.env.pop("DJANGO_SETTINGS_MODULE", None)
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"{log_name}-", suffix=".log", delete=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "LiveServer":
        self.proc = subprocess.Popen(
            [
                DAPHNE, "-b", "127.0.0.1", "-p", str(self.port), *daphne_flags(),
                "transcription_site.asgi:application",
            ],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daphne exited with {self.proc.returncode}:\n{self.output()}")
            try:
                urllib.request.urlopen(self.http_url + "/v2/listen", timeout=1)
            except urllib.error.HTTPError as exc:
                if exc.code == 426:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daphne did not become ready:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash, no clean-up."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """A fresh migrated SQLite database for a live server."""
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'live.sqlite3'}", "DJANGO_DEBUG": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    migrate(env)
    return {"DATABASE_URL": env["DATABASE_URL"]}


async def stream_audio(url: str, audio: bytes, *, chunk: int = 2560, pace: float = 0.0) -> list[dict]:
    """Stream ``audio`` over a real WebSocket, CloseStream, read every message until the close.

    ``pace`` is the sleep per chunk (0: as fast as the relay takes it).
    """
    import websockets

    messages = []
    async with websockets.connect(url, max_size=None) as ws:
        messages.append(json.loads(await ws.recv()))
        for i in range(0, len(audio), chunk):
            await ws.send(audio[i : i + chunk])
            if pace:
                await asyncio.sleep(pace)
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for raw in ws:
            messages.append(json.loads(raw))
        assert ws.close_code == 1000
    return messages
