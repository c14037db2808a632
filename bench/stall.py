"""Turn writes while the disk stalls: the relay on SQLite (its default) with its turn writes on the
event loop (``RELAY_TURN_WRITES=loop``, the default) and on a thread of their own (``thread``),
its database on bench/stallfs.py, a pass-through filesystem whose writes stop for ``--stall-ms``
every ``--every-s`` seconds. The arms take turns, with stalls off and on, ``--reps`` times.

One daphne process, the fake engine, 80 ms frames and a ForceEndTurn every second per stream (issue
18's load). *EndOfTurn* is ForceEndTurn -> EndOfTurn: a turn's write waits for the disk either
way, since a finished turn is stored before anyone hears of it. *Update* is the frame that
completes an Update's audio -> that Update: it needs no write, so when it is late too, the stall
held streams that were not writing, which is what a blocked ``write()`` on the event loop does.

    .venv/bin/python -m bench.stall [--streams 150] [--window 6] [--reps 2] [--stall-ms 300] [--every-s 2] [--before REV] [--out DIR]

With ``--before REV`` the relay at that commit runs too, with its default (``loop``) writes.

Needs /dev/fuse, fusermount3 (Debian's fuse3) and mfusepy (requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.run import Deployment, fmt_row, git_describe, lost, say, sqlite_database, stream_step, worktree
from bench.servers import ROOT, Server, machine_load

ARMS = ("loop", "thread")


def fuse_missing() -> str | None:
    """Why a FUSE mount cannot be made here, or None."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (apt-get install fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "no mfusepy (pip install -r requirements-dev.txt)"
    return None


class StallMount:
    """bench.stallfs mounted on a fresh directory; ``stalls(on)`` turns its stalls on and off."""

    def __init__(self, stall_ms: float, every_s: float) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-bench-stall-"))
        self.under, self.mountpoint, self.control = self.tmp / "under", self.tmp / "mnt", self.tmp / "control"
        self.log = self.tmp / "stallfs.log"
        self.stall_ms, self.every_s = stall_ms, every_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "StallMount":
        self.under.mkdir()
        self.mountpoint.mkdir()
        self.stalls(False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.stallfs", str(self.under), str(self.mountpoint), "--control", str(self.control),
             "--stall-ms", str(self.stall_ms), "--every-s", str(self.every_s)],
            cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"stallfs did not mount: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stalls(self, on: bool) -> None:
        self.control.write_text("on" if on else "off")

    def stalled(self) -> list[float]:
        """The length of every stall so far, in seconds."""
        return [float(line.split()[2]) for line in self.log.read_text().splitlines() if line.startswith("stall ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=150)
    parser.add_argument("--window", type=float, default=6.0, help="measured seconds per row")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--stall-ms", type=float, default=300.0)
    parser.add_argument("--every-s", type=float, default=2.0)
    parser.add_argument("--before", default="", help="also run RELAY_TURN_WRITES=loop of the relay at this commit (arm 'loop, before')")
    parser.add_argument("--out", type=Path, default=None, help="write stall.md and stall.json here")
    args = parser.parse_args()
    missing = fuse_missing()
    if missing:
        sys.exit(f"bench.stall needs a FUSE mount: {missing}")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_before = machine_load()
    rows: list[dict[str, Any]] = []
    say(f"Turn writes while the disk stalls: {args.streams} streams, {args.stall_ms:g} ms stalls every {args.every_s:g} s, "
        f"{args.reps} rep(s); load average before {load_before}")
    with ExitStack() as stack:
        mount = stack.enter_context(StallMount(args.stall_ms, args.every_s))
        url = stack.enter_context(sqlite_database(directory=mount.mountpoint))
        arms = [(mode, ROOT) for mode in ARMS]
        if args.before:
            arms.insert(0, ("loop, before", stack.enter_context(worktree(args.before))))
        for rep in range(1, args.reps + 1):
            for stalls in (False, True):
                for mode, root in arms:
                    env = {"DATABASE_URL": url, "DATABASE_CONN_MAX_AGE": "60", "RELAY_LOG_LEVEL": "INFO", "RELAY_TURN_WRITES": mode.split(",")[0]}
                    dep = Deployment(f"relay (sqlite on stallfs, {mode})", [Server("daphne", env=env, root=root)])
                    with dep:
                        stream_step(dep, sessions=4, frame_ms=80, window=1.0, settle=0.5)  # warm, stalls off
                        mount.stalls(stalls)
                        before = len(mount.stalled())
                        row = stream_step(dep, sessions=args.streams, frame_ms=80, window=args.window, turn_s=1.0)
                        mount.stalls(False)
                        lengths = mount.stalled()[before:]
                        slow = sum(s.output().count("sqlite_turn_writes_slow") for s in dep.servers)
                    row.update(rep=rep, mode=mode, stalls=stalls, stall_count=len(lengths),
                               stalled_s=round(sum(lengths), 3), sqlite_slow_batches=slow)
                    rows.append(row)
                    say(f"    rep {rep} stalls {'on ' if stalls else 'off'} {mode:<12} {len(lengths)} stalls  " + fmt_row(row))
    result = {"meta": {"started": started, "command": "python -m bench.stall " + " ".join(sys.argv[1:]), "load_before": load_before,
                       "load_after": machine_load(), "streams": args.streams, "stall_ms": args.stall_ms, "every_s": args.every_s,
                       "now": git_describe("HEAD"), "before": git_describe(args.before) if args.before else None},
              "rows": rows}
    table = report(result)
    say("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stall.json").write_text(json.dumps(result, indent=1))
        (args.out / "stall.md").write_text(table)
        say(f"wrote {args.out / 'stall.md'} and {args.out / 'stall.json'}")


def report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Turn writes while the disk stalls\n",
             f"`{meta['command']}` on {meta['started']}: {meta['streams']} streams of 80 ms frames, a ForceEndTurn every second per "
             f"stream, one daphne process on SQLite on bench/stallfs.py; stalls of {meta['stall_ms']:g} ms every {meta['every_s']:g} s "
             f"when on. Load average before {meta['load_before']}, after {meta['load_after']}. Now: {meta['now']['commit']}"
             + (" with uncommitted changes" if meta["now"].get("uncommitted_changes") else "")
             + (f"; before: {meta['before']['commit']}" if meta["before"] else "") + ".\n",
             "| rep | stalls | turn writes | stalls in the step | EndOfTurn p50 / p99 / max ms | Update p50 / p99 / max ms "
             "| event loop lag p99 / max ms | achieved | errors | refused | lost | server cores | slow batches moved off the loop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fet, upd = r["fet_rtt"], r["upd"]
        lag = (r.get("tails_ms") or [{}])[0].get("lag") or {}
        lines.append(f"| {r['rep']} | {'on' if r['stalls'] else 'off'} | {r['mode']} | {r['stall_count']} ({r['stalled_s']:g} s) "
                     f"| {fet['p50']} / {fet['p99']} / {fet['max']} | {upd['p50']} / {upd['p99']} / {upd['max']} "
                     f"| {lag.get('p99')} / {lag.get('max')} | {r['achieved']:.2f} | {r['error_count']} | {r['refused']} | {lost(r)} "
                     f"| {r['server_cores']} | {r.get('sqlite_slow_batches', '–')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
