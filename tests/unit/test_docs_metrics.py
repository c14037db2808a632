"""Every metric name README.md and docs/*.md mention is one /metrics exposes, spelled as exposed.

A counter family ``relay_errors`` is exposed as ``relay_errors_total``; a doc that says
``relay_errors{code=...}`` names a series no Prometheus query finds, so the bare family name of
a counter or histogram does not count. Names of the form ``relay_*`` that are not metrics (a
query parameter, a consumer handler) are listed in NOT_METRICS with where they come from.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAME = re.compile(r"\brelay_[a-z][a-z0-9_]*\b")
NOT_METRICS = {
    "relay_events": "the query parameter asking for Presence and History (docs/protocol.md)",
    "relay_event": "the consumer's channel-layer handler (docs/architecture.md)",
    "relay_worker": "the background worker's management command (docs/api.md)",
    "relay_api": "the REST API's Django app label (docs/api.md)",
}
#: The series names Prometheus stores for each exposed family type.
SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum")}

pytestmark = pytest.mark.django_db


def exposed_names(text: str) -> set[str]:
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        if kind == "counter":  # prometheus-client writes the TYPE line with or without _total
            names.add(family if family.endswith("_total") else family + "_total")
        else:
            names.update(family + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


def documented_names() -> dict[str, list[str]]:
    """{name: [file:line, ...]} of every relay_* name in the docs."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in NAME.findall(line):
                found.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{number}")
    return found


def test_every_metric_the_docs_name_is_exposed_by_that_name(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    exposed = exposed_names(response.content.decode())
    assert {"relay_errors_total", "relay_live_connections", "relay_connection_duration_seconds_bucket"} <= exposed
    documented = documented_names()
    assert "relay_connections_closed_total" in documented  # the parser finds the docs' names
    wrong = {name: where for name, where in documented.items() if name not in exposed and name not in NOT_METRICS}
    assert not wrong, f"named in the docs but not exposed by /metrics (counters end in _total): {wrong}"


def test_a_counters_bare_family_name_does_not_count():
    text = "# HELP relay_errors x\n# TYPE relay_errors counter\nrelay_errors_total{code=\"X\"} 1.0\n"
    assert "relay_errors_total" in exposed_names(text) and "relay_errors" not in exposed_names(text)
