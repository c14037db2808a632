"""Smoke runs of the benchmark suite and the soak (not timed: they check that the harness runs
end to end against real daphne, Redis and PostgreSQL and writes its report; the figures
themselves come from `make bench` on a quiet machine)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.live import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.live, pytest.mark.redis, pytest.mark.postgres]


def test_bench_quick_writes_the_report(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=600)
    result = json.loads((tmp_path / "latest.json").read_text())
    for section in ("sweep", "variants", "handshakes", "replay", "fanout", "tabs", "shedding"):
        assert result[section], section
    targets = {row["target"] for row in result["sweep"]}
    assert any(t.startswith("baseline") for t in targets) and any(t.startswith("relay deployed") for t in targets)
    for row in result["sweep"] + result["fanout"]:
        assert row["streams"] > 0 and row["fps"] > 0
        assert row["dropped_updates"] == 0  # every Update of a finished turn arrived (a count, not a time)
    assert all(r["first"]["n"] == r["repeat"] for r in result["replay"])
    assert all(row["fan"]["n"] > 0 for row in result["fanout"])
    report = (tmp_path / "latest.md").read_text()
    assert "## Targets" in report and "## Streams sweep" in report
    for chart in ("sweep.png", "variants.png", "fanout.png"):
        assert (tmp_path / chart).stat().st_size > 1000


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
