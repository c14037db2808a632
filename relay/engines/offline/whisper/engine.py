"""The Whisper engine: loads the model once per process, owns the decode and VAD worker pools."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from pathlib import Path
from typing import Any

from relay.exceptions import Capacity, EngineUnavailable
from relay.ops.logs import get_logger

from relay.engines.base import StreamOptions
from relay.engines.offline.pool import OfflineEngine, WorkerPool

from .model import BUNDLED_MODEL_SHA256, bundled_model_dir, check_model_dir
from .runner import WhisperModelRunner
from .stream import WhisperStream
from .vad import SileroVad

log = get_logger("relay.engines.offline.whisper")

#: The default cap on streams comes from the box's speed. Measured with `make bench-engines` on a
#: 2-core box (two workers; docs/engines.md, "Workers and capacity"): 2 real-time speakers kept
#: EndOfTurn p95 under 1 s (0.91 s), 3 did not (1.10 s), 8 got 3.5 s. On that box
#: :meth:`WhisperModelRunner.encode_seconds` took REFERENCE_ENCODE_S. A box that encodes k times as
#: fast gets k times the streams per decoding core (a worker on a core of its own), never fewer
#: than one per core nor more than MAX_STREAMS_PER_CORE.
REFERENCE_STREAMS_PER_CORE = 1.0
REFERENCE_ENCODE_S = 0.090
MAX_STREAMS_PER_CORE = 8


def default_capacity(cores: int, encode_seconds: float) -> int:
    """Streams one process serves by default: the reference box's figure scaled by this box's speed.

    ``cores``: the workers that decode at once on cores of their own (workers, at most the CPU count).
    """
    cores = max(1, cores)
    speed = REFERENCE_ENCODE_S / encode_seconds if encode_seconds > 0 else 1.0
    streams = int(REFERENCE_STREAMS_PER_CORE * cores * speed + 1e-9)
    return min(MAX_STREAMS_PER_CORE * cores, max(cores, streams))


class WhisperEngine(OfflineEngine):
    """Options: model_dir, model_sha256, cache_dir, compute_type, workers, cpu_threads, wide_encode,
    max_streams, beam_size, eot_complete_ms, eot_incomplete_ms, update_interval_ms, first_update_ms, speculate_ms,
    max_turn_s."""

    name = "whisper"
    stream_class = WhisperStream

    def __init__(self, alias: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(alias, options)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: faster-whisper never downloads
        opts = self.options
        self.workers = int(opts.get("workers") or os.cpu_count() or 1)
        # Set by the operator, or measured when the model loads (default_capacity); until then, the
        # reference box's figure.
        self.capacity_measured = not opts.get("max_streams")
        self.cores = min(self.workers, os.cpu_count() or self.workers)
        self.max_streams = int(opts.get("max_streams") or default_capacity(self.cores, REFERENCE_ENCODE_S))
        self.encode_seconds: float | None = None
        self.update_interval_s = float(opts.get("update_interval_ms", 600)) / 1000
        self.first_update_s = float(opts.get("first_update_ms", 250)) / 1000
        self.speculate_s = float(opts.get("speculate_ms", 32)) / 1000
        # Silence that ends a turn whose words read as finished / unfinished (at eot_threshold 0.7).
        self.eot_complete_s = float(opts.get("eot_complete_ms", 300)) / 1000
        self.eot_incomplete_s = max(self.eot_complete_s, float(opts.get("eot_incomplete_ms", 1000)) / 1000)
        self.max_turn_s = float(opts.get("max_turn_s", 25.0))
        self.pool = WorkerPool(self.workers, f"whisper-{alias}", max_wait=float(opts.get("max_queue_wait_s", 1.5)), engine=alias)
        self.frontend = WorkerPool(1, f"whisper-{alias}-vad", engine=alias)
        self.model_label = "Whisper"
        self.runner: WhisperModelRunner
        self.vad: SileroVad
        self._loaded: concurrent.futures.Future = concurrent.futures.Future()
        self.load_seconds = 0.0
        threading.Thread(target=self._load, name=f"whisper-{alias}-load", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            opts = self.options
            if opts.get("model_dir"):
                path = Path(opts["model_dir"]).expanduser()
                check_model_dir(path, opts.get("model_sha256") or None)
                self.model_label = f"the Whisper model in {path.name}"
            else:
                path = bundled_model_dir(opts.get("cache_dir") or None)
                check_model_dir(path, BUNDLED_MODEL_SHA256)
                self.model_label = "Whisper base"
            self.runner = WhisperModelRunner(
                path,
                compute_type=str(opts.get("compute_type", "int8")),
                cpu_threads=int(opts.get("cpu_threads", 1)),
                workers=self.workers,
                beam_size=int(opts.get("beam_size", 5)),
                # A final that finds the other workers idle is encoded on all the decoding cores (on
                # unless turned off, and only by a copy that encodes as the one-thread model does).
                wide_threads=self.cores if opts.get("wide_encode", True) else 0,
            )
            self.runner.spare = self.pool.alone
            self.vad = SileroVad()
            if self.capacity_measured:
                self.encode_seconds = self.runner.encode_seconds()
                self.max_streams = default_capacity(self.cores, self.encode_seconds)
            self.load_seconds = time.monotonic() - started
            log.info(
                "whisper_loaded",
                alias=self.alias,
                path=str(path),
                seconds=round(self.load_seconds, 2),
                workers=self.workers,
                max_streams=self.max_streams,
                encode_ms=None if self.encode_seconds is None else round(self.encode_seconds * 1000, 1),
                wide_encode=self.runner.wide_threads,
            )
            self._loaded.set_result(True)
        except EngineUnavailable as exc:
            log.error("whisper_unavailable", alias=self.alias, reason=exc.description)
            self._loaded.set_exception(exc)
        except Exception as exc:
            log.exception("whisper_load_failed", alias=self.alias)
            self._loaded.set_exception(EngineUnavailable(f"The Whisper model could not be loaded: {exc}"))

    def wait_loaded_sync(self, timeout: float | None = None) -> None:
        self._loaded.result(timeout)

    async def wait_loaded(self) -> None:
        await asyncio.wrap_future(self._loaded)

    def open_stream(self, options: StreamOptions) -> WhisperStream:
        if self._loaded.done() and self._loaded.exception() is not None:
            raise self._loaded.exception()  # type: ignore[misc]
        if self.pool.saturated():
            raise Capacity("The Whisper decoders are saturated; try again later.")
        self.reserve()
        return WhisperStream(self, options)

    def readiness(self) -> tuple[bool, str]:
        if not self._loaded.done():
            return False, "loading the Whisper model"
        if self._loaded.exception() is not None:
            return False, str(self._loaded.exception())
        if self.pool.saturated():
            return False, "decoders saturated"
        return True, "ok"

    def close(self) -> None:
        self.pool.shutdown()
        self.frontend.shutdown()
        if self._loaded.done() and self._loaded.exception() is None:
            del self.runner  # free CTranslate2's threads before interpreter shutdown
