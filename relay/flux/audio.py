"""Audio helpers with no I/O: sample alignment, G.711 decoding, resampling.

Clients may split samples across WebSocket frames (odd-length linear16 frames); engines always
receive whole samples. Decoding and resampling use the standard library's G.711 codec and soxr
(a well-kept high-quality resampler), not hand-rolled loops.
"""
from __future__ import annotations

import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # stdlib on Python 3.11/3.12; provides the G.711 tables

SUPPORTED_ENCODINGS = ("linear16", "mulaw", "alaw")
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000


class SampleAligner:
    """Reassembles a byte stream into whole samples, carrying any partial sample over."""

    __slots__ = ("width", "_carry")

    def __init__(self, width: int) -> None:
        self.width = width
        self._carry = b""

    def push(self, data: bytes) -> bytes:
        if self.width == 1:
            return data
        if self._carry:
            data = self._carry + data
            self._carry = b""
        extra = len(data) % self.width
        if extra:
            self._carry = data[-extra:]
            data = data[:-extra]
        return data

    @property
    def pending(self) -> int:
        return len(self._carry)


def to_int16(data: bytes, encoding: str) -> np.ndarray:
    """Decode whole samples of ``encoding`` to Int16 PCM."""
    if encoding == "linear16":
        return np.frombuffer(data, dtype="<i2")
    if encoding == "mulaw":
        return np.frombuffer(audioop.ulaw2lin(data, 2), dtype="<i2")
    if encoding == "alaw":
        return np.frombuffer(audioop.alaw2lin(data, 2), dtype="<i2")
    raise ValueError(f"unsupported encoding {encoding!r}")


class Resampler:
    """Streaming conversion of any supported input to float32 mono at ``target_rate``."""

    def __init__(self, encoding: str, source_rate: int, target_rate: int = 16000) -> None:
        self.encoding = encoding
        self.source_rate = source_rate
        self.target_rate = target_rate
        self._stream = None
        if source_rate != target_rate:
            import soxr

            self._stream = soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32", quality="HQ")

    def process(self, data: bytes, last: bool = False) -> np.ndarray:
        samples = to_int16(data, self.encoding).astype(np.float32) / 32768.0
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)
