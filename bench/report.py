"""latest.md and the PNG charts from a benchmark result (bench.run writes latest.json)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REF_STREAMS, REF_FRAME = 300, 80
AUDIO_ONLY = 3600.0  # turn_s of the rows without turns

BASE = "baseline (bare websockets)"
BARE = "bare server (websockets, no engine)"
NOW = "relay now (1 daphne)"
BEFORE = "relay before (1 daphne)"
DEP_NOW = "deployed now (2 daphne+Redis)"
DEP_BEFORE = "deployed before (2 daphne+Redis)"
DEP_NGINX = "deployed behind nginx (TLS, 2 daphne+Redis+PostgreSQL)"
OWNFIRST = "relay now + own EndOfTurn before the write (declined)"
UVICORN = "uvicorn now (websockets-sansio)"
BOUNDED_MB_PER_MIN = 60.0  # "RSS bounded": grows by at most 1 MB/s over an overloaded window


def _v(x: Any, unit: str = "") -> str:
    return "–" if x is None else f"{x}{unit}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def lost(r: dict[str, Any]) -> int:
    """Events that did not arrive: Updates missing from a speaker's turn, ForceEndTurns never
    answered, EndOfTurns a listening tab never got (listeners get Updates coalesced, so a
    listener's missing Update is not a loss)."""
    return r["dropped_updates"] + r["missing_eot"] + r.get("listener_missing_eot", 0)


def saturated(r: dict[str, Any]) -> bool:
    """A step the server did not keep up with: its CPU per frame counts frames it had not yet
    processed, its latencies grow with the window."""
    p99 = r["fet_rtt"]["p99"] if r["fet_rtt"]["n"] else r["upd"]["p99"]
    return r["achieved"] < 0.9 or p99 is None or p99 > 1000 or r.get("busy_after_s", 0) >= 5


def _find(rows: list[dict], **match: Any) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _each(values: list | None) -> str:
    """A per-process figure (None from servers that do not report it, e.g. the before tree)."""
    return "–" if not values or all(v is None for v in values) else " + ".join(_v(v) for v in values)


def _burst_errors(r: dict[str, Any]) -> int:
    return sum(r["errors"].values()) + r["server_errors"]


# -- targets: (target, relay now, verdict, relay before) ------------------------------------------
def _ref_streams(variants: list[dict]) -> int:
    """The reference load: 300 streams, or what a --scale'd run used instead (its audio-only rows)."""
    return next((r["asked"] for r in variants if r["target"] == BASE and r.get("turn_s") == AUDIO_ONLY), REF_STREAMS)


def _cpu_target(variants: list[dict]) -> list[str] | None:
    ref = _ref_streams(variants)
    base = _find(variants, target=BASE, streams=ref, frame_ms=REF_FRAME, turn_s=AUDIO_ONLY)
    if not base:
        return None

    def measure(label: str) -> tuple[str, str] | None:
        audio = _find(variants, target=label, streams=ref, frame_ms=REF_FRAME, turn_s=AUDIO_ONLY)
        turns = _find(variants, target=label, streams=ref, frame_ms=REF_FRAME, turn_s=4.0)
        if not (audio and turns):
            return None
        ratio = _ratio(audio["cpu_per_frame_us"], base["cpu_per_frame_us"])
        p99 = turns["fet_rtt"]["p99"]
        text = (f"{ratio}x ({audio['cpu_per_frame_us']} vs {base['cpu_per_frame_us']} µs, audio only); EoT p99 {p99} ms"
                + (" (not keeping up)" if saturated(turns) else ""))
        cpu_ok, lat_ok = ratio is not None and ratio <= 2, p99 is not None and p99 <= 50
        verdict = ("met" if cpu_ok and lat_ok else "CPU met, EoT p99 not" if cpu_ok
                   else "EoT p99 met, CPU not" if lat_ok else "not met")
        return text, verdict

    now, before = measure(NOW), measure(BEFORE)
    if not now:
        return None
    return [f"CPU/frame <= 2x bare at {ref} x {REF_FRAME} ms (audio only), ForceEndTurn→EndOfTurn p99 <= 50 ms "
            f"(a turn every 4 s)", now[0], now[1], before[0] if before else "–"]


def _x_bare(rows: list[dict], r: dict, label: str = BARE) -> float | None:
    """``r``'s CPU per frame over the same load's row of ``label`` (the bare server, or bench.baseline)."""
    b = _find(rows, target=label, streams=r["streams"], frame_ms=r["frame_ms"], turn_s=r.get("turn_s"))
    return _ratio(r["cpu_per_frame_us"], b["cpu_per_frame_us"]) if b else None


def _turn_per_second_target(variants: list[dict]) -> list[str] | None:
    """Issue 18: a turn per second per stream at the reference load, one process: CPU per frame
    <= 2x the bare server's (no engine work), ForceEndTurn→EndOfTurn p99 <= 50 ms."""
    ref = _ref_streams(variants)

    def measure(label: str) -> tuple[str, str] | None:
        r = _find(variants, target=label, streams=ref, frame_ms=REF_FRAME, turn_s=1.0)
        if not r:
            return None
        bare, base = _x_bare(variants, r), _x_bare(variants, r, BASE)
        p99 = r["fet_rtt"]["p99"]
        text = (f"{_v(bare)}x bare ({r['cpu_per_frame_us']} µs; {_v(base)}x bench.baseline); EoT p99 {p99} ms; "
                f"{r['error_count']} errors, {lost(r)} lost" + (" (not keeping up)" if saturated(r) else ""))
        cpu_ok, lat_ok = bare is not None and bare <= 2, p99 is not None and p99 <= 50
        verdict = ("met" if cpu_ok and lat_ok else "CPU met, EoT p99 not" if cpu_ok
                   else "EoT p99 met, CPU not" if lat_ok else "not met")
        return text, verdict

    now, before = measure(NOW), measure(BEFORE)
    if not now:
        return None
    return [f"CPU/frame <= 2x the bare server (no engine work) at {ref} x {REF_FRAME} ms, a turn per second per stream, "
            f"ForceEndTurn→EndOfTurn p99 <= 50 ms, one process", now[0], now[1], before[0] if before else "–"]


def _nginx_target(rows: list[dict]) -> list[str] | None:
    """Issue 18: deployed behind nginx, 1,000 real-time streams clean (EoT p99 <= 50 ms, nothing lost),
    past that CAPACITY, and (issue 15) no refusal seen by nginx as an upstream reset."""
    cap = next((r for r in rows if r.get("kind") == "capacity"), None)
    if not cap:
        return None
    past = next((r for r in rows if r.get("kind") == "past capacity"), None)
    p99 = cap["fet_rtt"]["p99"]
    clean = p99 is not None and p99 <= 50 and not lost(cap) and not cap["error_count"] and not cap["refused"] and cap["achieved"] >= 0.99
    text = (f"{cap['streams']} streams: EoT p99 {p99} ms, audio→Update p99 {cap['upd']['p99']} ms, {lost(cap)} lost, {cap['error_count']} errors, "
            f"{cap['refused']} refused; daphne {cap['server_cores']} cores, client {cap['client_cores']} cores (machine {cap['machine_busy_cores']})")
    refusals_ok = True
    if past:
        refusals_ok = past["refused"] > 0 and not past["nginx_resets"]
        text += (f"; {past['asked']} arriving: {past['streams']} accepted, {past['refused']} refused (CAPACITY), EoT p99 {past['fet_rtt']['p99']} ms, "
                 f"{past['error_count']} errors; nginx upstream resets {cap['nginx_resets']} + {past['nginx_resets']}")
    verdict = "met" if clean and refusals_ok else "refusals clean, streams not" if refusals_ok else "not met"
    return [f"deployed behind nginx: {cap['asked']} streams of 80 ms, EoT p99 <= 50 ms, nothing lost; past that CAPACITY with close frames "
            "(no upstream reset in nginx's log)", text, verdict, "–"]


def _largest_clean(sweep: list[dict], label: str) -> int | None:
    """The most 80 ms streams a series held with p99 <= 50 ms and nothing lost, refused or failed."""
    dep = [r for r in sweep if r["target"] == label and r["frame_ms"] == 80]
    if not dep:
        return None
    good = [r for r in dep if (r["fet_rtt"]["p99"] or 1e9) <= 50 and r["achieved"] >= 0.99 and not lost(r)
            and not r["error_count"] and not r["refused"]]
    return max((r["streams"] for r in good), default=0)


def _streams_target(sweep: list[dict]) -> list[str] | None:
    def measure(label: str) -> tuple[str, int] | None:
        best = _largest_clean(sweep, label)
        if best is None:
            return None
        steps = ", ".join(str(r["asked"]) for r in sweep if r["target"] == label and r["frame_ms"] == 80)
        return f"largest clean step {best} (steps: {steps})", best

    now, before = measure(DEP_NOW), measure(DEP_BEFORE)
    if not now:
        return None
    return [">= 2,000 streams of 80 ms deployed (2 daphne + Redis), p99 <= 50 ms, nothing lost or refused",
            now[0], "met" if now[1] >= 2000 else "not met", before[0] if before else "–"]


def _tabs_ratio(tabs: list[dict], label: str) -> tuple[float | None, dict | None]:
    two = next((r for r in tabs if r["target"] == label and r["listeners"]), None)
    one = _find(tabs, target=label, listeners=0) or _find(tabs, target=DEP_NOW, listeners=0)
    if not (one and two):
        return None, None
    return _ratio(two["cpu_per_frame_with_redis_us"], one["cpu_per_frame_with_redis_us"]), two


def _tabs_target(tabs: list[dict]) -> list[str] | None:
    now, _ = _tabs_ratio(tabs, DEP_NOW)
    if now is None:
        return None
    every = [f"{_tabs_ratio(tabs, r['target'])[0]}x with every Update forwarded" for r in tabs
             if r["target"] not in (DEP_NOW, DEP_BEFORE) and r["listeners"]]
    before, _ = _tabs_ratio(tabs, DEP_BEFORE)
    return ["two-tab session <= 1.5x one-tab (pub/sub layer; CPU of servers + Redis per frame)",
            f"{now}x" + (f" ({'; '.join(every)})" if every else ""), "met" if now <= 1.5 else "not met",
            f"{before}x" if before is not None else "–"]


def _burst_text(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    return (f"{r['ok']}/{r['count']} connected, {r.get('refused', 0)} refused (CAPACITY), {_burst_errors(r)} errors, "
            f"p99 {r['handshake'].get('p99')} ms")


def _burst_verdict(r: dict[str, Any]) -> str:
    if _burst_errors(r) == 0 and r["ok"] == r["count"]:
        return "met"
    if _burst_errors(r) == 0:
        return f"not met: no errors, but {r.get('refused', 0)} refused by admission control"
    return "not met"


def _overload_text(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    return (f"RSS {r['rss_mb']} MB at the end, {r['rss_growth_mb_per_min']} MB/min over the window; "
            f"{r['streams']} accepted, {r['refused']} refused")


def targets(res: dict[str, Any]) -> list[list[str]]:
    """[target, relay now, verdict, relay before] for issue 8's targets and issue 4's replay target."""
    out: list[list[str] | None] = []
    out.append(_cpu_target(res.get("variants", [])))
    out.append(_turn_per_second_target(res.get("variants", [])))
    out.append(_streams_target(res.get("sweep", [])))
    out.append(_tabs_target(res.get("tabs", [])))
    out.append(_nginx_target(res.get("nginx", [])))
    hs = res.get("handshakes", [])
    for now_label, before_label in ((NOW, BEFORE), (DEP_NOW, DEP_BEFORE)):
        r = _find(hs, target=now_label)
        if r:
            out.append([f"burst of {r['count']} connections in 1 s served without an error ({now_label})", _burst_text(r),
                        _burst_verdict(r), _burst_text(_find(hs, target=before_label))])
    mem = res.get("memory", [])
    r = _find(mem, target=NOW)
    if r:
        b = _find(mem, target=BEFORE)
        kb = r["rss_idle_per_conn_kb"]
        out.append(["idle memory <= 40 KB per connection (one daphne)", f"{kb} KB at {r['streams']} connections",
                    "met" if kb is not None and kb <= 40 else "not met", f"{b['rss_idle_per_conn_kb']} KB" if b else "–"])
    r = _find(hs, target=NOW)
    if r:
        b = _find(hs, target=BEFORE)
        out.append([f">= 500 new sessions/s per process, rows written (the burst above, {r['count']} offered in 1 s: connected ÷ span)", f"{r['rate']:.0f}/s",
                    "met" if r["rate"] >= 500 else "not met", f"{b['rate']:.0f}/s" if b else "–"])
    shed = res.get("shedding", [])
    r = next((x for x in shed if x.get("kind") == "admission"), None)
    if r:
        p99, upd = r["fet_rtt"]["p99"], r["upd"]["p99"]
        within = p99 is not None and p99 <= 50 and upd is not None and upd <= 50
        text = (f"{r['streams']} accepted, {r['refused']} refused of {r['asked']} arriving while the others stream; accepted: "
                f"EoT p99 {p99} ms, audio→Update p99 {upd} ms, {r['error_count']} errors, {lost(r)} lost")
        if r["refused"] and within and not r["error_count"]:
            verdict = "met"
        elif not r["refused"] and within:
            verdict = f"not reached: all {r['asked']} fit"
        elif r["refused"]:
            verdict = "refuses, but accepted streams not within 50 ms" if not within else "not met (errors)"
        else:
            verdict = "not met: nothing refused, latency past 50 ms"
        out.append(["past capacity: new streams refused (CAPACITY / 4013), accepted streams' p99 within 50 ms", text, verdict, "–"])
    r = next((x for x in shed if x.get("kind") == "overload" and not x["target"].startswith("relay before")), None)
    if r:
        b = next((x for x in shed if x.get("kind") == "overload" and x["target"].startswith("relay before")), None)
        out.append([f"RSS bounded under overload ({r['target'].split('(')[-1].rstrip(')')}; bounded: <= {BOUNDED_MB_PER_MIN:g} MB/min)",
                    _overload_text(r), "met" if r["rss_growth_mb_per_min"] <= BOUNDED_MB_PER_MIN else "not met", _overload_text(b)])
    r = next((x for x in shed if x.get("kind") == "stop_reading"), None)
    if r:
        out.append([f"RSS bounded with {r['streams']} clients that stop reading", _overload_text(r),
                    "met" if r["rss_growth_mb_per_min"] <= BOUNDED_MB_PER_MIN else "not met", "–"])
    replay = [x for x in res.get("replay", []) if x["since"] is None]
    before = next((x for x in replay if x["target"] == BEFORE), None)
    for r in replay:
        if r["target"] == BEFORE:
            continue
        p99 = r["first"].get("p99")
        out.append([f"reconnect → first replayed turn p99 <= 100 ms, {r['turns']}-turn history ({r['target']})",
                    f"p99 {p99} ms (all {r['expected']}: p99 {r['last'].get('p99')} ms)",
                    "met" if p99 is not None and p99 <= 100 else "not met",
                    f"p99 {before['first'].get('p99')} ms ({BEFORE})" if before and r["target"] == NOW else "–"])
    return [t for t in out if t]


#: The databases section's relay rows, in the order their columns appear.
DATABASE_ROWS = {"postgresql": "PostgreSQL", "sqlite": "SQLite", "sqlite-orm": "SQLite, ORM writes",
                 "before-postgresql": "PostgreSQL, before", "before-sqlite": "SQLite, before"}


def databases_table(rows: list[dict[str, Any]]) -> list[str]:
    """The databases section: per load and repetition, the bare server's CPU per frame and each
    database's (SQLite also with its turns written through the ORM, the path before its own
    writer; with --before, the before commit on both databases), its ratio to that bare row and
    ForceEndTurn -> EndOfTurn p99 (issue 18's targets: 2x and 50 ms)."""
    present = [which for which in DATABASE_ROWS if any(r["which"] == which for r in rows)]
    lines = ["| streams | rep | bare µs/frame | " + " | ".join(f"{DATABASE_ROWS[w]} µs/frame (x bare, server cores) | EoT p99" for w in present)
             + " | errors, refused, lost |", "|---|---|---|" + "---|---|" * len(present) + "---|"]
    for streams, rep in sorted({(r["streams"], r["rep"]) for r in rows}):
        got = {r["which"]: r for r in rows if r["streams"] == streams and r["rep"] == rep}
        bare = got.get("bare")
        cells = []
        for db in present:
            r = got.get(db)
            if r is None:
                cells += ["–", "–"]
                continue
            x = _ratio(r["cpu_per_frame_us"], bare["cpu_per_frame_us"]) if bare else None
            cells += [f"{_v(r['cpu_per_frame_us'])} ({_v(x)}x, {r['server_cores']})" + (" **not keeping up**" if saturated(r) else ""),
                      f"{_v(r['fet_rtt']['p99'])} ms"]
        faults = ", ".join(f"{which} {r['error_count']}/{r['refused']}/{lost(r)}" for which, r in got.items())
        lines.append(f"| {streams} | {rep} | {_v(bare['cpu_per_frame_us']) if bare else '–'} | " + " | ".join(cells) + f" | {faults} |")
    return lines


def databases_tails_table(rows: list[dict[str, Any]]) -> list[str]:
    """Where the databases section's slow EndOfTurns waited: each relay row's EndOfTurn tail beside
    the tails of its turn writes (call to commit), of its event loop's lateness (the admission
    watch's 100 ms sleeps, woken late) and of the disk's fsync (bench.servers.FsyncProbe), all
    over the same measurement window."""
    def tail(d: dict[str, Any] | None) -> str:
        return f"{_v(d.get('p99'))} / {_v(d.get('max'))}" if d and d.get("n") else "–"

    lines = ["| streams | rep | database | EoT p99 / max ms | audio→Update p99 ms | turn write p99 / max ms | loop late p99 / max ms "
             "| disk fsync p99 / max ms |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["which"] != "bare"), key=lambda r: (r["streams"], r["rep"])):
        server = (r.get("tails_ms") or [{}])[0] or {}
        lines.append(f"| {r['streams']} | {r['rep']} | {r['which']} | {tail(r['fet_rtt'])} | {_v(r['upd']['p99'])} "
                     f"| {tail(server.get('write'))} | {tail(server.get('lag'))} | {tail(r.get('disk_fsync'))} |")
    return lines


def stream_table(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None = None) -> list[str]:
    lines = [
        "| target | frame | streams (+tabs) | turn every | achieved | EoT rtt p50 / p99 ms | audio→Update p50 / p99 ms | server CPU/frame µs "
        "| x bare (no engine) | x baseline (fake engine) | server cores | client cores | machine busy cores | errors | refused (CAPACITY) | lost "
        "| server busy after s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        match = {"turn_s": r["turn_s"]} if "turn_s" in r else {}
        b = _find(base_rows or [], target=BASE, streams=r["streams"], frame_ms=r["frame_ms"], **match)
        ratio = _ratio(r["cpu_per_frame_us"], b["cpu_per_frame_us"]) if b else None
        bare = _x_bare(base_rows or [], r) if "turn_s" in r else None
        tabs = (f"{r['streams']}" + (f" (+{r['listeners']})" if r["listeners"] else "")
                + (" **not keeping up**" if saturated(r) else ""))
        every = "audio only" if r.get("turn_s", 4.0) > 60 else f"{r.get('turn_s', 4.0):g} s"
        lines.append(
            f"| {r['target']} | {r['frame_ms']} ms | {tabs} | {every} | {r['achieved']:.2f} | {_v(r['fet_rtt']['p50'])} / {_v(r['fet_rtt']['p99'])} "
            f"| {_v(r['upd']['p50'])} / {_v(r['upd']['p99'])} | {_v(r['cpu_per_frame_us'])} | {_v(bare)} | {_v(ratio)} | {r['server_cores']} "
            f"| {r['client_cores']} | {r['machine_busy_cores']} | {r['error_count']} | {r['refused']} | {lost(r)} "
            f"| {r.get('busy_after_s', '–')} |"
        )
    return lines


def before_now(res: dict[str, Any]) -> list[tuple[str, str, float | None, float | None]]:
    """(measure, unit, before, now) pairs measured in the same run, for the table and the chart."""
    out = []
    v = res.get("variants", [])
    ref = _ref_streams(v)
    small = min((r["asked"] for r in v if r["target"] == BASE and r["asked"] < ref), default=100)
    for what, turn_s, key in ((f"CPU per frame, {ref} x 80 ms audio only", AUDIO_ONLY, "cpu"),
                              (f"CPU per frame, {ref} x 80 ms, a turn every 4 s", 4.0, "cpu"),
                              (f"EoT p99, {ref} x 80 ms, a turn every 4 s", 4.0, "eot"),
                              (f"CPU per frame, {ref} x 80 ms, a turn per second", 1.0, "cpu"),
                              (f"EoT p99, {ref} x 80 ms, a turn per second", 1.0, "eot"),
                              (f"EoT p99, {small} x 80 ms, a turn every 4 s", 4.0, "eot100")):
        n = small if key == "eot100" else ref
        b = _find(v, target=BEFORE, streams=n, turn_s=turn_s)
        a = _find(v, target=NOW, streams=n, turn_s=turn_s)
        if a or b:
            get = (lambda r: r["cpu_per_frame_us"]) if key == "cpu" else (lambda r: r["fet_rtt"]["p99"])
            out.append((what, "µs" if key == "cpu" else "ms", get(b) if b else None, get(a) if a else None))
    sweep = res.get("sweep", [])
    streams = {label: _largest_clean(sweep, label) for label in (DEP_BEFORE, DEP_NOW)}
    if any(x is not None for x in streams.values()):
        out.append(("deployed: largest clean step, 80 ms frames", "streams", streams[DEP_BEFORE], streams[DEP_NOW]))
    mem = res.get("memory", [])
    b, a = _find(mem, target=BEFORE), _find(mem, target=NOW)
    if a or b:
        out.append(("idle memory per connection", "KB", b and b["rss_idle_per_conn_kb"], a and a["rss_idle_per_conn_kb"]))
    hs = res.get("handshakes", [])
    b, a = _find(hs, target=BEFORE), _find(hs, target=NOW)
    if a or b:
        out.append(("new sessions per second, one process", "/s", b and round(b["rate"]), a and round(a["rate"])))
    tabs = res.get("tabs", [])
    b, a = _tabs_ratio(tabs, DEP_BEFORE)[0], _tabs_ratio(tabs, DEP_NOW)[0]
    if a or b:
        out.append(("second tab: CPU ratio (servers + Redis)", "x", b, a))
    shed = [r for r in res.get("shedding", []) if r.get("kind") == "overload"]
    b = next((r for r in shed if r["target"].startswith("relay before")), None)
    a = next((r for r in shed if not r["target"].startswith("relay before")), None)
    if a or b:
        out.append(("overloaded: RSS growth", "MB/min", b and b["rss_growth_mb_per_min"], a and a["rss_growth_mb_per_min"]))
    return out


def charts(res: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    sweep = res.get("sweep", [])
    if sweep:
        frames = sorted({r["frame_ms"] for r in sweep})
        fig, axes = plt.subplots(2, len(frames), figsize=(6 * len(frames), 8), squeeze=False)
        for col, fms in enumerate(frames):
            for label in dict.fromkeys(r["target"] for r in sweep):
                rows = [r for r in sweep if r["target"] == label and r["frame_ms"] == fms]
                xs = [r["streams"] for r in rows]
                line = axes[0][col].plot(xs, [r["fet_rtt"]["p99"] for r in rows], marker="o", label=label)[0]
                axes[1][col].plot(xs, [r["cpu_per_frame_us"] for r in rows], marker="o", label=label, color=line.get_color())
                sat = [r for r in rows if saturated(r)]
                axes[0][col].scatter([r["streams"] for r in sat], [r["fet_rtt"]["p99"] or r["upd"]["p99"] for r in sat],
                                     marker="x", s=90, color="black", zorder=5)
                axes[1][col].scatter([r["streams"] for r in sat], [r["cpu_per_frame_us"] for r in sat], marker="x", s=90, color="black", zorder=5)
            axes[0][col].axhline(50, color="grey", ls="--", lw=1)
            axes[0][col].set(title=f"{fms} ms frames: ForceEndTurn→EndOfTurn p99 (x: not keeping up)", xlabel="streams", ylabel="ms", xscale="log", yscale="log")
            axes[1][col].set(title=f"{fms} ms frames: server CPU per audio frame", xlabel="streams", ylabel="µs", xscale="log")
            for ax in axes[:, col]:
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=90)
        plt.close(fig)
        made.append("sweep.png")
    variants = res.get("variants", [])
    if variants:
        loads = sorted({(r["streams"], r.get("turn_s", 4.0)) for r in variants}, key=lambda x: (x[0], -x[1]))
        fig, axes = plt.subplots(len(loads), 1, figsize=(9, 1.2 + 0.45 * max(len([r for r in variants if (r["streams"], r.get("turn_s", 4.0)) == l]) for l in loads) * len(loads)), squeeze=False)
        axes = axes.T
        for col, (n, turn_s) in enumerate(loads):
            rows = [r for r in variants if r["streams"] == n and r.get("turn_s", 4.0) == turn_s]
            fms = rows[0]["frame_ms"]
            ax = axes[0][col]
            ax.barh([r["target"] for r in rows], [r["cpu_per_frame_us"] or 0 for r in rows],
                    color=["tab:gray" if saturated(r) else "tab:blue" for r in rows])
            base = _find(rows, target=BASE)
            if base and base["cpu_per_frame_us"]:
                ax.axvline(2 * base["cpu_per_frame_us"], color="tab:red", ls="--", lw=1, label="2x bare")
                ax.legend(fontsize=8)
            ax.invert_yaxis()
            what = "audio only" if turn_s > 60 else f"a turn every {turn_s:g} s"
            ax.set_title(f"server CPU per frame, {n} x {fms} ms, {what}; grey: not keeping up", fontsize=9)
            ax.set_xlabel("µs")
            ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "variants.png", dpi=90)
        plt.close(fig)
        made.append("variants.png")
    fan = res.get("fanout", [])
    if fan:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [r["target"] for r in fan]
        ax.barh([f"{l} p50" for l in labels], [r["fan"]["p50"] or 0 for r in fan], color="tab:green")
        ax.barh([f"{l} p99" for l in labels], [r["fan"]["p99"] or 0 for r in fan], color="tab:orange")
        ax.invert_yaxis()
        ax.set(title="speaker's EndOfTurn → 10 listening tabs", xlabel="ms")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "fanout.png", dpi=90)
        plt.close(fig)
        made.append("fanout.png")
    pairs = [p for p in before_now(res) if p[2] is not None and p[3] is not None]
    if pairs:
        cols = 4
        rows_ = (len(pairs) + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 2.8 * rows_), squeeze=False)
        for ax, (what, unit, b, a) in zip(axes.flat, pairs):
            ax.bar(["before", "now"], [b, a], color=["tab:gray", "tab:blue"])
            for x, y in enumerate((b, a)):
                ax.annotate(f"{y:g}", (x, y), ha="center", va="bottom", fontsize=8)
            ax.set_title(what, fontsize=8, wrap=True)
            ax.set_ylabel(unit, fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        for ax in list(axes.flat)[len(pairs):]:
            ax.axis("off")
        fig.suptitle(f"relay before ({(res['meta'].get('before') or {}).get('commit')}) and now, same run", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "before_now.png", dpi=90)
        plt.close(fig)
        made.append("before_now.png")
    return made


def _revisions(meta: dict[str, Any]) -> str:
    now, before = meta.get("now") or {}, meta.get("before") or {}
    text = f"*Now*: {now.get('commit')}" + (" plus uncommitted changes" if now.get("uncommitted_changes") else "")
    if before:
        text += f"; *before*: {before.get('commit')} ({before.get('subject')}), run from a git worktree in the same venv"
    return text + "."


def write(res: dict[str, Any], out: Path) -> None:
    made = charts(res, out)
    meta = res["meta"]
    sweep = res.get("sweep", [])
    busy = [r["machine_busy_cores"] for r in sweep + res.get("variants", [])]
    L = [
        "# Relay benchmark: latest run",
        "",
        f"`{meta['command']}` on {meta['started']} took {meta.get('duration_s', 0):.0f} s (Python {meta['python']}, "
        f"{meta['load_before']['cores']} cores, the relay on {meta.get('database', 'postgresql')}). Load average before {meta['load_before']['load1']}, after "
        f"{meta.get('load_after', {}).get('load1')}; other work shared the machine, so compare ratios against the "
        f"baseline of this same run rather than absolute numbers."
        + (f" Whole-machine busy cores during the measurement windows: median {sorted(busy)[len(busy) // 2]}, max {max(busy)}." if busy else ""),
        "",
        _revisions(meta),
        "",
        "Baseline: a bare `websockets` server doing the same visible job (same messages, same fake engine, no Django, "
        "Channels, layer or database). Bare server: the same messages at the same moments with no engine work at all "
        "(bench/bare.py), so *x bare* is the relay's own cost, fake engine included. Streams send tone in real-time frames and a `ForceEndTurn` every 4 s (so a turn, with its "
        "database writes, every 4 s per stream). *EoT rtt*: ForceEndTurn → EndOfTurn; *audio→Update*: the frame that completes "
        "an Update's audio → that Update. CPU is read from /proc of the server processes (Redis separately); the client reports "
        "its own. *Refused (CAPACITY)*: streams the relay turned away with Error CAPACITY / close 4013 (its stream cap, or "
        "admission control: its event loop running late or its database writes waiting), counted apart from errors. *Lost*: Updates missing from a speaker's "
        "finished turn, ForceEndTurns never answered, and EndOfTurns a listening tab never got (listening tabs get interim "
        "Updates coalesced, each carrying the whole turn so far, so fewer Updates there is not a loss).",
        "",
    ]
    t = targets(res)
    if t:
        L += ["## Targets", "", "| target | relay now | verdict | relay before (same run) |", "|---|---|---|---|"]
        L += [f"| {a} | {b} | **{c}** | {d} |" for a, b, c, d in t]
        L.append("")
    pairs = before_now(res)
    if pairs:
        L += ["## Before and now", "", "| measure | before | now | unit |", "|---|---|---|---|"]
        L += [f"| {what} | {_v(b)} | {_v(a)} | {unit} |" for what, unit, b, a in pairs]
        L.append("")
    if res.get("databases"):
        L += ["## A turn a second per stream, PostgreSQL and SQLite", "", *databases_table(res["databases"]), ""]
        if any(r.get("tails_ms") or r.get("disk_fsync") for r in res["databases"]):
            L += ["Where the slow EndOfTurns waited (same windows): the turn writes' latency from call to commit, how late "
                  "the event loop woke from 100 ms sleeps, and the disk's fsync latency beside the databases.", "",
                  *databases_tails_table(res["databases"]), ""]
    if sweep:
        L += ["## Streams sweep", "", *stream_table(sweep, sweep), ""]
    if res.get("variants"):
        L += ["## One process at the reference load: before, now and alternatives", "", *stream_table(res["variants"], res["variants"]), ""]
        for r in res["variants"]:
            gc = [g for g in r.get("gc") or [] if g]
            if gc:
                g2 = gc[0].get("2", {})
                L.append(f"- {r['target']} ({r['streams']} x {r['frame_ms']} ms{', audio only' if r.get('turn_s', 0) > 60 else ''}): "
                         f"full collections {g2.get('count')}, longest {g2.get('max_ms')} ms; all GC pauses "
                         f"{sum(v.get('total_ms', 0) for v in gc[0].values()):.0f} ms in {r['window_s']} s"
                         + (f"; loop lag {r['loop_lag_ms'][0]} ms" if r.get("loop_lag_ms") and r["loop_lag_ms"][0] is not None else ""))
        L.append("")
    if res.get("memory"):
        L += ["## Idle memory per connection (fresh server, every stream connected and idle)", "",
              "| target | connections | KB per connection |", "|---|---|---|"]
        L += [f"| {r['target']} | {r['streams']} | {r['rss_idle_per_conn_kb']} |" for r in res["memory"]]
        L.append("")
    if res.get("handshakes"):
        L += ["## Connection bursts (time to `Connected`, session and connection rows written)", "",
              "Refused: turned away with CAPACITY by admission control while the burst made the event loop run late or the writes wait "
              "(a try-again-later answer, not an error; counted apart).", "",
              "| target | processes | connected | refused (CAPACITY) | span s | per second | p50 ms | p99 ms | client errors | server errors |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["handshakes"]:
            L.append(f"| {r['target']} | {r['processes']} | {r['ok']}/{r['count']} | {r.get('refused', 0)} | {r['span_s']:.2f} | {r['rate']:.0f} | "
                     f"{r['handshake'].get('p50')} | {r['handshake'].get('p99')} | {sum(r['errors'].values())} {r['errors'] or ''} | {r['server_errors']} |")
        L.append("")
    if res.get("replay"):
        L += ["## Reconnect and replay (issue 4)", "", "| target | history | since | first replayed turn p50 / p99 ms | all replayed p50 / p99 ms | errors |", "|---|---|---|---|---|---|"]
        for r in res["replay"]:
            L.append(f"| {r['target']} | {r['turns']} | {_v(r['since'])} | {r['first'].get('p50')} / {r['first'].get('p99')} | "
                     f"{r['last'].get('p50')} / {r['last'].get('p99')} | {r['errors'] or 0} |")
        L.append("")
    if res.get("fanout"):
        L += ["## Fan-out: one speaking tab, 10 listening tabs (issue 4)", "",
              "| target | speaker EoT → listener EoT p50 / p99 ms | ForceEndTurn → listener EoT p99 ms | audio → listener Update p50 / p99 ms "
              "| listener Updates received | speaker Updates dropped | listener EndOfTurns missing |", "|---|---|---|---|---|---|---|"]
        for r in res["fanout"]:
            L.append(f"| {r['target']} | {r['fan']['p50']} / {r['fan']['p99']} | {r['lst_eot']['p99']} | {r['lst_upd']['p50']} / {r['lst_upd']['p99']} "
                     f"| {r['lst_upd']['n']} | {r['dropped_updates'] + r['missing_eot']} | {r.get('listener_missing_eot', 0)} |")
        L.append("")
    if res.get("tabs"):
        L += ["## One tab against two tabs per session (Redis pub/sub layer)", "", *stream_table(res["tabs"]), "",
              "| target | tabs | daphne CPU/frame µs | Redis cores | CPU/frame incl. Redis µs | x one tab | listener Updates | listener Update p99 ms | fan-out p99 ms | listener EndOfTurns missing |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["tabs"]:
            ratio = _tabs_ratio(res["tabs"], r["target"])[0] if r["listeners"] else None
            L.append(f"| {r['target']} | {1 + (r['listeners'] > 0)} | {r['cpu_per_frame_us']} | {r['redis_cores']} | {r['cpu_per_frame_with_redis_us']} "
                     f"| {_v(ratio)} | {r['lst_upd']['n']} | {r['lst_upd']['p99']} | {r['fan']['p99']} | {r.get('listener_missing_eot', 0)} |")
        L.append("")
    if res.get("shedding"):
        L += ["## Past capacity", "", *stream_table(res["shedding"]), ""]
        for r in res["shedding"]:
            L.append(f"- {r['target']}: {r['streams']} accepted, {r['refused']} refused of {r['asked']}; accepted streams: EoT p99 "
                     f"{r['fet_rtt']['p99']} ms, audio→Update p99 {r['upd']['p99']} ms, {r['error_count']} errors {r['errors'] or ''}, "
                     f"{'(they read nothing, so nothing arrives)' if r.get('kind') == 'stop_reading' else str(lost(r)) + ' lost'}; RSS "
                     f"{r['rss_mb']} MB, growing {r['rss_growth_mb_per_min']} MB/min; event-loop lag {_each(r.get('loop_lag_ms'))} ms, write latency {_each(r.get('write_latency_ms'))} ms and sockets "
                     f"paused by flow control {_each(r.get('inbound_paused'))} at the end of the window; frames the client could not write "
                     f"(server not reading) {r['frames_skipped']}")
        L.append("")
    if res.get("nginx"):
        L += ["## Deployed behind nginx (deploy/: TLS, 2 daphne, Redis, PostgreSQL)", "", *stream_table(res["nginx"]), ""]
        for r in res["nginx"]:
            L.append(f"- {r['kind']}: {r['streams']} accepted, {r['refused']} refused of {r['asked']}; nginx upstream resets (`recv() failed (104)`) "
                     f"{r['nginx_resets']}; daphne log errors {r['server_log_errors']}; errors {r['errors'] or 0}")
            for problem, count in sorted(r.get("nginx_log", {}).items(), key=lambda kv: -kv[1]):
                L.append(f"  - nginx error log: {count} x `{problem}`")
        L.append("")
    if res.get("deflate"):
        L += ["## permessage-deflate offered by the client", ""]
        L += [f"- {k}: `{v}`" for k, v in res["deflate"].items()]
        L.append("")
    prof = res.get("profile") or {}
    for key, p in prof.items():
        if not p.get("own"):
            continue
        L += [f"## Profile: {p['row']['target']} ({p['row']['streams']} x {p['row']['frame_ms']} ms, py-spy, {p['samples']} samples)", "",
              f"Flame graph: [{p['svg']}]({p['svg']}). CPU per frame {p['row']['cpu_per_frame_us']} µs.", "",
              "| own % | function | | inclusive % | function |", "|---|---|---|---|---|"]
        for (a, x), (b, y) in zip(p["own"][:15], p["inclusive"][:15]):
            L.append(f"| {x} | `{a}` | | {y} | `{b}` |")
        L.append("")
    if made:
        L += ["## Charts", ""] + [f"![{m}]({m})" for m in made] + [""]
    (out / "latest.md").write_text("\n".join(L))


def docs_block(res: dict[str, Any], rel: str = "../bench/results/") -> str:
    """The figures docs/benchmarks.md shows (between its figures markers)."""
    meta = res["meta"]
    L = [f"Figures from `{meta['command']}` run on {meta['started']} ({meta.get('duration_s', 0):.0f} s; load average "
         f"{meta['load_before']['load1']} before, {meta.get('load_after', {}).get('load1')} after, on {meta['load_before']['cores']} cores "
         f"shared with other work; the relay on {meta.get('database', 'postgresql')}). {_revisions(meta)} Every table: [latest.md]({rel}latest.md).", "",
         "| target | relay now | verdict | relay before (same run) |", "|---|---|---|---|"]
    L += [f"| {a} | {b} | **{c}** | {d} |" for a, b, c, d in targets(res)]
    pairs = before_now(res)
    if pairs:
        L += ["", "Before and now, same run:", "", "| measure | before | now | unit |", "|---|---|---|---|"]
        L += [f"| {what} | {_v(b)} | {_v(a)} | {unit} |" for what, unit, b, a in pairs]
    v = res.get("variants", [])
    if v:
        L += ["", "One relay process, 80 ms frames, a turn every 4 s or every second per stream (audio-only rows: no turns); read "
              "latency at 100 streams, CPU at 300. *x bare*: over the bare server (bench/bare.py, the same messages and no engine "
              "work); *x baseline*: over bench/baseline.py (the relay's protocol code and fake engine, no Django):", "",
              "| variant | streams | turn every | CPU/frame µs | x bare | x baseline | EoT rtt p50 / p99 ms | audio→Update p99 ms | server cores | machine busy cores |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(v, key=lambda r: (r["streams"], [x["target"] for x in v].index(r["target"]))):
            if r["streams"] not in (100, REF_STREAMS):
                continue
            b = _find(v, target=BASE, streams=r["streams"], turn_s=r.get("turn_s"))
            every = "audio only" if r.get("turn_s", 4.0) > 60 else f"{r.get('turn_s', 4.0):g} s"
            L.append(f"| {r['target']} | {r['streams']} | {every} | {r['cpu_per_frame_us']} | {_v(_x_bare(v, r))} | {_v(_ratio(r['cpu_per_frame_us'], b and b['cpu_per_frame_us']))} | "
                     f"{_v(r['fet_rtt']['p50'])} / {_v(r['fet_rtt']['p99'])} | {_v(r['upd']['p99'])} | {r['server_cores']} | {r['machine_busy_cores']} |")
    hs = res.get("handshakes", [])
    if hs:
        L += ["", f"Connection bursts ({hs[0]['count']} connections offered in one second; time to `Connected`, rows written; "
              "refused: CAPACITY from admission control, not an error):", "",
              "| target | per second | p50 / p99 ms | refused (CAPACITY) | errors |", "|---|---|---|---|---|"]
        L += [f"| {r['target']} | {r['rate']:.0f} | {r['handshake'].get('p50')} / {r['handshake'].get('p99')} | {r.get('refused', 0)} | {_burst_errors(r)} |" for r in hs]
    if res.get("replay") or res.get("fanout"):
        L += ["", "Reconnect + replay and fan-out (issue 4):", "", "| measurement | p50 ms | p99 ms |", "|---|---|---|"]
        for r in res.get("replay", []):
            what = "all history" if r["since"] is None else f"since={r['since']}"
            L.append(f"| {r['target']}: reconnect → first replayed turn, {r['turns']}-turn history, {what} | {r['first'].get('p50')} | {r['first'].get('p99')} |")
            L.append(f"| {r['target']}: reconnect → last of {r['expected']} replayed turns | {r['last'].get('p50')} | {r['last'].get('p99')} |")
        for r in res.get("fanout", []):
            L.append(f"| {r['target']}: speaker's EndOfTurn → 10 listening tabs | {r['fan']['p50']} | {r['fan']['p99']} |")
    mem = res.get("memory", [])
    if mem:
        L += ["", f"Idle memory per connection (fresh server, {mem[0]['streams']} idle streams): " +
              "; ".join(f"{r['target']} {r['rss_idle_per_conn_kb']} KB" for r in mem) + "."]
    charts_ = ["sweep.png", "variants.png", "fanout.png"] + (["before_now.png"] if [p for p in pairs if p[2] is not None and p[3] is not None] else [])
    L += [""] + [f"![{c}]({rel}{c})" for c in charts_]
    return "\n".join(L)


def update_docs(res: dict[str, Any], doc: Path) -> None:
    start, end = "<!-- figures:start -->", "<!-- figures:end -->"
    text = doc.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        doc.write_text(f"{head}{start}\n{docs_block(res)}\n{end}{tail}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = Path(args[0] if args else "bench/results/latest.json")
    res = json.loads(path.read_text())
    write(res, path.parent)
    if "--docs" in sys.argv:
        update_docs(res, Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
