"""/metrics: the consumer hooks, database gauges, the Prometheus text parser, several processes."""
from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from relay.ops import metrics
from tests.support import histories
from tests.support.live import ROOT

pytestmark = pytest.mark.django_db


def scrape(client, **headers) -> dict[str, dict]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    return samples(response.content.decode())


def samples(text: str) -> dict[str, dict]:
    """{sample name: {frozenset(labels): value}} from the exposition text."""
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(data: dict, name: str, **labels) -> float:
    return data.get(name, {}).get(frozenset(labels.items()), 0.0)


def test_hooks_move_counters_and_histograms(client):
    before = scrape(client)
    metrics.connection_opened(resumed=False)
    metrics.connection_opened(resumed=True)
    metrics.reconnection_paired(0.3)
    metrics.connection_closed(code=1000, duration_seconds=400.0)
    metrics.connection_closed(code=1006, duration_seconds=12.0)
    metrics.connection_closed(code=4011, duration_seconds=2.0)
    metrics.connection_closed(code=3999, duration_seconds=1.0)  # an odd client code: label "other"
    metrics.turn_finished(trigger="model")
    metrics.turn_finished(trigger="end_of_stream")
    metrics.audio_received(nbytes=64000, seconds=2.0)
    metrics.audio_received(nbytes=0, seconds=0.0)
    metrics.error_sent(code="ENGINE_ERROR")
    metrics.error_sent(code="made-up")
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("relay_connections_opened_total", resumed="false") == 1
    assert delta("relay_connections_opened_total", resumed="true") == 1
    assert delta("relay_reconnection_gap_seconds_bucket", le="0.5") == 1
    assert delta("relay_reconnection_gap_seconds_bucket", le="0.25") == 0
    assert delta("relay_connections_closed_total", outcome="clean", code="1000") == 1
    assert delta("relay_connections_closed_total", outcome="dropped", code="1006") == 1
    assert delta("relay_connections_closed_total", outcome="error", code="4011") == 1
    assert delta("relay_connections_closed_total", outcome="dropped", code="other") == 1
    assert delta("relay_connection_duration_seconds_count") == 4
    assert delta("relay_connection_duration_seconds_sum") == pytest.approx(415.0)
    assert delta("relay_connection_duration_seconds_bucket", le="30.0") == 3
    assert delta("relay_turns_total", trigger="model") == 1 and delta("relay_turns_total", trigger="end_of_stream") == 1
    assert delta("relay_audio_received_bytes_total") == 64000 and delta("relay_audio_received_seconds_total") == 2.0
    assert delta("relay_errors_total", code="ENGINE_ERROR") == 1 and delta("relay_errors_total", code="OTHER") == 1


def test_audio_meter_reports_deltas_once(client):
    before = scrape(client)
    meter = metrics.AudioMeter(32000)
    meter.report(16000)  # first turn end: 0.5 s so far
    meter.report(16000)  # nothing new since
    meter.report(48000)  # close: 1 s more
    after = scrape(client)
    assert value(after, "relay_audio_received_bytes_total") - value(before, "relay_audio_received_bytes_total") == 48000
    assert value(after, "relay_audio_received_seconds_total") - value(before, "relay_audio_received_seconds_total") == 1.5


def test_live_gauges_come_from_the_database_at_scrape_time(client):
    live = histories.process("p:live")
    dead = histories.process("p:dead", heartbeat_age=3600)
    now = timezone.now()
    a, b, c = (histories.session(sid) for sid in ("ga", "gb", "gc"))
    histories.connection(a, opened=now, duration=None, proc=live)
    histories.connection(a, opened=now, duration=None, proc=live)
    histories.connection(b, opened=now, duration=None, proc=live)
    histories.connection(b, opened=now - timedelta(minutes=5), duration=60, proc=live)  # closed
    histories.connection(c, opened=now, duration=None, proc=dead)  # crashed process: not live
    data = scrape(client)
    assert value(data, "relay_database_up") == 1
    assert value(data, "relay_live_connections") == 3
    assert value(data, "relay_live_sessions") == 2
    assert value(data, "relay_processes") == 1


def test_metrics_token_guards_the_endpoint(client, settings):
    settings.RELAY_METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert value(scrape(client, HTTP_AUTHORIZATION="Bearer s3cret"), "relay_database_up") == 1


WORKER = """
import os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "transcription_site.settings")
import django; django.setup()
from relay.ops import metrics
n = int(sys.argv[1])
for _ in range(n):
    metrics.connection_opened(resumed=False)
metrics.connection_closed(code=1000, duration_seconds=10.0 * n)
metrics.audio_received(nbytes=1000 * n, seconds=float(n))
"""


def test_several_processes_add_up_in_multiprocess_mode(client, tmp_path, monkeypatch):
    """Two worker processes write to PROMETHEUS_MULTIPROC_DIR; a scrape of any process sums them."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "DJANGO_DEBUG": "1"}
    for n in (2, 3):
        subprocess.run([sys.executable, "-c", WORKER, str(n)], cwd=ROOT, env=env, check=True, timeout=120)
    assert len(list(tmp_path.glob("*.db"))) >= 2
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    data = scrape(client)
    assert value(data, "relay_connections_opened_total", resumed="false") == 5
    assert value(data, "relay_connections_closed_total", outcome="clean", code="1000") == 2
    assert value(data, "relay_connection_duration_seconds_sum") == 50.0
    assert value(data, "relay_audio_received_bytes_total") == 5000
    assert value(data, "relay_database_up") == 1  # database gauges sit beside the aggregated files
