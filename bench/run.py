"""``make bench``: the relay benchmark suite, every figure against a baseline measured in the same
run by the same client, and the relay as it is ("now") against the relay at an earlier commit
("before", ``--before REV``, run from a temporary git worktree in the same venv).

    python -m bench.run            # full run (about 20-25 minutes on the 2-core machine)
    python -m bench.run --quick    # small, fast smoke run (CI): a few streams for a few seconds
    python -m bench.run --only sweep,fanout --out /tmp/bench
    python -m bench.run --only shedding --scale 0.25 --window 3 --out /tmp/bench   # smaller, shorter

Writes ``latest.json``, ``latest.md`` and PNG charts to ``--out`` (default bench/results/).
Needs PostgreSQL (RELAY_TEST_DATABASE_URL) and Redis (RELAY_TEST_REDIS_URL) for the relay "as
deployed"; each run makes and drops its own database. docs/benchmarks.md explains every figure.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import BARE, BASE, BEFORE, DEP_BEFORE, DEP_NGINX, DEP_NOW, NOW, OWNFIRST, UVICORN
from bench.servers import ROOT, FsyncProbe, MachineCPU, Server, machine_load, pids_named, proc_cpu

RESULTS = ROOT / "bench" / "results"
PY = sys.executable
BEFORE_REV = "8ce78b5"  # the last commit before the speed work this run compares against
SECTIONS = ("checks", "sweep", "variants", "databases", "memory", "handshakes", "replay", "fanout", "tabs", "shedding", "nginx", "profile")


def say(text: str) -> None:
    print(text, flush=True)


def pct(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    a = np.asarray(values) * 1000.0
    p50, p99 = np.percentile(a, [50, 99])
    return {"n": int(a.size), "p50": round(float(p50), 2), "p99": round(float(p99), 2), "max": round(float(a.max()), 2)}


class Clients:
    """Load-client processes (bench.wsload) driven over their stdin/stdout."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        self.procs = [
            subprocess.Popen([PY, "-m", "bench.wsload", json.dumps(c)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for c in configs
        ]

    def expect(self, event: str, timeout: float = 180.0) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client did not report {event}")
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"client {p.pid} exited (rc {p.wait()}) before {event}")
                msg = json.loads(line)
                if msg["event"] == event:
                    out.append(msg)
                    break
        return out

    def go(self) -> None:
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class Deployment:
    """A set of server processes plus the shared services whose CPU we also read (Redis)."""

    def __init__(self, label: str, servers: list[Server], *, redis: bool = False) -> None:
        self.label = label
        self.servers = servers
        self.redis_pids = pids_named("redis-server") if redis else []

    @property
    def targets(self) -> list[list[Any]]:
        return [["127.0.0.1", s.port] for s in self.servers]

    def start(self) -> "Deployment":
        for s in self.servers:
            s.start()
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def cpu(self) -> tuple[float, float]:
        return sum(s.cpu() for s in self.servers), sum(proc_cpu(p) for p in self.redis_pids)

    def rss(self) -> int:
        return sum(s.rss() for s in self.servers)

    def __enter__(self) -> "Deployment":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_idle(dep: Deployment, limit: float = 120.0) -> float:
    """Seconds until the servers stop working (under 5% of a core) after the clients left: an
    overloaded server goes on chewing through what it buffered, and the next step must not
    measure that."""
    start = time.monotonic()
    last = dep.cpu()[0]
    while time.monotonic() - start < limit:
        time.sleep(0.5)
        now = dep.cpu()[0]
        if now - last < 0.025:
            break
        last = now
    return round(time.monotonic() - start, 1)


def stream_step(dep: Deployment, *, sessions: int, frame_ms: int, window: float, listeners: int = 0, settle: float = 2.0,
                clients: int = 1, stop_reading: bool = False, connect_rate: float = 400.0, turn_s: float = 4.0,
                ramp: bool = False, extra: dict | None = None, probe_disk: bool = False) -> dict[str, Any]:
    """One load level: connect every stream (idle memory), stream in real time, measure a window.
    With ``probe_disk`` the disk's fsync latency is sampled during the window (FsyncProbe).

    With ``ramp`` the streams connect after the start, each streaming as soon as it is in, so the
    later ones meet a loaded server (admission control); ``settle`` should cover the ramp."""
    per = [sessions // clients + (1 if i < sessions % clients else 0) for i in range(clients)]
    configs = [
        {"mode": "stream", "targets": dep.targets, "sessions": n, "listeners": listeners, "frame_ms": frame_ms,
         "window_s": window, "settle_s": settle, "turn_s": turn_s, "connect_rate": connect_rate / clients,
         "connect_concurrency": 64, "connect_timeout_s": 60,
         "target_offset": i, "seed": i + 1, "stop_reading": stop_reading, "ramp": ramp, **(extra or {})}
        for i, n in enumerate(per) if n
    ]
    for s in dep.servers:
        s.stats(reset=True)
    rss0 = dep.rss()
    cl = Clients(configs)
    try:
        connected = cl.expect("connected")
        time.sleep(0.5)
        rss_idle = dep.rss()
        conns = sum(c["speakers"] + c["listeners"] for c in connected)
        cl.go()
        cl.expect("window_start")
        for s in dep.servers:
            s.mark_window()
        cpu0, redis0 = dep.cpu()
        machine = MachineCPU()
        t0 = time.monotonic()
        rss_w0 = dep.rss()
        with FsyncProbe() if probe_disk else nullcontext() as disk:
            cl.expect("window_end", timeout=window + 120)
        t1 = time.monotonic()
        cpu1, redis1 = dep.cpu()
        busy = machine.busy_cores()
        rss_w1 = dep.rss()
        server_stats = [s.stats() for s in dep.servers]
        results = cl.expect("result", timeout=120)
    finally:
        cl.close()
    drain = wait_idle(dep)
    samples: dict[str, list[float]] = {}
    errors: Counter = Counter()
    for r in results:
        for k, v in r.pop("samples").items():
            samples.setdefault(k, []).extend(v)
        errors.update(r["errors"])
    frames_window = sum(r["frames_window"] for r in results)
    wall = t1 - t0
    expected = sum(r["expected_fps"] for r in results) * sum(r["window_s"] for r in results) / len(results)
    server_cpu = cpu1 - cpu0
    row = {
        "target": dep.label,
        "processes": len(dep.servers),
        "frame_ms": frame_ms,
        "streams": sum(r["speakers"] for r in results),
        "listeners": sum(r["listeners"] for r in results),
        "asked": sessions,
        "refused": sum(r["refused"] for r in results),
        "errors": dict(errors),
        "error_count": sum(errors.values()) + sum(r["lost_mid_stream"] for r in results),
        "lost_mid_stream": sum(r["lost_mid_stream"] for r in results),
        "missing_eot": sum(r["missing_eot"] for r in results),
        "dropped_updates": sum(r["dropped_updates"] for r in results),
        "listener_missing_eot": sum(r.get("listener_missing_eot", 0) for r in results),
        "frames_skipped": sum(r["frames_skipped"] for r in results),
        "achieved": round(frames_window / expected, 4) if expected else 0.0,
        "fps": round(frames_window / wall, 1),
        "fet_rtt": pct(samples.get("fet_rtt", [])),
        "upd": pct(samples.get("upd", [])),
        "lst_upd": pct(samples.get("lst_upd", [])),
        "lst_eot": pct(samples.get("lst_eot", [])),
        "fan": pct(samples.get("fan", [])),
        "server_cores": round(server_cpu / wall, 3),
        "cpu_per_frame_us": round(server_cpu / frames_window * 1e6, 1) if frames_window else None,
        "redis_cores": round((redis1 - redis0) / wall, 3),
        "cpu_per_frame_with_redis_us": round((server_cpu + redis1 - redis0) / frames_window * 1e6, 1) if frames_window else None,
        "client_cores": round(sum(r["client_cores"] for r in results), 3),
        "machine_busy_cores": round(busy, 2),
        "rss_idle_per_conn_kb": round((rss_idle - rss0) / conns / 1024, 1) if conns else None,
        "rss_mb": round(rss_w1 / 2**20, 1),
        "rss_growth_mb_per_min": round((rss_w1 - rss_w0) / 2**20 / wall * 60, 2),
        "handshake": {k: results[0]["handshake"].get(k) for k in ("p50", "p99")},
        "gc": [g.get("gc") for g in server_stats if g],
        "loop_lag_ms": [g.get("loop_lag_ms") for g in server_stats if g],
        "write_latency_ms": [g.get("write_latency_ms") for g in server_stats if g],
        "inbound_paused": [g.get("inbound_paused") for g in server_stats if g],
        "batches": [g.get("batches") for g in server_stats if g],
        "tails_ms": [{name: pct(values) for name, values in g["tails_s"].items()} for g in server_stats if g and "tails_s" in g],
        "disk_fsync": pct(disk.seconds) if disk else None,
        "window_s": round(wall, 2),
        "busy_after_s": drain,
    }
    return row


def lost(row: dict[str, Any]) -> int:
    """Events that did not arrive: Updates missing from a speaker's turn, ForceEndTurns never
    answered, EndOfTurns a listening tab never got."""
    return row["dropped_updates"] + row["missing_eot"] + row.get("listener_missing_eot", 0)


def saturated(row: dict[str, Any]) -> bool:
    p99 = row["fet_rtt"]["p99"]
    return (row["achieved"] < 0.9 or p99 is None or p99 > 1000 or row["error_count"] > 0.05 * max(1, row["asked"])
            or row["refused"] > 0.05 * max(1, row["asked"]))


def fmt_row(row: dict[str, Any]) -> str:
    return (f"    {row['target']:<34} {row['frame_ms']:>3} ms x {row['streams']:>5}"
            f"{'+' + str(row['listeners']) if row['listeners'] else '':<6} achieved {row['achieved']:.2f}"
            f"  EoT p50/p99 {row['fet_rtt']['p50']}/{row['fet_rtt']['p99']} ms  Update p99 {row['upd']['p99']} ms"
            f"  cpu/frame {row['cpu_per_frame_us']} us  server {row['server_cores']} cores  client {row['client_cores']}"
            f"  idle {row['rss_idle_per_conn_kb']} KB/conn  err {row['error_count']} refused {row['refused']} lost {lost(row)}"
            f"  machine {row['machine_busy_cores']} cores  busy after {row['busy_after_s']} s")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.only = set(args.only.split(",")) if args.only else set(SECTIONS) - ({"profile"} if args.quick else set())
        self.scale = args.scale
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stack = ExitStack()
        self.redis_url = os.environ.get("RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
        self._before_root: Path | None = None
        self._before_db_url: str | None = None
        self.result: dict[str, Any] = {
            "meta": {
                "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": "python -m bench.run" + " ".join([""] + (argv_shown(args))),
                "quick": self.quick,
                "load_before": machine_load(),
                "python": sys.version.split()[0],
                "database": "sqlite" if getattr(args, "sqlite", False) else "postgresql",
                "now": git_describe("HEAD"),
                "before": git_describe(args.before) if args.before else None,
            }
        }
        self.started = time.monotonic()

    def n(self, count: int) -> int:
        """A stream count, scaled by --scale (full-run sizes only)."""
        return max(1, round(count * self.scale))

    def w(self, seconds: float) -> float:
        """A measurement window, replaced by --window when given."""
        return self.args.window or seconds

    # -- deployments --------------------------------------------------------------------------
    def before_root(self) -> Path:
        """A worktree of the --before commit, made on first use and removed when the run ends."""
        if self._before_root is None:
            tree = self._before_root = self.stack.enter_context(worktree(self.args.before))
            before = self.result["meta"]["before"]
            say(f"    relay before: {before['commit']} {before['subject'][:60]} (worktree {tree})")
        return self._before_root

    def relay_env(self, **extra: str) -> dict[str, str]:
        env = {"DATABASE_URL": self.db_url, "DATABASE_CONN_MAX_AGE": "60", "RELAY_LOG_LEVEL": "INFO"}
        env.update(extra)
        return env

    def baseline(self) -> Deployment:
        return Deployment(BASE, [Server("baseline")])

    def bare(self) -> Deployment:
        """The same messages with no engine work at all (bench.bare): "x bare" is the relay's own cost."""
        return Deployment(BARE, [Server("bare")])

    def relay(self, label: str = NOW, kind: str = "daphne", env: dict[str, str] | None = None, root: Path = ROOT, **kw: Any) -> Deployment:
        return Deployment(label, [Server(kind, env=self.relay_env(**(env or {})), root=root, **kw)])

    def deployed(self, label: str = DEP_NOW, processes: int = 2, layer: str = "pubsub", env: dict[str, str] | None = None,
                 root: Path = ROOT) -> Deployment:
        backend = {"pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer", "core": "channels_redis.core.RedisChannelLayer"}[layer]
        e = self.relay_env(REDIS_URL=self.redis_url, RELAY_CHANNEL_LAYER_BACKEND=backend, **(env or {}))
        return Deployment(label, [Server("daphne", env=e, name=f"daphne{i}", root=root) for i in range(processes)], redis=True)

    def before_db_url(self) -> str:
        """A database of the before tree's own schema, migrated by that tree: a newer schema's
        NOT NULL columns would refuse the older code's rows."""
        if self._before_db_url is None:
            from tests.support.services import postgres_database

            root = self.before_root()
            self._before_db_url = self.stack.enter_context(
                sqlite_database(root=root) if getattr(self.args, "sqlite", False) else postgres_database(root=root))
        return self._before_db_url

    def before(self, label: str = BEFORE, env: dict[str, str] | None = None, **kw: Any) -> Deployment | None:
        """The relay at --before (None when the run compares nothing: --before '')."""
        if not self.args.before:
            return None
        return self.relay(label, root=self.before_root(), env={"DATABASE_URL": self.before_db_url(), **(env or {})}, **kw)

    def deployed_before(self, label: str = DEP_BEFORE, env: dict[str, str] | None = None, **kw: Any) -> Deployment | None:
        if not self.args.before:
            return None
        return self.deployed(label, root=self.before_root(), env={"DATABASE_URL": self.before_db_url(), **(env or {})}, **kw)

    def warm(self, dep: Deployment) -> None:
        """A few streams first, so lazy imports and first connections are not measured."""
        stream_step(dep, sessions=4, frame_ms=80, window=1.0, settle=0.5)

    # -- sections -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tests.support.services import postgres_database

        try:
            # the database is made (and migrated) by this tree; the before tree gets its own (before_db_url)
            self.db_url = self.stack.enter_context(sqlite_database() if getattr(self.args, "sqlite", False) else postgres_database())
            for name in SECTIONS:
                if name in self.only:
                    say(f"== {name} ({time.monotonic() - self.started:.0f} s elapsed)")
                    getattr(self, f"section_{name}")()
        finally:
            self.stack.close()
        self.result["meta"]["load_after"] = machine_load()
        self.result["meta"]["duration_s"] = round(time.monotonic() - self.started, 1)
        return self.result

    def section_checks(self) -> None:
        """What each server negotiates when a browser offers permessage-deflate."""
        out = {}
        deps = [self.baseline(), self.relay(), self.relay("relay now (1 uvicorn, defaults)", kind="uvicorn")]
        deps[2].servers[0].command = lambda s=deps[2].servers[0]: [  # uvicorn exactly as its defaults are
            str(Path(PY).parent / "uvicorn"), "bench.asgi:application", "--host", "127.0.0.1", "--port", str(s.port), "--lifespan", "off"]
        for dep in deps:
            with dep:
                r = burst(dep, count=1, burst_s=0.1, deflate=True)
                ext = [l for l in r.get("first_response_headers", "").split("\r\n") if l.lower().startswith("sec-websocket-extensions")]
                out[dep.label] = ext[0] if ext else "(none)"
                say(f"    {dep.label}: permessage-deflate offered -> {out[dep.label]}")
        self.result["deflate"] = out

    def section_sweep(self) -> None:
        """Streams against latency and CPU: baseline, the relay now (one process and deployed) and
        the relay before (deployed); each series stops at the first step it cannot keep up with."""
        if self.quick:
            plans = {80: [10]}
            window = 2.0
        else:
            plans = {80: [10, 100, 300, 1000, 2000], 40: [10, 100, 300, 1000]}
            window = self.w(4.0)
        rows = []
        plan = [(self.baseline, (80, 40)), (self.relay, (80, 40)), (self.deployed, (80,)), (self.deployed_before, (80,))]
        for make, frames in plan:
            dep = make()
            if dep is None:
                continue
            with dep:
                self.warm(dep)
                for frame_ms in frames:
                    for n in plans.get(frame_ms, []):
                        n = n if self.quick else self.n(n)
                        row = stream_step(dep, sessions=n, frame_ms=frame_ms, window=window, clients=2 if n >= 1000 else 1)
                        rows.append(row)
                        say(fmt_row(row))
                        if saturated(row):
                            say(f"    {dep.label} saturated at {n} streams of {frame_ms} ms; skipping larger counts")
                            break
        self.result["sweep"] = rows

    def section_variants(self) -> None:
        """One relay process at the reference load (300 streams of 80 ms frames), a turn every 4 s
        per stream (a turn index and a turn row written per turn): the bare server, baseline,
        before, now and the alternatives measured against now. The main rows also with audio only
        (the per-frame path), with a turn every second per stream (the turn write path) and at
        1,000 streams; every row also at 100 streams (where a process keeps up)."""
        n, window = (20, 2.0) if self.quick else (self.n(300), self.w(6.0))
        main = not self.quick
        plan = [  # (deployment, main row: also audio only, a turn per second and 1,000 streams)
            (self.bare(), main),
            (self.baseline(), main),
            (self.before(), main),
            (self.relay(), main),
            (self.relay(OWNFIRST, env={"BENCH_PATCHES": "ownfirst"}), False),
            (self.relay(UVICORN, kind="uvicorn"), False),
        ]
        if self.quick:
            plan = plan[:5]
        rows = []
        for dep, is_main in plan:
            if dep is None:
                continue
            with dep:
                self.warm(dep)
                small = [] if self.quick else [(self.n(100), 4.0)]
                loads = ([(n, 3600.0), *small, (n, 4.0), (n, 1.0), (self.n(1000), 4.0)] if is_main else [*small, (n, 4.0)])
                for count, turn_s in loads:
                    row = stream_step(dep, sessions=count, frame_ms=80, window=window, turn_s=turn_s, clients=2 if count >= 1000 else 1)
                    row["turn_s"] = turn_s
                    rows.append(row)
                    say(fmt_row(row) + ("  (audio only)" if turn_s > 60 else ""))
        self.result["variants"] = rows

    def section_databases(self) -> None:
        """Issue 18's turn-write load on both databases: one daphne process, the fake engine, 80 ms
        frames and a ForceEndTurn every second per stream; the bare server, the relay on PostgreSQL,
        the relay on SQLite (the default) and, for comparison, on SQLite with its turns written
        through the ORM (``RELAY_TURN_WRITES=orm``, the path before relay.store.sqlite_writes) in
        turn, each on a fresh server, at 150 and then 300 streams, twice over, so all four share
        the machine's state of the moment. With --before, the relay at that commit on both
        databases takes its turn too (rows ``before-postgresql``, ``before-sqlite``)."""
        from tests.support.services import postgres_database

        sqlite = getattr(self.args, "sqlite", False)
        urls = {
            "postgresql": self.stack.enter_context(postgres_database()) if sqlite else self.db_url,
            "sqlite": self.db_url if sqlite else self.stack.enter_context(sqlite_database()),
        }
        before = {}
        if self.args.before:  # databases of the before tree's own schema, migrated by it
            root = self.before_root()
            before = {"postgresql": self.stack.enter_context(postgres_database(root=root)),
                      "sqlite": self.stack.enter_context(sqlite_database(root=root))}
        counts, reps, window = ([10], 1, 2.0) if self.quick else ([self.n(150), self.n(300)], 2, self.w(6.0))
        rows = []
        for count in counts:
            for rep in range(1, reps + 1):
                plan = [("bare", self.bare())] + [(db, self.relay(f"relay now ({db})", env={"DATABASE_URL": url})) for db, url in urls.items()]
                plan.append(("sqlite-orm", self.relay("relay now (sqlite, ORM writes)", env={"DATABASE_URL": urls["sqlite"], "RELAY_TURN_WRITES": "orm"})))
                plan += [(f"before-{db}", self.relay(f"relay before ({db})", root=root, env={"DATABASE_URL": url}))
                         for db, url in before.items()]
                for which, dep in plan:
                    with dep:
                        self.warm(dep)
                        row = stream_step(dep, sessions=count, frame_ms=80, window=window, turn_s=1.0, probe_disk=True)
                        # SQLite's loop writer moved its batches to its thread after one kept the loop too long
                        row["sqlite_slow_batches"] = sum(s.output().count("sqlite_turn_writes_slow") for s in dep.servers)
                    row.update(rep=rep, which=which, turn_s=1.0)
                    rows.append(row)
                    say(f"    rep {rep} {which:<17} " + fmt_row(row) + f"  sqlite slow batches {row['sqlite_slow_batches']}")
        self.result["databases"] = rows

    def section_memory(self) -> None:
        """Idle memory per connection on a fresh server: RSS with N streams connected and idle."""
        n = 50 if self.quick else self.n(1000)
        rows = []
        plan = [self.baseline(), self.before(), self.relay(), self.relay(UVICORN, kind="uvicorn")]
        if self.quick:
            plan = plan[:3]
        for dep in filter(None, plan):
            with dep:
                self.warm(dep)
                row = stream_step(dep, sessions=n, frame_ms=80, window=0.5, settle=0.0, turn_s=3600.0, clients=2 if n >= 1000 else 1)
                rows.append(row)
                say(f"    {dep.label:<44} {row['streams']} idle connections: {row['rss_idle_per_conn_kb']} KB each")
        self.result["memory"] = rows

    def section_handshakes(self) -> None:
        """A burst of connections in one second, each answered with Connected (session rows
        written). The relay now may refuse some with CAPACITY (its event loop or its writes lag
        during the burst): counted apart from errors."""
        count = 50 if self.quick else self.n(1000)
        plan = [self.baseline(), self.before(), self.relay(), self.deployed_before(), self.deployed()]
        if self.quick:
            plan = plan[:3]
        rows = []
        for dep in filter(None, plan):
            with dep:
                self.warm(dep)
                r = burst(dep, count=count, burst_s=1.0)
                r["target"] = dep.label
                r["processes"] = len(dep.servers)
                r["server_errors"] = sum(s.log_errors()["count"] for s in dep.servers)
                r.pop("first_response_headers", None)
                rows.append(r)
                say(f"    {dep.label:<44} {r['ok']}/{count} connected in {r['span_s']:.2f} s = {r['rate']:.0f}/s,"
                    f" time to Connected p50 {r['handshake'].get('p50')} p99 {r['handshake'].get('p99')} ms,"
                    f" refused (CAPACITY) {r['refused']}, errors {r['errors']} server errors {r['server_errors']}")
        self.result["handshakes"] = rows

    def section_replay(self) -> None:
        turns = 100 if self.quick else 1000
        repeat = 3 if self.quick else 30
        session = "bench-history-" + uuid.uuid4().hex[:8]

        def seed(db_url: str, root: Path) -> None:  # each tree writes the history into its own schema
            env = {**os.environ, "DATABASE_URL": db_url, "DJANGO_DEBUG": "1"}
            env.pop("DJANGO_SETTINGS_MODULE", None)
            subprocess.run([PY, "-m", "bench.history", session, str(turns)], cwd=root, env=env, check=True)

        seed(self.db_url, ROOT)
        if not self.quick and self.args.before:
            seed(self.before_db_url(), self.before_root())
        rows = []
        plan = [self.relay(), self.deployed()] + ([] if self.quick else [self.before()])
        for dep in filter(None, plan):
            with dep:
                self.warm(dep)
                for since, expected in ((None, turns), (turns - 11, 10)):
                    cfg = {"mode": "replay", "targets": dep.targets[-1:], "session": session, "repeat": repeat,
                           "expected": expected, "since": since}
                    r = run_client(cfg)
                    r.update(target=dep.label, turns=turns, since=since, expected=expected)
                    rows.append(r)
                    say(f"    {dep.label:<34} history {turns}, since={since}: first replayed turn p50 {r['first'].get('p50')}"
                        f" p99 {r['first'].get('p99')} ms; all {expected} p50 {r['last'].get('p50')} p99 {r['last'].get('p99')} ms;"
                        f" errors {r['errors']}")
        self.result["replay"] = rows

    def section_fanout(self) -> None:
        """One speaker, 10 listening tabs: speaker's EndOfTurn -> each tab's EndOfTurn."""
        window = 4.0 if self.quick else self.w(12.0)
        rows = []
        plan = [self.relay("relay now, in-memory layer (1 daphne)"), self.deployed()]
        if not self.quick:
            plan.append(self.deployed_before())
        for dep in filter(None, plan):
            with dep:
                self.warm(dep)
                row = stream_step(dep, sessions=1, listeners=10, frame_ms=80, window=window, settle=1.0, turn_s=1.0)
                rows.append(row)
                say(f"    {dep.label:<34} speaker EndOfTurn -> 10 tabs: p50 {row['fan']['p50']} p99 {row['fan']['p99']} ms"
                    f" (ForceEndTurn -> listener EndOfTurn p99 {row['lst_eot']['p99']} ms, listener Update p99 {row['lst_upd']['p99']} ms,"
                    f" speaker Updates dropped {row['dropped_updates']}, listener EndOfTurns missing {row['listener_missing_eot']})")
        self.result["fanout"] = rows

    def section_tabs(self) -> None:
        """Cost of a second tab on the Redis pub/sub layer at a fixed number of speakers: now, now
        with every interim Update forwarded to listeners, and before."""
        n, window = (10, 2.0) if self.quick else (self.n(100), self.w(8.0))
        plan = [(self.deployed(), (0, 1))]
        if not self.quick:
            plan += [(self.deployed(DEP_NOW + ", every Update to listeners", env={"RELAY_LISTENER_UPDATE_SECONDS": "0"}), (1,)),
                     (self.deployed_before(), (0, 1))]
        rows = []
        for dep, counts in plan:
            if dep is None:
                continue
            with dep:
                self.warm(dep)
                for listeners in counts:
                    row = stream_step(dep, sessions=n, listeners=listeners, frame_ms=80, window=window)
                    rows.append(row)
                    say(fmt_row(row) + f"  redis {row['redis_cores']} cores  fan p99 {row['fan']['p99']} ms")
        self.result["tabs"] = rows

    def section_shedding(self) -> None:
        """Past capacity: new streams refused (CAPACITY, 4013) while those already in keep their
        latency; memory bounded when overloaded; clients that stop reading."""
        rows = []

        def step(dep: Deployment, kind: str, **kw: Any) -> dict[str, Any]:
            with dep:
                self.warm(dep)
                row = stream_step(dep, **kw)
            row["kind"] = kind
            rows.append(row)
            say(fmt_row(row) + f"  refused {row['refused']} of {row['asked']}; RSS {row['rss_mb']} MB, growing "
                f"{row['rss_growth_mb_per_min']} MB/min; loop lag {row['loop_lag_ms']} ms, write latency {row['write_latency_ms']} ms, "
                f"paused sockets {row['inbound_paused']}")
            return row

        if self.quick:  # the refusal path, through the stream cap (a few streams never load the process)
            step(self.relay("relay now, RELAY_MAX_STREAMS_PER_PROCESS=5", env={"RELAY_MAX_STREAMS_PER_PROCESS": "5"}), "admission",
                 sessions=8, frame_ms=80, window=2.0, settle=1.0, ramp=True, connect_rate=20)
            self.result["shedding"] = rows
            return
        ask, window = self.n(600), self.w(8.0)
        # (a) streams keep arriving at 100/s until 600 were asked for; admission (loop lag, write latency) decides
        step(self.relay("relay now, admission by load, no stream cap"), "admission", sessions=ask, frame_ms=80,
             window=window, settle=ask / 100 + 1, ramp=True, connect_rate=100)
        # (b) far past capacity: 2,000 streams of 40 ms frames arriving at 400/s on one process
        over = self.n(2000)
        for dep in filter(None, (self.before(f"relay before, overloaded ({over} x 40 ms)"),
                                 self.relay(f"relay now, overloaded ({over} x 40 ms)"))):
            step(dep, "overload", sessions=over, frame_ms=40, window=window, settle=over / 400 + 2, ramp=True,
                 connect_rate=400, clients=2)
        # (c) clients that send audio and read nothing
        step(self.relay(f"relay now, {self.n(200)} clients that stop reading"), "stop_reading", sessions=self.n(200),
             frame_ms=80, window=window * 2, stop_reading=True)
        self.result["shedding"] = rows

    def section_nginx(self) -> None:
        """The deployment in deploy/ behind nginx (TLS): two daphne processes, Redis, PostgreSQL, each
        process capped at half the streams. 1,000 real-time streams of 80 ms frames (a turn every
        4 s), then past capacity: 1,300 arriving at 200 a second while the first stream, the rest
        refused with CAPACITY. Counts the upstream resets nginx logs at each step (issue 15)."""
        from bench.stack import NginxDeployment, resets

        n, window = (20, 2.0) if self.quick else (self.n(1000), self.w(8.0))
        extra_n = max(1, round(n * 0.3))
        dep = NginxDeployment(DEP_NGINX, database_url=self.db_url, redis_url=self.redis_url,
                              env={"RELAY_MAX_STREAMS_PER_PROCESS": str(n // 2)})
        rows = []
        with dep:
            self.warm_stack(dep)
            steps = [("capacity", {"sessions": n}),
                     ("past capacity", {"sessions": n + extra_n, "ramp": True, "connect_rate": 200.0, "settle": (n + extra_n) / 200 + 2})]
            for kind, kw in steps:
                before = dep.problems()
                row = stream_step(dep, frame_ms=80, window=window, clients=2 if n >= 1000 else 1, extra=dep.client_options, **kw)
                problems = dep.problems() - before
                row.update(kind=kind, nginx_resets=resets(problems), nginx_log=dict(problems),
                           server_log_errors=sum(s.log_errors()["count"] for s in dep.servers))
                rows.append(row)
                say(fmt_row(row) + f"  ({kind}) nginx upstream resets {row['nginx_resets']}, daphne log errors {row['server_log_errors']}, "
                    f"nginx error log {row['nginx_log'] or 'empty'}")
        self.result["nginx"] = rows

    def warm_stack(self, dep: Any) -> None:
        stream_step(dep, sessions=4, frame_ms=80, window=1.0, settle=0.5, extra=dep.client_options)

    def section_profile(self) -> None:
        """py-spy on one relay process at 300 streams of 80 ms frames, now and before."""
        from bench import profile

        self.result["profile"] = profile.profile_relay(self, self.out)


def argv_shown(args: argparse.Namespace) -> list[str]:
    shown = []
    if args.quick:
        shown.append("--quick")
    if args.only:
        shown.append(f"--only {args.only}")
    if args.before != BEFORE_REV:
        shown.append(f"--before '{args.before}'")
    if args.scale != 1.0:
        shown.append(f"--scale {args.scale:g}")
    if args.window:
        shown.append(f"--window {args.window:g}")
    if getattr(args, "sqlite", False):
        shown.append("--sqlite")
    return shown


def git_describe(rev: str) -> dict[str, Any]:
    """Commit, subject and (for HEAD) whether the tree has uncommitted changes."""
    out = subprocess.run(["git", "log", "-1", "--format=%h %s", rev], cwd=ROOT, capture_output=True, text=True)
    commit, _, subject = out.stdout.strip().partition(" ")
    info: dict[str, Any] = {"rev": rev, "commit": commit or None, "subject": subject}
    if rev == "HEAD":
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "relay", "transcription_site"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        info["uncommitted_changes"] = bool(dirty)
    return info


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A checkout of ``rev`` (the relay before, for ``--before``), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-before-"))
    tree = tmp / "tree"
    try:
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True, capture_output=True, text=True)
        yield tree
    finally:
        remove_worktree(tree, tmp)


def remove_worktree(tree: Path, tmp: Path) -> None:
    if tree.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def sqlite_database(root: Path = ROOT, directory: Path | None = None) -> Iterator[str]:
    """A fresh SQLite database file (the relay's default backend), migrated by the tree at
    ``root``, in a new directory (under ``directory`` if given); removed afterwards."""
    from tests.support.live import migrate

    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-sqlite-", dir=directory))
    url = f"sqlite:///{tmp / 'db.sqlite3'}"
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_DEBUG": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    try:
        migrate(env, root=root)
        yield url
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_client(cfg: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    cfg = {**cfg, "wait_go": False}
    out = subprocess.run([PY, "-m", "bench.wsload", json.dumps(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    for line in out.stdout.splitlines():
        msg = json.loads(line)
        if msg["event"] == "result":
            return msg
    raise RuntimeError(f"client failed: {out.stderr[-2000:]}")


def burst(dep: Deployment, *, count: int, burst_s: float, deflate: bool = False) -> dict[str, Any]:
    return run_client({"mode": "burst", "targets": dep.targets, "count": count, "burst_s": burst_s, "deflate": deflate})


def _terminate(signum, frame):  # SIGTERM: stop our servers and drop the database on the way out
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description="Relay benchmark suite (docs/benchmarks.md)")
    parser.add_argument("--quick", action="store_true", help="a small, fast smoke run (CI)")
    parser.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--out", default=str(RESULTS), help="where latest.json/latest.md/charts go")
    parser.add_argument("--before", default=BEFORE_REV,
                        help=f"commit to compare against, run from a temporary git worktree (default {BEFORE_REV}; '' for none)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the full run's stream counts (e.g. 0.25 to try a section)")
    parser.add_argument("--window", type=float, default=0.0, help="measurement window in seconds instead of each section's own")
    parser.add_argument("--sqlite", action="store_true", help="run the relay on SQLite (its default) instead of PostgreSQL")
    parser.add_argument("--turn-s", type=float, default=4.0, help="the profile's load: a ForceEndTurn every this many seconds per stream")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    bench = Bench(args)
    say(f"Relay benchmark ({'quick' if args.quick else 'full'}): load average {bench.result['meta']['load_before']}")
    result = bench.run()
    out = Path(args.out)
    (out / "latest.json").write_text(json.dumps(result, indent=1))
    from bench import report

    report.write(result, out)
    say(f"wrote {out / 'latest.md'}, {out / 'latest.json'} and charts in {result['meta']['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
