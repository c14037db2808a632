"""The relay's ASGI application as benchmarked: ``transcription_site.asgi:application`` itself,
plus a ``/__bench__/stats`` HTTP endpoint (garbage-collector pauses, active streams, event-loop
lag, paused sockets, group-commit batches, and the tails of turn-write latency and loop lateness
since ``/__bench__/window`` marked the start of a measurement window) and, when asked through the environment:

* ``BENCH_PATCHES=name,...``: candidate changes from :mod:`bench.patches`;
* ``BENCH_TRACEMALLOC=1``: trace allocations; ``/__bench__/tracemalloc`` lists the allocation
  sites that grew most since the first call (used to chase memory growth in a soak).

WebSocket connections go straight to the relay's application; the wrapper adds one ``if`` per
connection, nothing per frame.
"""
from __future__ import annotations

import gc
import json
import tracemalloc
import os
import time
from collections import deque

from transcription_site.asgi import application as relay_application

_pauses: dict[int, deque] = {0: deque(maxlen=5000), 1: deque(maxlen=5000), 2: deque(maxlen=5000)}
_counts = {0: 0, 1: 0, 2: 0}
_started = [0.0]


def _gc_callback(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        gen = info["generation"]
        _counts[gen] += 1
        _pauses[gen].append(time.perf_counter() - _started[0])


gc.callbacks.append(_gc_callback)

#: Every turn write's latency (call to commit) and every event-loop lateness the admission
#: watch notes, in seconds, since the measurement window began (``/__bench__/window``); the
#: bench reads their tails (whether a slow EndOfTurn waited on the database or on a late loop).
_tails: dict[str, deque] = {"write": deque(maxlen=200_000), "lag": deque(maxlen=200_000)}


def _also_tail(name: str, note):
    def noted(seconds: float) -> None:
        _tails[name].append(seconds)
        note(seconds)
    return noted


def _watch_tails() -> None:
    from relay.live import admission

    admission.note_write = _also_tail("write", admission.note_write)
    admission.note_lag = _also_tail("lag", admission.note_lag)


_watch_tails()

_patches = [p for p in os.environ.get("BENCH_PATCHES", "").split(",") if p]
if _patches:
    from bench import patches

    patches.apply(_patches)

if os.environ.get("BENCH_TRACEMALLOC") == "1":
    tracemalloc.start(8)

_first_snapshot: list = []


def tracemalloc_growth(top: int = 25) -> dict:
    if not tracemalloc.is_tracing():
        return {"error": "start the server with BENCH_TRACEMALLOC=1"}
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    if not _first_snapshot:
        _first_snapshot.append(snap)
        return {"baseline": True, "traced_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 2)}
    diff = snap.compare_to(_first_snapshot[0], "traceback")
    return {
        "traced_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 2),
        "top": [{"kb": round(d.size_diff / 1024, 1), "count": d.count_diff, "where": d.traceback.format()[-6:]} for d in diff[:top]],
    }


def stats() -> dict:
    from relay.live import admission
    from relay.server import inbound_flow as flow
    from relay.store import services

    out: dict = {"pid": os.getpid(), "active_streams": admission.active_streams(), "patches": _patches,
                 "loop_lag_ms": round(admission.lag_ms(), 2), "write_latency_ms": round(admission.write_latency_ms(), 2), "inbound_paused": flow.paused_count(),
                 "batches": {b.name: [b.batches, b.items] for b in (services._new_connections, services._turn_indexes, services._finished_turns)},
                 "gc_frozen": gc.get_freeze_count(), "gc": {}, "tails_s": {name: list(values) for name, values in _tails.items()}}
    for gen, pauses in _pauses.items():
        values = sorted(pauses)
        out["gc"][gen] = {
            "count": _counts[gen],
            "max_ms": round(values[-1] * 1000, 2) if values else 0.0,
            "p99_ms": round(values[int(len(values) * 0.99) - 1] * 1000, 2) if len(values) >= 100 else None,
            "total_ms": round(sum(values) * 1000, 1),
        }
    return out


def reset() -> None:
    for gen in _pauses:
        _pauses[gen].clear()
        _counts[gen] = 0


async def application(scope, receive, send):
    if scope["type"] == "http" and scope["path"].startswith("/__bench__/"):
        if scope["path"] == "/__bench__/reset":
            reset()
        if scope["path"] in ("/__bench__/reset", "/__bench__/window"):
            for values in _tails.values():
                values.clear()
        payload = tracemalloc_growth() if scope["path"] == "/__bench__/tracemalloc" else stats()
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    await relay_application(scope, receive, send)
