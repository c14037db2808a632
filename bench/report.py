"""latest.md and the PNG charts from a benchmark result (bench.run writes latest.json)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REF_STREAMS, REF_FRAME = 300, 80
ALL_LABEL = "all (freeze, task, autobahn, DB pool+SQL, own-first)"


def _v(x: Any, unit: str = "") -> str:
    return "–" if x is None else f"{x}{unit}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


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


def targets(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 8's targets and issue 4's replay target."""
    out: list[tuple[str, str, str]] = []
    variants = res.get("variants", [])
    base = _find(variants, target="baseline (bare websockets)", streams=REF_STREAMS, frame_ms=REF_FRAME, turn_s=3600.0)
    if base:
        for label in ("relay, as committed", ALL_LABEL, "uvicorn + all"):
            audio = _find(variants, target=label, streams=REF_STREAMS, frame_ms=REF_FRAME, turn_s=3600.0)
            turns = _find(variants, target=label, streams=REF_STREAMS, frame_ms=REF_FRAME, turn_s=4.0)
            if audio and turns:
                ratio = _ratio(audio["cpu_per_frame_us"], base["cpu_per_frame_us"])
                p99 = turns["fet_rtt"]["p99"]
                ok = ratio is not None and ratio <= 2 and p99 is not None and p99 <= 50
                out.append((f"CPU/frame <= 2x bare at {REF_STREAMS} x {REF_FRAME} ms, EoT p99 <= 50 ms ({label})",
                            f"{ratio}x ({audio['cpu_per_frame_us']} vs {base['cpu_per_frame_us']} µs, audio only); EoT p99 {p99} ms (a turn every 4 s)",
                            "met" if ok else ("CPU met, EoT p99 not" if ratio and ratio <= 2
                                              else "CPU 3x milestone met, EoT p99 not" if ratio and ratio <= 3 else "not met")))
    sweep = res.get("sweep", [])
    for label in dict.fromkeys(r["target"] for r in sweep if r["target"].startswith("relay deployed")):
        dep = [r for r in sweep if r["target"] == label and r["frame_ms"] == 80]
        good = [r for r in dep if (r["fet_rtt"]["p99"] or 1e9) <= 50 and r["achieved"] >= 0.99 and not r["dropped_updates"]
                and not r["missing_eot"] and not r["error_count"]]
        best = max((r["streams"] for r in good), default=0)
        out.append((f">= 2,000 streams of 80 ms, p99 <= 50 ms, nothing dropped ({label})",
                    f"largest clean step: {best} streams (steps: {', '.join(str(r['streams']) for r in dep)})", "met" if best >= 2000 else "not met"))
    tabs = [r for r in res.get("tabs", []) if r.get("layer") == "pubsub"]
    one, two = _find(tabs, listeners=0), next((r for r in tabs if r["listeners"]), None)
    if one and two:
        ratio = _ratio(two["cpu_per_frame_with_redis_us"], one["cpu_per_frame_with_redis_us"])
        out.append(("two-tab session <= 1.5x one-tab (Redis pub/sub layer, CPU incl. Redis)", f"{ratio}x",
                    "met" if ratio and ratio <= 1.5 else "not met"))
    hs = res.get("handshakes", [])
    for r in hs:
        if r["target"].startswith("deployed") or r["target"] == "relay, listen backlog 1024":
            errors = sum(r["errors"].values()) + r["server_errors"]
            out.append((f"burst of {r['count']} connections in 1 s, no error ({r['target']})",
                        f"{r['ok']}/{r['count']} ok, {errors} errors, p99 {r['handshake'].get('p99')} ms",
                        "met" if errors == 0 and r["ok"] == r["count"] else "not met"))
    relay_hs = _find(hs, target="relay, listen backlog 1024")
    if relay_hs:
        out.append((">= 500 new sessions/s per process, rows written", f"{relay_hs['rate']:.0f}/s",
                    "met" if relay_hs["rate"] >= 500 else "not met"))
    for r in res.get("memory", []):
        if r["target"].startswith("baseline"):
            continue
        out.append((f"idle memory <= 40 KB per connection ({r['target']})", f"{r['rss_idle_per_conn_kb']} KB at {r['streams']} connections",
                    "met" if r["rss_idle_per_conn_kb"] is not None and r["rss_idle_per_conn_kb"] <= 40 else "not met"))
    shed = res.get("shedding", [])
    if shed:
        r = shed[0]
        refused_ok = r["refused"] == r["asked"] - r["cap"]
        ok = refused_ok and r["error_count"] == 0 and (r["fet_rtt"]["p99"] or 1e9) <= 50
        out.append(("past capacity: new streams refused (CAPACITY / 4013), existing unharmed",
                    f"{r['refused']} of {r['asked']} refused at cap {r['cap']}; accepted p99 {r['fet_rtt']['p99']} ms",
                    "met" if ok else "not met"))
        for r in shed[1:]:
            out.append((f"RSS bounded: {r['target']}", f"{r['rss_mb']} MB, {r['rss_growth_mb_per_min']} MB/min over the window",
                        "see text"))
    for r in res.get("replay", []):
        if r["since"] is None:
            p99 = r["first"].get("p99")
            out.append((f"reconnect to first replayed turn, {r['turns']}-turn history, p99 <= 100 ms ({r['target']})",
                        f"p99 {p99} ms (all {r['expected']}: p99 {r['last'].get('p99')} ms)",
                        "met" if p99 is not None and p99 <= 100 else "not met"))
    return out


def stream_table(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]] | None = None) -> list[str]:
    lines = [
        "| target | frame | streams (+tabs) | achieved | EoT rtt p50 / p99 ms | audio→Update p50 / p99 ms | server CPU/frame µs | x bare | server cores | client cores | machine busy cores | errors | lost or >3 s late | server busy after s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        match = {"turn_s": r["turn_s"]} if "turn_s" in r else {}
        b = _find(base_rows or [], target="baseline (bare websockets)", streams=r["streams"], frame_ms=r["frame_ms"], **match)
        ratio = _ratio(r["cpu_per_frame_us"], b["cpu_per_frame_us"]) if b else None
        tabs = (f"{r['streams']}" + (f" (+{r['listeners']})" if r["listeners"] else "") + (" audio only" if r.get("turn_s", 0) > 60 else "")
                + (" **not keeping up**" if saturated(r) else ""))
        lines.append(
            f"| {r['target']} | {r['frame_ms']} ms | {tabs} | {r['achieved']:.2f} | {_v(r['fet_rtt']['p50'])} / {_v(r['fet_rtt']['p99'])} "
            f"| {_v(r['upd']['p50'])} / {_v(r['upd']['p99'])} | {_v(r['cpu_per_frame_us'])} | {_v(ratio)} | {r['server_cores']} "
            f"| {r['client_cores']} | {r['machine_busy_cores']} | {r['error_count']} | {r['dropped_updates'] + r['missing_eot']} "
            f"| {r.get('busy_after_s', '–')} |"
        )
    return lines


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
            base = _find(rows, target="baseline (bare websockets)")
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
    return made


def write(res: dict[str, Any], out: Path) -> None:
    made = charts(res, out)
    meta = res["meta"]
    sweep = res.get("sweep", [])
    busy = [r["machine_busy_cores"] for r in sweep + res.get("variants", [])]
    L = [
        "# Relay benchmark: latest run",
        "",
        f"`{meta['command']}` on {meta['started']} took {meta.get('duration_s', 0):.0f} s (Python {meta['python']}, "
        f"{meta['load_before']['cores']} cores). Load average before {meta['load_before']['load1']}, after "
        f"{meta.get('load_after', {}).get('load1')}; other work shared the machine, so compare ratios against the "
        f"baseline of this same run rather than absolute numbers."
        + (f" Whole-machine busy cores during the measurement windows: median {sorted(busy)[len(busy) // 2]}, max {max(busy)}." if busy else ""),
        "",
        "Baseline: a bare `websockets` server doing the same visible job (same messages, same fake engine, no Django, "
        "Channels, layer or database). Streams send tone in real-time frames and a `ForceEndTurn` every 4 s (so a turn, with its two database writes, every 4 s per stream). "
        "*EoT rtt*: ForceEndTurn → EndOfTurn; *audio→Update*: the frame that completes an Update's audio → that Update. "
        "CPU is read from /proc of the server processes (Redis separately); the client reports its own.",
        "",
    ]
    t = targets(res)
    if t:
        L += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
        L += [f"| {a} | {b} | **{c}** |" for a, b, c in t]
        L.append("")
    if sweep:
        L += ["## Streams sweep", "", *stream_table(sweep, sweep), ""]
    if res.get("variants"):
        L += ["## One process at the reference load, candidate changes", "", *stream_table(res["variants"], res["variants"]), ""]
        for r in res["variants"]:
            gc = [g for g in r.get("gc") or [] if g]
            if gc:
                g2 = gc[0].get("2", {})
                L.append(f"- {r['target']} ({r['streams']} x {r['frame_ms']} ms): full collections {g2.get('count')}, "
                         f"longest {g2.get('max_ms')} ms; all GC pauses {sum(v.get('total_ms', 0) for v in gc[0].values()):.0f} ms "
                         f"in {r['window_s']} s")
        L.append("")
    if res.get("memory"):
        L += ["## Idle memory per connection (fresh server, every stream connected and idle)", "",
              "| target | connections | KB per connection |", "|---|---|---|"]
        L += [f"| {r['target']} | {r['streams']} | {r['rss_idle_per_conn_kb']} |" for r in res["memory"]]
        L.append("")
    if res.get("handshakes"):
        L += ["## Connection bursts (time to `Connected`, session and connection rows written)", "",
              "| target | processes | connected | span s | per second | p50 ms | p99 ms | client errors | server errors |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["handshakes"]:
            L.append(f"| {r['target']} | {r['processes']} | {r['ok']}/{r['count']} | {r['span_s']:.2f} | {r['rate']:.0f} | "
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
              "| layer | speaker EoT → listener EoT p50 / p99 ms | ForceEndTurn → listener EoT p99 ms | audio → listener Update p50 / p99 ms | dropped |", "|---|---|---|---|---|"]
        for r in res["fanout"]:
            L.append(f"| {r['target']} | {r['fan']['p50']} / {r['fan']['p99']} | {r['lst_eot']['p99']} | {r['lst_upd']['p50']} / {r['lst_upd']['p99']} | {r['dropped_updates'] + r['missing_eot']} |")
        L.append("")
    if res.get("tabs"):
        L += ["## One tab against two tabs per session, pub/sub against core layer", "", *stream_table(res["tabs"]), ""]
        L += ["| layer | tabs | daphne CPU/frame µs | Redis cores | CPU/frame incl. Redis µs | listener Update p99 ms | fan-out p99 ms |", "|---|---|---|---|---|---|---|"]
        for r in res["tabs"]:
            L.append(f"| {r['layer']} | {1 + (r['listeners'] > 0)} | {r['cpu_per_frame_us']} | {r['redis_cores']} | {r['cpu_per_frame_with_redis_us']} | {r['lst_upd']['p99']} | {r['fan']['p99']} |")
        L.append("")
    if res.get("shedding"):
        L += ["## Past capacity", "", *stream_table(res["shedding"]), ""]
        for r in res["shedding"]:
            L.append(f"- {r['target']}: {r['streams']} accepted, {r['refused']} refused, RSS {r['rss_mb']} MB, "
                     f"growing {r['rss_growth_mb_per_min']} MB/min, frames the client could not write (server not reading) {r['frames_skipped']}")
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
         f"shared with other work). Every table: [latest.md]({rel}latest.md).", "",
         "| target | measured | verdict |", "|---|---|---|"]
    L += [f"| {a} | {b} | **{c}** |" for a, b, c in targets(res)]
    v = res.get("variants", [])
    if v:
        L += ["", "One relay process, 80 ms frames, a turn every 4 s per stream (audio-only rows: no turns); at 100 streams a "
              "process keeps up, at 300 it does not once turns are written, so read latency effects at 100 and CPU at 300:", "",
              "| variant | streams | CPU/frame µs | x bare | EoT rtt p50 / p99 ms | audio→Update p99 ms | server cores | machine busy cores |",
              "|---|---|---|---|---|---|---|---|"]
        for r in sorted(v, key=lambda r: (r["streams"], [x["target"] for x in v].index(r["target"]))):
            if r["streams"] not in (100, REF_STREAMS):
                continue
            b = _find(v, target="baseline (bare websockets)", streams=r["streams"], turn_s=r.get("turn_s"))
            what = " (audio only)" if r.get("turn_s", 0) > 60 else ""
            L.append(f"| {r['target']}{what} | {r['streams']} | {r['cpu_per_frame_us']} | {_v(_ratio(r['cpu_per_frame_us'], b and b['cpu_per_frame_us']))} | "
                     f"{_v(r['fet_rtt']['p50'])} / {_v(r['fet_rtt']['p99'])} | {_v(r['upd']['p99'])} | {r['server_cores']} | {r['machine_busy_cores']} |")
    hs = res.get("handshakes", [])
    if hs:
        L += ["", "Connection bursts (1,000 connections offered in one second; time to `Connected`, rows written):", "",
              "| target | per second | p50 / p99 ms | errors |", "|---|---|---|---|"]
        L += [f"| {r['target']} | {r['rate']:.0f} | {r['handshake'].get('p50')} / {r['handshake'].get('p99')} | {sum(r['errors'].values()) + r['server_errors']} |" for r in hs]
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
        L += ["", "Idle memory per connection (fresh server, 1,000 idle streams): " +
              "; ".join(f"{r['target']} {r['rss_idle_per_conn_kb']} KB" for r in mem) + "."]
    charts_ = [c for c in ("sweep.png", "variants.png", "fanout.png") if c]
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
