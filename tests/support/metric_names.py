"""Metric names in PromQL text and the series names a live /metrics exposes, to compare them."""
from __future__ import annotations

import re

#: A relay metric name in an expression (label values such as code="CAPACITY" are not names).
NAME = re.compile(r"\brelay_[a-z][a-z0-9_]*\b")
#: The series names Prometheus stores for each exposed family type.
SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum")}


def exposed_names(text: str) -> set[str]:
    """Every series name an exposition text's ``# TYPE`` lines make (counters end in _total)."""
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        if kind == "counter":
            names.add(family if family.endswith("_total") else family + "_total")
        else:
            names.update(family + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


def expression_names(expr: str) -> set[str]:
    return set(NAME.findall(re.sub(r'"[^"]*"', '""', expr)))


def scraped_names(client) -> set[str]:
    """The series names of the Django test client's ``GET /metrics``."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return exposed_names(response.content.decode())
