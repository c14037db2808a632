"""Flow control on a real daphne process (relay/server/inbound_flow.py): when the relay falls behind a stream,
daphne stops reading that socket instead of queueing its audio without bound, and nothing is
lost; a process whose event loop runs late refuses new streams (relay/live/admission.py)."""
from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import websockets

from tests.support.audio import silence, tone
from tests.support.fault_engines import SLOW_CONTROL
from tests.support.live import LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]


def scrape(server: LiveServer, name: str) -> float:
    text = urllib.request.urlopen(server.http_url + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


async def stream_behind(url: str, speech: bytes, frame: int) -> list[dict]:
    """Make the relay's handler stall for a second, send audio meanwhile, read every message."""
    messages = []
    async with websockets.connect(url, max_size=None) as ws:
        messages.append(json.loads(await ws.recv()))
        await ws.send(SLOW_CONTROL)
        await ws.send(json.dumps({"type": "ForceEndTurn"}))  # the handler now sleeps for 1 s
        for i in range(0, len(speech), frame):
            await ws.send(speech[i : i + frame])
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for raw in ws:
            messages.append(json.loads(raw))
        assert ws.close_code == 1000
    return messages


def test_relay_behind_a_stream_stops_reading_it_and_loses_no_audio(tmp_path):
    env = {**sqlite_env(tmp_path), "DJANGO_SETTINGS_MODULE": "tests.support.fault_settings", "RELAY_ENGINE": "faulty",
           "RELAY_MAX_INBOUND_MESSAGES": "10", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    speech = tone(2.0) + silence(0.7)  # eight words, then the silence that ends the turn
    with LiveServer(env) as server:
        assert scrape(server, "relay_inbound_pauses_total") == 0
        messages = asyncio.run(stream_behind(server.ws_url + "/v2/listen?session=behind", speech, frame=1280))
        assert scrape(server, "relay_inbound_pauses_total") >= 1  # daphne stopped reading while the handler slept
    ends = [m for m in messages if m.get("event") == "EndOfTurn"]
    # Every frame sent while reading was paused reached the engine: the whole turn, in order.
    assert [e["transcript"] for e in ends] == ["one two three four five six seven eight"]
    assert ends[0]["audio_window_end"] == pytest.approx(2.5, abs=0.05)
    assert not [m for m in messages if m.get("type") == "Error"]


def test_same_stream_without_the_limit_does_not_pause(tmp_path):
    """The check above can fail: with the limit off, the same stall never pauses reading."""
    env = {**sqlite_env(tmp_path), "DJANGO_SETTINGS_MODULE": "tests.support.fault_settings", "RELAY_ENGINE": "faulty",
           "RELAY_MAX_INBOUND_MESSAGES": "0", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with LiveServer(env) as server:
        messages = asyncio.run(stream_behind(server.ws_url + "/v2/listen?session=unbounded", tone(2.0) + silence(0.7), frame=1280))
        assert scrape(server, "relay_inbound_pauses_total") == 0
    assert [m["transcript"] for m in messages if m.get("event") == "EndOfTurn"] == ["one two three four five six seven eight"]
