"""Heap snapshots from running daphne processes, for memory investigations (docs/benchmarks.md).

Put this directory on PYTHONPATH and set HEAP_SNAP_DIR: every daphne process started with that
environment traces its Python allocations (``tracemalloc``, HEAP_FRAMES frames, default 6) and
writes a snapshot to HEAP_SNAP_DIR on each SIGUSR2. Compare two with ``python -m bench.heap.compare``.

    PYTHONPATH=bench/heap HEAP_SNAP_DIR=/tmp/snaps .venv/bin/python -m bench.soak --minutes 8 --streams 30 --out /tmp/soak
    pkill -USR2 -f 'daphne -e tcp'     # a snapshot now; again later

Tracing slows the relay down: at 50 streams and 12 frames the soak's servers fell behind (client
errors), at 30 streams and 6 frames they did not.
"""
import os
import signal
import sys

if os.environ.get("HEAP_SNAP_DIR") and "daphne" in " ".join(sys.argv):
    import gc
    import tracemalloc

    if not tracemalloc.is_tracing():
        tracemalloc.start(int(os.environ.get("HEAP_FRAMES", "6")))
    _taken = [0]

    def _snapshot(signum: int, frame: object) -> None:
        _taken[0] += 1
        gc.collect()
        path = os.path.join(os.environ["HEAP_SNAP_DIR"], f"snap-{os.getpid()}-{_taken[0]}.pickle")
        tracemalloc.take_snapshot().dump(path)

    signal.signal(signal.SIGUSR2, _snapshot)
