"""``/healthz``: can this process serve a stream right now?

Three checks, each with a reason: the database answers, the channel layer carries a message to
this process and back (a real round trip through Redis when it is configured), and the engine
says it is ready. 200 when all pass, 503 with the failing reasons otherwise, so a load balancer
can take a process out of rotation. The body never includes secrets (no URLs or passwords).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse

from relay.engines import get_engine


@dataclass(slots=True)
class Check:
    ok: bool
    detail: str
    ms: float = 0.0


def check_database() -> Check:
    start = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:
        return Check(False, f"database unavailable: {type(exc).__name__}", _ms(start))
    return Check(True, connection.vendor, _ms(start))


async def check_channel_layer(timeout: float) -> Check:
    start = time.perf_counter()
    layer = get_channel_layer()
    if layer is None:
        return Check(False, "no channel layer is configured", _ms(start))
    kind = type(layer).__name__
    try:
        channel = await layer.new_channel(prefix="relay.ops.health.")
        token = uuid.uuid4().hex
        await asyncio.wait_for(layer.send(channel, {"type": "health.ping", "token": token}), timeout)
        message = await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        return Check(False, f"{kind}: no answer within {timeout:g} s", _ms(start))
    except Exception as exc:
        return Check(False, f"{kind}: {type(exc).__name__}", _ms(start))
    if message.get("token") != token:
        return Check(False, f"{kind}: round trip returned another message", _ms(start))
    return Check(True, kind, _ms(start))


def check_engine() -> Check:
    start = time.perf_counter()
    try:
        engine = get_engine()
        ready, reason = engine.readiness()
    except Exception as exc:
        return Check(False, f"{settings.RELAY_ENGINE}: {exc}", _ms(start))
    return Check(bool(ready), f"{engine.alias}: {reason}", _ms(start))


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


async def healthz(request: HttpRequest) -> JsonResponse:
    timeout = settings.RELAY_HEALTH_TIMEOUT_SECONDS
    database, layer, engine = await asyncio.gather(
        database_sync_to_async(check_database)(),
        check_channel_layer(timeout),
        sync_to_async(check_engine, thread_sensitive=False)(),
    )
    checks = {"database": database, "channel_layer": layer, "engine": engine}
    ok = all(c.ok for c in checks.values())
    body = {
        "status": "ok" if ok else "unavailable",
        "checks": {name: asdict(c) for name, c in checks.items()},
        "reasons": [f"{name}: {c.detail}" for name, c in checks.items() if not c.ok],
    }
    response = JsonResponse(body, status=200 if ok else 503)
    response["Cache-Control"] = "no-store"
    return response
