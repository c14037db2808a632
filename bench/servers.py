"""Server processes for the benchmark and what they cost: start, wait until ready, read CPU and
memory from /proc, stop. Loopback only; every process is ours and stopped by its own pid."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.live import daphne_flags

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")
MAX_WS = "4194304"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children: none here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_rss(pid: int) -> int:
    """Resident set size in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pids_named(comm: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == comm:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def machine_load() -> dict[str, float]:
    with open("/proc/loadavg") as f:
        one, five, fifteen = (float(x) for x in f.read().split()[:3])
    return {"load1": one, "load5": five, "load15": fifteen, "cores": os.cpu_count() or 1}


class MachineCPU:
    """Busy share of all cores between two readings of /proc/stat (everyone's, not just ours)."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        idle = values[3] + values[4]
        return sum(values), idle

    def busy_cores(self) -> float:
        total, idle = self._read()
        dt, di = total - self.start[0], idle - self.start[1]
        return (dt - di) / dt * (os.cpu_count() or 1) if dt else 0.0


class FsyncProbe:
    """How long the disk takes to make a small write durable, while a window runs: a thread
    writes 4 KB and fsyncs it every ``every_s`` in a file beside the system's databases (the same
    filesystem), timing each fsync. PostgreSQL commits wait for one; a slow one holds every
    EndOfTurn of that group commit."""

    def __init__(self, every_s: float = 0.05, where: str | None = None) -> None:
        self.every_s = every_s
        self.where = where or tempfile.gettempdir()
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fsync-probe", daemon=True)

    def _run(self) -> None:
        with tempfile.NamedTemporaryFile(dir=self.where, prefix="fsync-probe-") as f:
            block = b"\0" * 4096
            while not self._stop.wait(self.every_s):
                f.write(block)
                f.flush()
                started = time.perf_counter()
                os.fsync(f.fileno())
                self.seconds.append(time.perf_counter() - started)

    def __enter__(self) -> "FsyncProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Server:
    """One server process: ``kind`` is baseline, daphne or uvicorn. ``root`` is the source tree it
    runs from (its working directory, where daphne and uvicorn import ``bench.asgi`` and the relay
    from): this checkout, or a worktree of an older commit to compare against, in the same venv."""

    kind: str  # baseline, bare, daphne or uvicorn
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    backlog: int | None = 1024
    ws: str = "websockets-sansio"  # uvicorn's WebSocket implementation
    name: str = ""
    proc: subprocess.Popen | None = None
    log_path: str = ""
    errors: dict = field(default_factory=dict)
    root: Path = ROOT

    def command(self) -> list[str]:
        if self.kind in ("baseline", "bare"):
            return [sys.executable, "-m", f"bench.{self.kind}", "--port", str(self.port), "--backlog", str(self.backlog or 1024)]
        if self.kind == "daphne":
            bind = ["-e", f"tcp:port={self.port}:interface=127.0.0.1:backlog={self.backlog}"] if self.backlog else ["-b", "127.0.0.1", "-p", str(self.port)]
            return [str(BIN / "daphne"), *bind, *daphne_flags(), "bench.asgi:application"]
        if self.kind == "uvicorn":
            return [str(BIN / "uvicorn"), "bench.asgi:application", "--host", "127.0.0.1", "--port", str(self.port),
                    "--lifespan", "off", "--ws", self.ws, "--ws-max-size", MAX_WS, "--no-access-log", "--log-level", "warning",
                    "--backlog", str(self.backlog or 2048), "--ws-per-message-deflate", "false"]
        raise ValueError(self.kind)

    def start(self, timeout: float = 60.0) -> "Server":
        self.port = self.port or free_port()
        env = {**os.environ, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "relay-bench-not-secret",
               "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost", "RELAY_ENGINE": "fake", "PYTHONUNBUFFERED": "1",
               "RELAY_CONNECTS_PER_MINUTE": "100000000", "RELAY_MAX_STREAMS_PER_PROCESS": "100000", **self.env}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        log = tempfile.NamedTemporaryFile(prefix=f"bench-{self.name or self.kind}-", suffix=".log", delete=False)
        self.log_path = log.name
        self.proc = subprocess.Popen(self.command(), cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if self._ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not become ready:\n{self.output()[-3000:]}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/__bench__/stats", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def mark_window(self) -> None:
        """Start the tails ``stats()`` reports (turn-write latency, loop lateness) afresh."""
        self._bench("window")

    def stats(self, reset: bool = False) -> dict:
        return self._bench("reset" if reset else "stats")

    def _bench(self, path: str) -> dict:
        """bench.asgi's ``/__bench__/<path>`` answer ({} from servers without it)."""
        if self.kind in ("baseline", "bare"):
            return {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/__bench__/{path}", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss(self) -> int:
        return proc_rss(self.pid)

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path else ""

    def log_errors(self) -> dict:
        """Server-side errors the log shows (tracebacks, ERROR lines), with a few samples."""
        lines = [l for l in self.output().splitlines() if " ERROR " in l or l.startswith("Traceback") or "Exception" in l[:40]]
        return {"count": len(lines), "samples": lines[:5]}

    def stop(self) -> None:
        if self.proc is not None and self.log_path:
            self.errors = self.log_errors()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.log_path:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
            self.log_path = ""
