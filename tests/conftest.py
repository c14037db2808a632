from __future__ import annotations

import os

import pytest

# In-process tests import the ASGI application with the fake engine; don't load Whisper for them.
# (Live servers started by tests/support/live.py set it back to 1.)
os.environ["RELAY_PRELOAD_ENGINE"] = "0"


@pytest.fixture(autouse=True)
def _fake_engine_by_default(settings):
    """Unit tests use the deterministic fake engine and the in-memory layer."""
    settings.RELAY_ENGINE = "fake"
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    yield


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    from relay.live import admission, layer_health
    from relay.store import services

    admission.reset()
    layer_health.reset()
    services._last_beat = 0.0  # each test starts with an empty database
    yield
