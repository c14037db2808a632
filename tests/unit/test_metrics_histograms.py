"""The latency histograms of /metrics: driven through the in-process consumer with the fake
engine, the offline worker pool on its own, and two processes in multiprocess mode."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from asgiref.sync import sync_to_async
from prometheus_client.parser import text_string_to_metric_families

from relay.engines.offline.pool import PRIORITY_FINAL, PRIORITY_STREAM, PRIORITY_UPDATE, WorkerPool
from relay.ops import metrics
from tests.support.audio import silence, tone
from tests.support.live import ROOT
from tests.support.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)


def parse(text: str) -> dict[str, dict]:
    """{sample name: {frozenset(labels): value}} from the exposition text."""
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


async def scrape() -> dict[str, dict]:
    return parse((await sync_to_async(metrics.render)()).decode())


def value(data: dict, name: str, **labels) -> float:
    return data.get(name, {}).get(frozenset(labels.items()), 0.0)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_end_of_speech_to_end_of_turn_and_turn_writes():
    before = await scrape()
    c = Client("/v2/listen?session=hist-eot")
    await c.connect()
    sent = time.monotonic()
    await c.send_audio(tone(1.0) + silence(0.8))
    end = await c.recv_turn_end()
    waited = time.monotonic() - sent
    await c.disconnect()
    assert end["trigger"] == "model"
    after = await scrape()
    assert delta(before, after, "relay_end_of_turn_latency_seconds_count", engine="fake") == 1
    seconds = delta(before, after, "relay_end_of_turn_latency_seconds_sum", engine="fake")
    # From the frame that ended the turn to the send: more than nothing, less than the whole exchange.
    assert 0 < seconds < waited
    assert delta(before, after, "relay_end_of_turn_latency_seconds_bucket", engine="fake", le="+Inf") == 1
    # A manual-only histogram did not move; the flush at close (end_of_stream) had no open turn.
    assert delta(before, after, "relay_force_end_turn_latency_seconds_count", engine="fake") == 0
    for kind in ("index", "turn"):
        assert delta(before, after, "relay_db_write_seconds_count", kind=kind) == 1
        assert 0 < delta(before, after, "relay_db_write_seconds_sum", kind=kind) < waited


async def test_force_end_turn_to_end_of_turn():
    before = await scrape()
    c = Client("/v2/listen?session=hist-force")
    await c.connect()
    await c.send_audio(tone(0.6))
    await c.recv_until(lambda m: m.get("event") == "Update")
    forced = time.monotonic()
    await c.send_json({"type": "ForceEndTurn"})
    end = await c.recv_turn_end()
    waited = time.monotonic() - forced
    # A second ForceEndTurn with no turn open: no EndOfTurn answers it, nothing is observed.
    await c.send_json({"type": "ForceEndTurn"})
    await c.send_audio(tone(0.3) + silence(0.7))
    assert (await c.recv_turn_end())["trigger"] == "model"
    await c.disconnect()
    assert end["trigger"] == "manual"
    after = await scrape()
    assert delta(before, after, "relay_force_end_turn_latency_seconds_count", engine="fake") == 1
    assert 0 < delta(before, after, "relay_force_end_turn_latency_seconds_sum", engine="fake") < waited
    assert delta(before, after, "relay_end_of_turn_latency_seconds_count", engine="fake") == 1  # the model turn only


async def test_replay_time_to_first_turn():
    a = Client("/v2/listen?session=hist-replay")
    await a.connect()
    for _ in range(2):
        await a.send_audio(tone(0.3) + silence(0.6))
        await a.recv_turn_end()
    await a.disconnect()
    before = await scrape()
    b = Client("/v2/listen?session=hist-replay")
    started = time.monotonic()
    assert (await b.connect())["resumed"] is True
    replayed = [await b.recv() for _ in range(2)]
    waited = time.monotonic() - started
    await b.disconnect()
    assert all(m["replayed"] for m in replayed)
    after = await scrape()
    assert delta(before, after, "relay_replay_first_turn_seconds_count") == 1  # once per replay, not per turn
    assert 0 < delta(before, after, "relay_replay_first_turn_seconds_sum") < waited


async def test_worker_pool_times_each_job_by_kind():
    before = await scrape()
    pool = WorkerPool(2, "unit-pool", engine="unit")
    try:
        await pool.run(PRIORITY_FINAL, time.sleep, 0.02)
        await pool.run(PRIORITY_UPDATE, time.sleep, 0.01)
        await pool.run(PRIORITY_STREAM, time.sleep, 0)
        await pool.run(PRIORITY_STREAM, time.sleep, 0)
        with pytest.raises(ZeroDivisionError):  # a failed job is timed too
            await pool.run(PRIORITY_UPDATE, lambda: 1 / 0)
    finally:
        pool.shutdown()
    after = await scrape()
    count = "relay_engine_job_seconds_count"
    assert delta(before, after, count, engine="unit", kind="final") == 1
    assert delta(before, after, count, engine="unit", kind="update") == 2
    assert delta(before, after, count, engine="unit", kind="stream") == 2
    assert 0.02 <= delta(before, after, "relay_engine_job_seconds_sum", engine="unit", kind="final") < 1
    assert delta(before, after, "relay_engine_job_seconds_bucket", engine="unit", kind="final", le="0.01") == 0


@pytest.mark.slow
async def test_sphinx_stamps_its_turn_ends_and_times_its_jobs():
    """A real offline engine (pocketsphinx, a few seconds): every EndOfTurn carries the time its batch arrived."""
    from prometheus_client import REGISTRY

    from relay.engines.base import StreamOptions
    from relay.engines.offline.sphinx import SphinxEngine
    from tests.support.speech import finals, pcm, run_stream

    engine = SphinxEngine("sphinx-histograms", {"max_streams": 1})
    try:
        started = time.monotonic()
        events = await run_stream(engine.open_stream(StreamOptions()), pcm("long.wav"))
    finally:
        engine.close()
    ends = finals(events)
    stamps = [e.speech_ended_at for e in ends]
    assert len(ends) >= 2 and all(t is not None for t in stamps)
    assert started <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= time.monotonic()
    jobs = REGISTRY.get_sample_value("relay_engine_job_seconds_count", {"engine": "sphinx-histograms", "kind": "stream"})
    assert jobs and jobs >= 1  # queued audio is decoded in batches: fewer jobs than turns is normal


def test_latency_helpers_pair_force_with_manual_turns():
    from relay.engines.base import TurnEvent

    now = time.monotonic()
    model = TurnEvent("EndOfTurn", 0, trigger="model", speech_ended_at=now)
    manual = TurnEvent("EndOfTurn", 1, trigger="manual")
    closing = TurnEvent("EndOfTurn", 2, trigger="end_of_stream", speech_ended_at=now)
    assert metrics.end_of_turn_sent("fake", model, now) == now  # a pending ForceEndTurn waits for its manual turn
    assert metrics.end_of_turn_sent("fake", manual, now) is None  # ... which uses it up
    assert metrics.end_of_turn_sent("fake", closing, None) is None


WORKER = """
import os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "transcription_site.settings")
import django; django.setup()
from relay.engines.base import TurnEvent
from relay.ops import metrics
import time
n = int(sys.argv[1])
for _ in range(n):
    metrics.end_of_turn_sent("fake", TurnEvent("EndOfTurn", 0, trigger="model", speech_ended_at=time.monotonic() - 0.15), None)
    metrics.db_write("turn", 0.004)
"""


def test_histograms_add_up_across_processes(client, tmp_path, monkeypatch):
    """Two processes observe into PROMETHEUS_MULTIPROC_DIR; a scrape of a third sums their buckets."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "DJANGO_DEBUG": "1"}
    for n in (2, 3):
        subprocess.run([sys.executable, "-c", WORKER, str(n)], cwd=ROOT, env=env, check=True, timeout=120)
    assert len(list(tmp_path.glob("histogram_*.db"))) == 2
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    response = client.get("/metrics")
    assert response.status_code == 200
    data = parse(response.content.decode())
    assert value(data, "relay_end_of_turn_latency_seconds_count", engine="fake") == 5
    assert value(data, "relay_end_of_turn_latency_seconds_bucket", engine="fake", le="0.1") == 0
    assert value(data, "relay_end_of_turn_latency_seconds_bucket", engine="fake", le="0.2") == 5
    assert 0.75 <= value(data, "relay_end_of_turn_latency_seconds_sum", engine="fake") < 1.5
    assert value(data, "relay_db_write_seconds_bucket", kind="turn", le="0.005") == 5
    assert value(data, "relay_db_write_seconds_sum", kind="turn") == pytest.approx(0.02)
