"""The relay as deploy/ runs it, for the benchmark: nginx (TLS) in front of daphne processes
started from deploy/systemd/relay@.service with deploy/relay.env.example, the shared Redis and
the run's PostgreSQL database (tests.support.deploy_stack renders and starts them).

The load client speaks TLS to nginx, so its CPU (reported) includes the TLS work a browser
would do; server CPU is the daphne processes' (nginx's and Redis's apart). nginx's error log is
kept, so a run can count what nginx saw go wrong with the upstream connections (resets).
"""
from __future__ import annotations

import collections
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.servers import pids_named, proc_cpu, proc_rss
from tests.support import deploy_stack

#: The kind (:func:`log_problems`) of an upstream reset: ``recv() failed (104: Connection reset by peer)``.
RESET = "recv() failed (Connection reset by peer)"
#: One error-log entry: its level and message, up to nginx's ", client: ..." context.
LOG_ENTRY = re.compile(r"\[(error|warn|crit|alert|emerg)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client: .*)?$", re.MULTILINE)


def log_problems(text: str) -> collections.Counter:
    """nginx error-log entries counted by kind: the level and the message with its numbers, addresses
    and paths blanked ("[error] upstream timed out (Connection timed out) while connecting to
    upstream"), so a step's count says which failure it was (an upstream timed out, refused, reset,
    or no live upstream left)."""
    kinds: collections.Counter = collections.Counter()
    for level, message in LOG_ENTRY.findall(text):
        message = re.sub(r'"[^"]*"', '"…"', message)
        message = re.sub(r"\d+(\.\d+)*(:\d+)?", "N", message)
        kinds[f"[{level}] {message.replace('(N: ', '(').strip()}"] += 1
    return kinds


def resets(problems: collections.Counter) -> int:
    """The upstream resets among :func:`log_problems`' kinds."""
    return sum(count for kind, count in problems.items() if RESET in kind)


class StackDaphne:
    """A deploy_stack.Daphne seen as a bench Server (CPU, memory, log errors)."""

    kind = "daphne"

    def __init__(self, daphne: deploy_stack.Daphne) -> None:
        self.daphne = daphne
        self.port = daphne.port
        self.errors: dict = {}

    @property
    def pid(self) -> int:
        return self.daphne.pid

    def start(self) -> "StackDaphne":
        self.daphne.start()
        return self

    def stop(self) -> None:
        self.errors = self.log_errors()
        self.daphne.close()

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss(self) -> int:
        return proc_rss(self.pid)

    def mark_window(self) -> None:
        pass  # transcription_site.asgi as deployed: no /__bench__ endpoint

    def stats(self, reset: bool = False) -> dict:
        return {}  # transcription_site.asgi as deployed: no /__bench__ endpoint

    def output(self) -> str:
        return self.daphne.output()

    def log_errors(self) -> dict:
        lines = [l for l in self.output().splitlines() if "level=error" in l or l.startswith("Traceback")]
        return {"count": len(lines), "samples": lines[:5]}


class NginxDeployment:
    """nginx + ``processes`` daphne processes + Redis + PostgreSQL; quacks like bench.run.Deployment."""

    def __init__(self, label: str, *, database_url: str, redis_url: str, processes: int = 2, worker_connections: int = 8192,
                 env: dict[str, str] | None = None) -> None:
        self.label = label
        self.workdir = Path(tempfile.mkdtemp(prefix="relay-bench-stack-"))
        overrides = {"RELAY_CONNECTS_PER_MINUTE": "100000000", "RELAY_LOG_LEVEL": "INFO", **(env or {})}
        self.env = deploy_stack.relay_env(database_url=database_url, redis_url=redis_url, **overrides)
        self.servers = [StackDaphne(deploy_stack.Daphne(self.env, name=f"daphne{i}", workdir=self.workdir)) for i in range(processes)]
        self.worker_connections = worker_connections
        self.nginx: deploy_stack.Nginx | None = None
        self.redis_pids = pids_named("redis-server")
        self.nginx_log = ""

    @property
    def targets(self) -> list[list[Any]]:
        assert self.nginx is not None
        return [["127.0.0.1", self.nginx.https_port]]

    @property
    def client_options(self) -> dict[str, Any]:
        """What the load client needs to pass nginx: TLS with its certificate, the allowed Origin."""
        assert self.nginx is not None
        return {"tls_cafile": str(self.nginx.cert), "origin": "https://127.0.0.1"}

    def start(self) -> "NginxDeployment":
        for s in self.servers:
            s.start()
        self.nginx = deploy_stack.Nginx([s.daphne.upstream for s in self.servers], workdir=self.workdir,
                                        worker_connections=self.worker_connections).start()
        return self

    def error_log(self) -> str:
        if self.nginx is None:
            return self.nginx_log
        # Both files: nginx's own, and the site's (deploy's relay.conf sends its server's errors,
        # the upstream ones among them, to relay.error.log; before round eleven only the first was read).
        paths = [self.nginx.prefix / name for name in self.nginx.ERROR_LOGS]
        return "".join(path.read_text(errors="replace") for path in paths if path.exists())

    def problems(self) -> collections.Counter:
        """What nginx's error log holds so far, by kind (:func:`log_problems`)."""
        return log_problems(self.error_log())

    def stop(self) -> None:
        self.nginx_log = self.error_log()
        if self.nginx is not None:
            self.nginx.close()
            self.nginx = None
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def cpu(self) -> tuple[float, float]:
        return sum(s.cpu() for s in self.servers), sum(proc_cpu(p) for p in self.redis_pids)

    def rss(self) -> int:
        return sum(s.rss() for s in self.servers)

    def __enter__(self) -> "NginxDeployment":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
