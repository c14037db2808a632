"""``make soak``: a bounded soak of the relay as deployed, with reconnect churn.

    python -m bench.soak --minutes 30 --streams 50            # the acceptance soak (make soak; 30 minutes)
    python -m bench.soak --minutes 1 --streams 10 --out /tmp/soak

Two daphne processes (``--processes``) share Redis (pub/sub layer) and a fresh PostgreSQL
database; ``--streams`` sessions stream tone in real time with the fake engine, a ForceEndTurn
every 2 s. Each connection lives an exponentially distributed time (``--mean-life``), then closes
cleanly or (``--abrupt``, default 30%) is dropped without a close frame, and its session
reconnects at once to the other process with ``since=`` its last turn. Every ``--tick`` seconds
it records each server's RSS and the error counts; at the end it computes the four stability
metrics (relay.ops.stability, from the Connection rows) and checks every session's turns for gaps and
duplicates. Writes soak.json, soak.md and soak.png to ``--out`` (default bench/results/) and
exits non-zero when memory grew or a turn was lost.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.servers import ROOT, Server, machine_load, pids_named, proc_cpu

RESULTS = ROOT / "bench" / "results"
PY = sys.executable
#: Memory is "flat" when the fitted RSS slope over the second half of the run, per process,
#: projects to less than this many MB per hour.
FLAT_MB_PER_HOUR = 20.0


def stability_from_db(start: str, end: str, gaps: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run inside a process with DATABASE_URL set: the four metrics over [start, end), and for
    each turn a client never saw, what the database holds for it."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "transcription_site.settings")
    import django

    django.setup()
    from django.utils import timezone

    from relay.ops import stability
    from relay.models import Connection, live_cutoff

    s, e = dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(end)
    rows = Connection.objects.filter(opened_at__lt=e).values(*stability.RECORD_FIELDS)
    records = stability.records_from_rows(rows, live_cutoff=live_cutoff())
    codes: dict[str, int] = {}
    for r in stability.ended_in(records, s, e):
        codes[str(r.close_code)] = codes.get(str(r.close_code), 0) + 1
    out = [
        {"key": m.key, "label": m.label, "value": m.value, "display": m.display, "level": m.level, "samples": m.samples,
         "detail": m.detail, "thresholds": m.thresholds_display}
        for m in stability.stability_metrics(records, s, e)
    ]
    out.append({"key": "close_codes", "codes": codes, "now": timezone.now().isoformat()})
    from relay.models import Session, Turn

    explained = []
    for g in gaps or []:
        rows = {t["index"]: t for t in Turn.objects.filter(session_id=g["session"], index__in=g["missing"]).values("index", "trigger", "connection_id", "created_at")}
        nxt = Session.objects.filter(pk=g["session"]).values_list("next_turn_index", flat=True).first()
        explained.append({"session": g["session"], "next_turn_index": nxt,
                          "missing": [{"index": i, "in_db": i in rows, "trigger": rows[i]["trigger"] if i in rows else None} for i in g["missing"]]})
    out.append({"key": "gaps", "explained": explained})
    return out


def slope_mb_per_hour(ts: list[float], rss: list[float]) -> float:
    if len(ts) < 3:
        return 0.0
    half = len(ts) // 2
    x, y = np.asarray(ts[half:]), np.asarray(rss[half:])
    if np.ptp(x) == 0:
        return 0.0
    return float(np.polyfit(x, y, 1)[0] * 3600)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ticks = result["ticks"]
    t = [x["t"] / 60 for x in ticks]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for i in range(len(ticks[0]["rss_mb"]) if ticks else 0):
        a1.plot(t, [x["rss_mb"][i] for x in ticks], marker=".", label=f"daphne {i + 1} RSS")
    a1.set(ylabel="MB", title=f"Soak: {result['streams']} streams, {result['minutes']} min, reconnect churn")
    a1.set_ylim(bottom=0)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.plot(t, [x["live"] for x in ticks], label="live connections")
    a2.plot(t, [x["connections"] for x in ticks], label="connections opened (cumulative)")
    a2.plot(t, [sum(x["errors"].values()) + x["connect_failed"] + x["unexpected_lost"] for x in ticks], label="errors (cumulative)")
    a2.set(xlabel="minutes", ylabel="count")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_md(r: dict[str, Any], path: Path) -> None:
    c = r["client"]["counters"]
    L = [
        "# Relay soak: latest run", "",
        f"`{r['command']}` on {r['started']}: {r['processes']} daphne processes, Redis pub/sub layer, PostgreSQL, "
        f"{r['streams']} real-time streams ({r['frame_ms']} ms frames, fake engine), connections living "
        f"{r['mean_life_s']:.0f} s on average, {r['abrupt_share']:.0%} of them dropped abruptly and resumed with `since`. "
        f"Load average before {r['load_before']['load1']}, after {r['load_after']['load1']} ({r['load_before']['cores']} cores).", "",
        f"**Memory {'flat' if r['memory_flat'] else 'GREW'}**: RSS per process start → end "
        + ", ".join(f"{a:.1f} → {b:.1f} MB" for a, b in zip(r["ticks"][0]["rss_mb"], r["ticks"][-1]["rss_mb"]))
        + f"; fitted slope over the second half {', '.join(f'{s:+.1f}' for s in r['slopes_mb_per_hour'])} MB/hour "
        f"(flat means under {FLAT_MB_PER_HOUR:g}).", "",
        f"**Turns**: {r['client']['turns_seen']} finished turns seen, {r['client']['turn_gaps']} gaps, "
        f"{r['client']['turn_duplicates']} duplicates across reconnects.", "",
        f"**Connections**: {c['connections']} opened; {c['clean']} closed cleanly and {c['abrupt']} dropped by the client "
        f"(injected churn); {c['server_closed']} closed by the server, {c['unexpected_lost']} lost unexpectedly, "
        f"{c['connect_failed']} failed to connect; client-side errors {r['client']['errors'] or 0}, "
        f"reconnection (drop → Connected) p50 {r['client']['reconnect'].get('p50')} ms, p99 {r['client']['reconnect'].get('p99')} ms.", "",
        "## The four stability metrics (relay.ops.stability, from the Connection rows)", "",
        "| metric | value | level | samples | detail | thresholds |", "|---|---|---|---|---|---|",
    ]
    for m in r["stability"]:
        if "label" in m:
            L.append(f"| {m['label']} | {m['display']} | {m['level']} | {m['samples']} | {m['detail']} | {m['thresholds']} |")
    codes = next((m["codes"] for m in r["stability"] if m.get("key") == "close_codes"), {})
    L += ["", f"Close codes recorded: {codes}. The disconnection rate counts the injected abrupt drops (1006): "
          f"it should sit near the injected share, and anything above it is the relay's doing.", "",
          "| minute | " + " | ".join(f"daphne {i + 1} MB" for i in range(r["processes"])) + " | live | opened | errors |",
          "|---|" + "---|" * (r["processes"] + 3)]
    for x in r["ticks"]:
        L.append(f"| {x['t'] / 60:.1f} | " + " | ".join(f"{v:.1f}" for v in x["rss_mb"])
                 + f" | {x['live']} | {x['connections']} | {sum(x['errors'].values()) + x['connect_failed'] + x['unexpected_lost']} |")
    L += ["", f"![soak]({r['plot']})", ""]
    path.write_text("\n".join(L))


def _terminate(signum, frame):  # SIGTERM: stop our servers and drop the database on the way out
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    p = argparse.ArgumentParser(description="Bounded soak of the relay as deployed (docs/benchmarks.md)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--frame-ms", type=int, default=80)
    p.add_argument("--mean-life", type=float, default=60.0, help="mean seconds a connection lives before churn")
    p.add_argument("--abrupt", type=float, default=0.3, help="share of connection ends that are abrupt drops")
    p.add_argument("--tick", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--layer", choices=["pubsub", "core"], default="pubsub")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--stability-only", nargs=3, metavar=("START", "END", "GAPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stability_only:
        start, end, gaps = args.stability_only
        print(json.dumps(stability_from_db(start, end, json.loads(gaps))))
        return 0
    if args.minutes > 120 or args.streams > 2000:
        p.error("a soak is bounded: at most 120 minutes and 2000 streams")
    os.chdir(ROOT)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tests.support.services import REDIS_URL, postgres_database

    backend = {"pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer", "core": "channels_redis.core.RedisChannelLayer"}[args.layer]
    result: dict[str, Any] = {
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "minutes": args.minutes, "streams": args.streams, "processes": args.processes, "frame_ms": args.frame_ms,
        "mean_life_s": args.mean_life, "abrupt_share": args.abrupt, "layer": args.layer, "load_before": machine_load(),
    }
    print(f"Soak: {args.streams} streams for {args.minutes} min on {args.processes} daphne processes", flush=True)
    with postgres_database() as db_url:
        env = {"DATABASE_URL": db_url, "DATABASE_CONN_MAX_AGE": "60", "REDIS_URL": REDIS_URL, "RELAY_CHANNEL_LAYER_BACKEND": backend}
        servers = [Server("daphne", env=env, name=f"soak{i}") for i in range(args.processes)]
        try:
            for s in servers:
                s.start()
            redis = pids_named("redis-server")
            start_ts = dt.datetime.now(dt.timezone.utc)
            cfg = {"mode": "soak", "targets": [["127.0.0.1", s.port] for s in servers], "streams": args.streams,
                   "minutes": args.minutes, "frame_ms": args.frame_ms, "mean_life_s": args.mean_life,
                   "abrupt_share": args.abrupt, "tick_s": args.tick}
            client = subprocess.Popen([PY, "-m", "bench.wsload", json.dumps(cfg)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            ticks = [{"t": 0.0, "rss_mb": [s.rss() / 2**20 for s in servers], "live": 0, "connections": 0, "errors": {},
                      "connect_failed": 0, "unexpected_lost": 0}]
            cpu0 = sum(s.cpu() for s in servers)
            redis0 = sum(proc_cpu(r) for r in redis)
            final = None
            for line in client.stdout:
                msg = json.loads(line)
                if msg["event"] == "tick":
                    msg["rss_mb"] = [round(s.rss() / 2**20, 2) for s in servers]
                    ticks.append(msg)
                    print(f"  {msg['t'] / 60:5.1f} min  RSS {' / '.join(f'{v:.1f}' for v in msg['rss_mb'])} MB  live {msg['live']}"
                          f"  opened {msg['connections']}  abrupt {msg['abrupt']}  clean {msg['clean']}"
                          f"  errors {sum(msg['errors'].values()) + msg['connect_failed'] + msg['unexpected_lost']}", flush=True)
                elif msg["event"] == "result":
                    final = msg
            client.wait(60)
            end_ts = dt.datetime.now(dt.timezone.utc)
            result["server_cores"] = round((sum(s.cpu() for s in servers) - cpu0) / (args.minutes * 60), 3)
            result["redis_cores"] = round((sum(proc_cpu(r) for r in redis) - redis0) / (args.minutes * 60), 3)
            result["server_errors"] = [s.log_errors() for s in servers]
        finally:
            for s in servers:
                s.stop()
        if final is None:
            print("the soak client failed", file=sys.stderr)
            return 2
        time.sleep(0.5)
        denv = {**os.environ, "DATABASE_URL": db_url, "DJANGO_DEBUG": "1"}
        denv.pop("DJANGO_SETTINGS_MODULE", None)
        stab = subprocess.run([PY, "-m", "bench.soak", "--stability-only", start_ts.isoformat(), end_ts.isoformat(),
                               json.dumps(final.get("turn_gap_detail", []))],
                              cwd=ROOT, env=denv, capture_output=True, text=True, check=True)
        result["stability"] = json.loads(stab.stdout.strip().splitlines()[-1])
    final.pop("records", None)
    final.pop("reconnects", None)
    result["client"] = final
    result["ticks"] = ticks
    result["load_after"] = machine_load()
    result["slopes_mb_per_hour"] = [round(slope_mb_per_hour([t["t"] for t in ticks], [t["rss_mb"][i] for t in ticks]), 2)
                                    for i in range(args.processes)]
    result["memory_flat"] = all(s < FLAT_MB_PER_HOUR for s in result["slopes_mb_per_hour"])
    result["plot"] = "soak.png"
    plot(result, out / "soak.png")
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    write_md(result, out / "soak.md")
    for m in result["stability"]:
        if "label" in m:
            print(f"  {m['label']}: {m['display']} ({m['level']}; {m['detail']})")
    print(f"  memory {'flat' if result['memory_flat'] else 'GREW'} (slopes {result['slopes_mb_per_hour']} MB/hour); turns seen "
          f"{final['turns_seen']}, gaps {final['turn_gaps']}, duplicates {final['turn_duplicates']}; wrote {out / 'soak.md'}")
    ok = result["memory_flat"] and final["turn_gaps"] == 0 and final["turn_duplicates"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
