"""deploy/grafana/relay-dashboard.json: a dashboard Grafana can import, whose every query is valid
PromQL (promtool parses it) and names only metrics /metrics exposes.

No JSON schema for Grafana dashboards ships on PyPI in a form worth a dependency, so this checks
the structure Grafana's import needs: the dashboard's identity fields, a Prometheus datasource
variable every target uses, panels with unique ids and refIds on the 24-column grid, no overlaps.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from tests.support.metric_names import expression_names, scraped_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "relay-dashboard.json"
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap"}
#: Grafana's own variables, replaced by what Grafana would put there before promtool parses.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def test_the_dashboard_has_what_an_import_needs():
    d = dashboard()
    assert d["title"] and re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"])
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["time"]["from"] and d["time"]["to"] and isinstance(d["panels"], list)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_panels_sit_on_the_grid_with_unique_ids_and_targets():
    all_panels = dashboard()["panels"]
    assert len({p["id"] for p in all_panels}) == len(all_panels)
    for p in all_panels:
        assert p["type"] in PANEL_TYPES and p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) and g[k] >= 0 for k in ("h", "w", "x", "y")) and g["w"] > 0 and g["h"] > 0
        assert g["x"] + g["w"] <= 24, p["title"]
    for a, b in combinations(all_panels, 2):
        ga, gb = a["gridPos"], b["gridPos"]
        apart = ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"] or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"]
        assert apart, f"panels overlap: {a['title']!r} and {b['title']!r}"
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"]


def test_every_query_is_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install the Debian package `prometheus` (apt-get install -y prometheus), as .ci/run does"
    rules = []
    for i, expr in enumerate(expressions()):
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"a Grafana variable promtool cannot stand in for: {expr}"
        rules.append({"record": f"dashboard:query{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.django_db
def test_every_query_names_metrics_the_relay_exposes(client):
    exposed = scraped_names(client)
    used = set().union(*(expression_names(e) for e in expressions()))
    wanted = {
        "relay_live_connections", "relay_live_sessions", "relay_turns_total", "relay_errors_total", "relay_refusals_total",
        "relay_connections_closed_total", "relay_connection_duration_seconds_bucket", "relay_reconnection_gap_seconds_bucket",
        "relay_end_of_turn_latency_seconds_bucket", "relay_force_end_turn_latency_seconds_bucket", "relay_engine_job_seconds_bucket",
        "relay_replay_first_turn_seconds_bucket", "relay_db_write_seconds_bucket", "relay_layer_outages_total",
    }
    assert wanted <= used, f"the dashboard shows nothing of {sorted(wanted - used)}"
    assert not used - exposed, f"not exposed by /metrics: {sorted(used - exposed)}"
