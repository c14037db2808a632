"""py-spy on a relay process under load: a flame graph (SVG) and the top functions by own and
by inclusive time, so the report can say where the CPU goes."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

PYSPY = Path(sys.executable).with_name("py-spy")


def available() -> bool:
    return PYSPY.exists() or shutil.which("py-spy") is not None


def record(pid: int, seconds: float, raw: Path, svg: Path) -> None:
    exe = str(PYSPY if PYSPY.exists() else shutil.which("py-spy"))
    base = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100", "--nonblocking"]
    # two samplers side by side over the same seconds: collapsed stacks to count, an SVG to look at
    procs = [subprocess.Popen([*base, "-f", fmt, "-o", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for fmt, path in (("raw", raw), ("flamegraph", svg))]
    for p in procs:
        p.wait(seconds + 30)


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    own: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        names = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].split("/")[-1] + ")" if " (" in f else f for f in frames]
        own[names[-1]] += n
        for name in set(names):
            incl[name] += n
    share = lambda c: [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)] if total else []
    return {"samples": total, "own": share(own), "inclusive": share(incl)}


def profile_relay(bench: Any, out: Path) -> dict[str, Any]:
    from bench.run import fmt_row, say, stream_step

    if not available():
        say("    py-spy is not installed (pip install py-spy==0.4.3); skipping the profile")
        return {}
    result: dict[str, Any] = {}
    for key, dep in (("now", bench.relay()), ("before", bench.before())):
        if dep is None:
            continue
        raw, svg = out / f"profile-{key}.txt", out / f"profile-{key}.svg"
        with dep:
            bench.warm(dep)
            pid = dep.servers[0].pid
            # the window opens after connect + 2 s settle; record 8 s inside a 12 s window
            timer = threading.Timer(4.0, record, args=(pid, 8, raw, svg))
            timer.start()
            row = stream_step(dep, sessions=bench.n(300), frame_ms=80, window=12.0, turn_s=getattr(bench.args, "turn_s", 4.0))
            timer.join()
        say(fmt_row(row))
        summary = summarise(raw) if raw.exists() else {}
        raw.unlink(missing_ok=True)
        result[key] = {"row": row, "svg": svg.name, **summary}
        for name, share in summary.get("own", [])[:12]:
            say(f"      {share:5.1f}% own  {name}")
    return result
