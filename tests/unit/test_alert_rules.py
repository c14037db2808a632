"""deploy/prometheus/relay-rules.yml: valid for promtool, each alert tested on synthetic series
(deploy/prometheus/relay-rules.test.yml), and naming only metrics /metrics exposes."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.metric_names import expression_names, scraped_names

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "relay-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "relay-rules.test.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install the Debian package `prometheus` (apt-get install -y prometheus), as .ci/run does"
    return path


def run(*args: str) -> str:
    out = subprocess.run([promtool(), *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules():
    assert "SUCCESS" in run("check", "rules", RULES.name)


def test_every_alert_fires_and_stays_quiet_on_synthetic_series():
    assert "SUCCESS" in run("test", "rules", RULES_TEST.name)


def test_every_alert_has_a_test_and_a_severity():
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    assert not set(names) - tested, "alerts never shown firing in relay-rules.test.yml"
    assert all(rule["labels"]["severity"] in {"warning", "critical"} for rule in alerts())


@pytest.mark.django_db
def test_rules_name_only_metrics_the_relay_exposes(client):
    exposed = scraped_names(client)
    used = set().union(*(expression_names(rule["expr"]) for rule in alerts()))
    assert {"relay_end_of_turn_latency_seconds_bucket", "relay_layer_outages_total", "relay_processes"} <= used
    assert not used - exposed, f"not exposed by /metrics: {sorted(used - exposed)}"
