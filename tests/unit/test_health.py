"""/healthz: database, channel layer round trip, engine readiness; 200 or 503 with reasons."""
from __future__ import annotations

import pytest
from django.db import connection

from relay.ops import health
from relay.engines import get_engine

pytestmark = pytest.mark.django_db(transaction=True)


async def test_all_checks_pass(async_client):
    response = await async_client.get("/healthz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["checks"]["database"]["ok"] and body["checks"]["database"]["detail"] == connection.vendor
    assert body["checks"]["channel_layer"] == {"ok": True, "detail": "InMemoryChannelLayer", "ms": body["checks"]["channel_layer"]["ms"]}
    assert body["checks"]["engine"]["ok"] and body["checks"]["engine"]["detail"].startswith("fake:")
    assert response["Cache-Control"] == "no-store"


async def test_engine_not_ready_is_503_with_its_reason(async_client, monkeypatch):
    monkeypatch.setattr(type(get_engine("fake")), "readiness", lambda self: (False, "model still loading"))
    response = await async_client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["reasons"] == ["engine: fake: model still loading"]


async def test_unknown_engine_is_503(async_client, settings):
    settings.RELAY_ENGINE = "nonexistent"
    response = await async_client.get("/healthz")
    assert response.status_code == 503
    assert "No engine is configured" in response.json()["reasons"][0]


async def test_database_failure_is_503(async_client, monkeypatch):
    def broken():
        return health.Check(False, "database unavailable: OperationalError")

    monkeypatch.setattr(health, "check_database", broken)
    response = await async_client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["reasons"] == ["database: database unavailable: OperationalError"]


async def test_channel_layer_that_never_delivers_is_503(async_client, settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "tests.unit.test_health.BlackHoleLayer"}}
    settings.RELAY_HEALTH_TIMEOUT_SECONDS = 0.2
    response = await async_client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["reasons"] == ["channel_layer: BlackHoleLayer: no answer within 0.2 s"]


async def test_database_check_really_queries():
    from channels.db import database_sync_to_async

    check = await database_sync_to_async(health.check_database)()
    assert check.ok and check.detail == connection.vendor


from channels.layers import InMemoryChannelLayer  # noqa: E402


class BlackHoleLayer(InMemoryChannelLayer):
    """Accepts messages and never delivers them (a partitioned Redis, say)."""

    async def send(self, channel, message):
        return None
