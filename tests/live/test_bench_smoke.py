"""Smoke runs of the benchmark suite and the soak (not timed: they check that the harness runs
end to end against real daphne, Redis and PostgreSQL and writes its report; the figures
themselves come from `make bench` on a quiet machine)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.live import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.live, pytest.mark.redis, pytest.mark.postgres]


def test_bench_quick_writes_the_report(tmp_path):
    from bench.report import BARE, BASE, BEFORE, DEP_NOW, NOW, OWNFIRST

    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=900)
    result = json.loads((tmp_path / "latest.json").read_text())
    for section in ("sweep", "variants", "databases", "memory", "handshakes", "replay", "fanout", "tabs", "shedding", "nginx"):
        assert result[section], section
    assert {(r["which"], r["target"]) for r in result["databases"]} == {
        ("bare", BARE), ("postgresql", "relay now (postgresql)"), ("sqlite", "relay now (sqlite)"),
        ("sqlite-orm", "relay now (sqlite, ORM writes)"), ("before-postgresql", "relay before (postgresql)"),
        ("before-sqlite", "relay before (sqlite)")}
    for row in result["databases"]:  # where slow EndOfTurns waited: writes, loop, disk (counts, not times)
        assert row["disk_fsync"]["n"] > 0, row["which"]
        if row["which"] in ("postgresql", "sqlite", "sqlite-orm"):  # the before tree's server may predate the tails
            (tails,) = row["tails_ms"]
            assert tails["write"]["n"] > 0 and tails["lag"]["n"] > 0, row["which"]
    assert result["meta"]["before"]["commit"]  # the before tree was checked out and run
    sweep = {row["target"] for row in result["sweep"]}
    assert {BASE, NOW, DEP_NOW} <= sweep and any(t.startswith("deployed before") for t in sweep)
    assert {BARE, BASE, BEFORE, NOW, OWNFIRST} <= {row["target"] for row in result["variants"]}
    assert {BASE, BEFORE, NOW} <= {row["target"] for row in result["memory"]}
    assert {BASE, BEFORE, NOW} <= {row["target"] for row in result["handshakes"]}
    capacity, past = result["nginx"]  # behind nginx: all in, then more than the processes admit
    assert past["refused"] > 0 and past["streams"] + past["refused"] == past["asked"]
    assert capacity["nginx_resets"] == past["nginx_resets"] == 0  # refusals end with close frames and FIN
    for row in result["sweep"] + result["variants"] + result["databases"] + result["fanout"] + result["tabs"] + result["nginx"]:
        assert row["streams"] > 0 and row["fps"] > 0, row["target"]
        assert row["dropped_updates"] == 0, row["target"]  # a speaker gets every Update of a finished turn (a count, not a time)
        assert row["listener_missing_eot"] == 0, row["target"]  # every listening tab got every EndOfTurn
        assert row["error_count"] == 0, row["target"]
    for row in result["handshakes"]:
        assert row["ok"] + row["refused"] == row["count"] and not row["errors"], row["target"]
    assert all(r["first"]["n"] == r["repeat"] for r in result["replay"])
    assert all(row["fan"]["n"] > 0 for row in result["fanout"])
    assert any(row["listeners"] and row["fan"]["n"] > 0 for row in result["tabs"])
    shed = result["shedding"][0]
    assert shed["refused"] == shed["asked"] - 5 and shed["streams"] == 5  # over the cap: CAPACITY, not an error
    report = (tmp_path / "latest.md").read_text()
    for heading in ("## Targets", "## Before and now", "## A turn a second per stream, PostgreSQL and SQLite", "Where the slow EndOfTurns waited", "## Streams sweep", "## Connection bursts", "## Past capacity"):
        assert heading in report, heading
    for chart in ("sweep.png", "variants.png", "fanout.png", "before_now.png"):
        assert (tmp_path / chart).stat().st_size > 1000, chart
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "relay-bench-before-" not in worktrees  # the before tree was removed


def test_soak_short_writes_memory_and_stability(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "0.4", "--streams", "4", "--mean-life", "6", "--tick", "4", "--out", str(tmp_path)],
        cwd=ROOT, timeout=300, capture_output=True, text=True,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: memory slope over a few seconds is not meaningful
    result = json.loads((tmp_path / "soak.json").read_text())
    assert len(result["ticks"]) >= 3
    assert {m["key"] for m in result["stability"] if "label" in m} == {
        "connection_duration", "disconnection_rate", "error_rate", "reconnection_time"}
    assert result["client"]["counters"]["connections"] > 4  # connections churned and sessions resumed
    assert result["client"]["turn_duplicates"] == 0
    assert (tmp_path / "soak.png").stat().st_size > 1000 and "stability metrics" in (tmp_path / "soak.md").read_text()


def test_bench_engines_quick_writes_the_report(tmp_path):
    """`make bench-engines` end to end on a short session: real daphne with the whisper engine,
    WebSocket speakers, every phase reported (counts and structure, not speed)."""
    subprocess.run([sys.executable, "-m", "bench.engines", "--quick", "--streams", "1,2", "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=900)
    result = json.loads((tmp_path / "engines.json").read_text())
    assert [row["streams"] for row in result["streams"]] == [1, 2]
    for row in result["streams"]:
        assert row["served"] + row["refused"] == row["streams"] and row["served"] > 0
        assert row["turns_ended"] > 0 and row["eot_p50"] is not None and row["wer"] is not None
        assert row["paused_turns"] == 3 * row["served"]  # two sentences and one conversation turn with a pause inside
        assert row["peak_rss_mb"] > 0 and row["relay_cores"] > 0
        assert sum(row["refusals"].values()) == row["refused"], row["refusals"]  # each refusal with what it said
    short = result["short_turns"]
    assert short["count"] == 2 and all(c["offline"] for c in short["clips"])
    det = result["determinism"]
    assert det["loops"] == 2 and len(det["transcripts"]) == 2 and det["full_speed"]
    assert not result["relay_log_errors"].get("count"), result["relay_log_errors"]
    report = (tmp_path / "engines.md").read_text()
    assert "| streams | served / refused |" in report and "Refusals: " in report and "Determinism:" in report
    first = result["streams"][0]
    early = [t for t in first["first_stream_turns"] if t["paused"] and len(t["finals"]) > 1]
    assert len(early) == first["early_closes"], (early, first["early_closes"])  # one stream: its list is the row's count
    assert f"Early closes of the first stream at 1 streams ({len(early)} of" in report and "Short turns" in report
    assert (tmp_path / "engines.png").stat().st_size > 1000


def test_decode_cost_prints_the_speed_and_the_conversations_turns():
    """`python -m bench.decode_cost` (the runner and the engine interface; no relay) runs end to end."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.decode_cost", "--parts", "speed,turns", "--repeat", "1"],
        cwd=ROOT, check=True, timeout=600, capture_output=True, text=True,
    ).stdout
    speed = out.split("five times: ")[1].splitlines()[0]
    assert len([ms for ms in speed.split(", ") if float(ms.removesuffix(" ms")) > 0]) == 5, out
    rows = [line for line in out.splitlines() if line.startswith("| conv_")]
    assert {row.split(" | ")[0] for row in rows} == {"| conv_a.wav", "| conv_b.wav"} and len(rows) >= 10, out
    readings = out.split("| recording | turn audio | completion | hangover | speculative final |")[1]
    hangovers = [float(line.split(" | ")[3].removesuffix(" s")) for line in readings.splitlines() if line.startswith("| conv_")]
    assert len(hangovers) >= 10 and all(0 < h <= 1.0 for h in hangovers), out  # between eot_complete_ms and eot_incomplete_ms


def test_decode_cost_decodes_every_fixture_turn_in_both_windows():
    """`python -m bench.decode_cost --parts windows`: every turn of the fixtures is decoded both
    ways and counted in one row of the table."""
    from tests.support.speech import manifest, turns_manifest

    out = subprocess.run([sys.executable, "-m", "bench.decode_cost", "--parts", "windows"], cwd=ROOT, check=True, timeout=1200,
                         capture_output=True, text=True).stdout
    tm = turns_manifest()
    expected = (sum(1 if c["kind"] == "short" else len(c["segments"]) for c in tm["clips"])
                + sum(len(conv["turns"]) for conv in tm["conversations"]) + len(manifest()["clips"]))
    rows = [line.split(" | ") for line in out.split("| audio decoded |")[1].splitlines() if line.startswith("| ") and " s | " in line]
    assert rows and sum(int(r[1]) for r in rows) == expected, out
    for r in rows:
        assert r[2].endswith("%") and r[3].endswith("%") and 0 <= int(r[4]) <= int(r[1]), r


def test_decode_cost_times_several_streams_decodes_in_one_call():
    """`python -m bench.decode_cost --parts batch`: every decode at every batch size, three ways."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.decode_cost", "--parts", "batch", "--repeat", "1"],
        cwd=ROOT, check=True, timeout=600, capture_output=True, text=True,
    ).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| encode", "| beam", "| greedy"))]
    assert [(row[0], row[1]) for row in rows] == [
        (decode, size) for decode in ("| encode, 8 s window", "| encode, 20 s window", "| beam 5 (a final), 8 s window",
                                      "| greedy (an Update), 8 s window") for size in ("1", "2", "4", "8")], out
    assert all(float(cell.split(" ms")[0]) > 0 for row in rows for cell in row[2:]), out


def test_decode_cost_compares_a_real_time_stream_with_and_without_the_spare_cores():
    """`python -m bench.decode_cost --parts spare`, shortened to the conversations and one round."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.decode_cost", "--parts", "spare", "--rounds", "1", "--no-clips"],
        cwd=ROOT, check=True, timeout=600, capture_output=True, text=True,
    ).stdout
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 1 | ")]
    assert [row[1] for row in rows] == ["not used", "completion beside alignment", "and wide encode"], out
    # Finals encoded wide: only in the last arm, and only where the copy encodes as the one-thread
    # model does (the engine refuses it otherwise, and says so).
    kept = "Wide encode: on " in out
    assert kept or "Wide encode: refused" in out, out
    assert [row[4].startswith("0 of ") for row in rows] == [True, True, not kept], out
    for arm in ("not used", "completion beside alignment", "and wide encode"):
        assert f"spare cores {arm}: EndOfTurn p50 " in out and "(12 turns)" in out, out


def test_decode_cost_counts_a_real_time_streams_finals_and_updates():
    """`python -m bench.decode_cost --parts cost`, shortened to the conversations and one round of
    each arm (dropped decodes run to their end; they stop at their next stage)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.decode_cost", "--parts", "cost", "--rounds", "1", "--no-clips"],
        cwd=ROOT, check=True, timeout=900, capture_output=True, text=True,
    ).stdout
    turns = int(out.split(" turns), ")[0].rsplit("; ", 1)[1])
    rows = {cells[1]: cells for cells in (line.split(" | ") for line in out.splitlines() if line.startswith("| 1 | "))}
    assert set(rows) == {"every decode runs to its end", "dropped decodes stop at their next stage"}, out
    for arm, cells in rows.items():
        finals, abandoned = (int(cells[k].split(",")[0]) for k in (3, 4))
        assert turns >= 10 and finals >= turns and int(cells[5].split(",")[0]) > 0, out  # every turn ends with a final
        assert f"({turns} of {turns} matched)" in cells[2], out
        if arm == "every decode runs to its end":
            assert abandoned == 0, out
    assert "the process at " in out, out


def test_turn_model_bench_scores_both_kinds_of_point(tmp_path):
    """`make bench-turn-model` on the short session: Smart Turn (its weights from pipecat-ai's wheel,
    installed by `make install-dev`) and the engine's completion probability, at every labelled
    point (structure, not the scores); the sentences with a pause inside spoken whole (``--pauses
    whole``; the engines smoke test above streams the default, halves synthesized apart)."""
    subprocess.run([sys.executable, "-m", "bench.turn_model", "--quick", "--pauses", "whole", "--out", str(tmp_path / "turn-model")],
                   cwd=ROOT, check=True, timeout=900)
    result = json.loads((tmp_path / "turn-model.json").read_text())
    assert result["pauses"] == "whole"
    labels = [p["label"] for p in result["points"]]
    assert labels.count("unfinished") == 3 and labels.count("finished") >= 5  # the conversation's pause and the two sentences'
    for point in result["points"]:
        assert 0.0 <= point["smart_64ms"] <= 1.0 and 0.0 <= point["smart_200ms"] <= 1.0 and 0.0 <= point["heuristic"] <= 1.0
        assert point["words"], point  # every point decoded to words
    assert set(result["summary"]) == {"heuristic", "smart_64ms", "smart_200ms"}
    assert all(0.0 <= s["auc"] <= 1.0 for s in result["summary"].values())
    report = (tmp_path / "turn-model.md").read_text()
    assert "| scorer | AUC" in report and "--pauses whole" in report and "each spoken as one utterance" in report


def test_stallfs_holds_writes_while_a_stall_lasts_and_reads_go_on(tmp_path):
    """bench/stallfs.py, the disk-stall benchmark's filesystem: a write made during a stall returns
    only after it (and then lands); a read during the stall is served."""
    import threading
    import time

    from bench.stall import StallMount

    with StallMount(stall_ms=3000, every_s=0.2) as mount:
        (mount.mountpoint / "old").write_bytes(b"before")
        mount.stalls(True)
        deadline = time.monotonic() + 10
        while "stalling " not in mount.log.read_text():
            assert time.monotonic() < deadline, mount.log.read_text()
            time.sleep(0.02)
        mount.stalls(False)  # this stall is the last one
        wrote: list[bool] = []
        writer = threading.Thread(target=lambda: wrote.append((mount.mountpoint / "new").write_bytes(b"during") == 6))
        writer.start()
        assert (mount.mountpoint / "old").read_bytes() == b"before"  # reads are not held
        writer.join(0.5)
        assert writer.is_alive() and not mount.stalled(), "a write returned while the disk was stalled"
        writer.join(30)
        assert wrote == [True] and len(mount.stalled()) == 1
        assert (mount.under / "new").read_bytes() == b"during"


def test_stall_bench_compares_both_turn_write_modes_with_and_without_stalls(tmp_path):
    """`python -m bench.stall`, shortened: both RELAY_TURN_WRITES modes on SQLite on the stalling
    filesystem, stalls off then on; every row served its streams (structure, not the figures)."""
    subprocess.run([sys.executable, "-m", "bench.stall", "--streams", "10", "--window", "3", "--reps", "1", "--stall-ms", "200",
                    "--every-s", "1", "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=900)
    rows = json.loads((tmp_path / "stall.json").read_text())["rows"]
    assert [(r["stalls"], r["mode"]) for r in rows] == [(False, "loop"), (False, "thread"), (True, "loop"), (True, "thread")]
    for row in rows:
        assert row["streams"] == 10 and row["error_count"] == 0 and row["fet_rtt"]["n"] > 0, row
        assert (row["stall_count"] > 0) == row["stalls"], row
    assert (tmp_path / "stall.md").read_text().count("\n| 1 | ") == 4
