"""Audio helpers with no I/O: sample alignment, PCM and G.711 decoding, resampling.

Clients may split samples across WebSocket frames (odd-length linear16 frames); engines always
receive whole samples (compressed encodings pass through whole: their decoders in
:mod:`relay.flux.codecs` reassemble them). linear32 is 32-bit signed little-endian PCM, as
Deepgram's Flux announcement defines it. G.711 (mu-law, A-law) is decoded through 256-entry tables computed once
from the ITU-T G.711 formulas (the standard library's ``audioop`` is gone in Python 3.13), and
resampling uses soxr (a well-kept high-quality resampler), not hand-rolled loops.
"""
from __future__ import annotations

import numpy as np

SUPPORTED_ENCODINGS = ("linear16", "linear32", "mulaw", "alaw", "opus", "ogg-opus")
#: Bytes per sample of the sample-based encodings; compressed ones have no fixed width.
SAMPLE_WIDTHS = {"linear16": 2, "linear32": 4, "mulaw": 1, "alaw": 1}
COMPRESSED_ENCODINGS = frozenset({"opus", "ogg-opus"})
#: What a second of compressed audio is taken to weigh when sizing backlogs and buffers
#: (32 kbit/s, speech Opus at a usual bitrate; a higher bitrate only makes limits stricter).
COMPRESSED_BYTES_PER_SECOND = 4000
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000


def sample_width(encoding: str) -> int:
    """Bytes per sample; 1 for compressed encodings, which SampleAligner passes through as sent."""
    return SAMPLE_WIDTHS.get(encoding, 1)


def bytes_per_second(encoding: str, sample_rate: int) -> int:
    if encoding in COMPRESSED_ENCODINGS:
        return COMPRESSED_BYTES_PER_SECOND
    return sample_rate * sample_width(encoding)


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


def _ulaw_table() -> np.ndarray:
    """Code -> Int16 sample: the bits are stored inverted; 3 exponent bits, 4 mantissa bits."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """Code -> Int16 sample: even bits stored inverted; segment 0 is linear, others doubled."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (a & 0x70) >> 4
    mantissa = (a & 0x0F) << 4
    magnitude = np.where(segment == 0, mantissa + 8, (mantissa + 0x108) << np.maximum(segment - 1, 0))
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


_ULAW_TO_INT16 = _ulaw_table()
_ALAW_TO_INT16 = _alaw_table()


def _g711_encode(samples: np.ndarray, encoding: str) -> np.ndarray:
    """Int16 -> G.711 codes (the inverse the decoding tables assume)."""
    pcm = samples.astype(np.int32)
    if encoding == "mulaw":
        magnitude = np.minimum(np.abs(pcm >> 2), 8159) + 0x21  # 14-bit magnitude, clipped and biased
        segment = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), magnitude)
        code = np.where(segment >= 8, 0x7F, (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F))
        return (code ^ np.where(pcm < 0, 0x7F, 0xFF)).astype(np.uint8)
    if encoding == "alaw":
        value = pcm >> 3  # 13-bit
        magnitude = np.where(value >= 0, value, -value - 1)
        segment = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), magnitude)
        quantized = (magnitude >> np.maximum(segment, 1)) & 0x0F  # segments 0 and 1 share a step
        code = np.where(segment >= 8, 0x7F, (segment << 4) | quantized)
        return (code ^ np.where(value >= 0, 0xD5, 0x55)).astype(np.uint8)
    raise ValueError(f"unsupported encoding {encoding!r}")


def to_int16(data: bytes, encoding: str) -> np.ndarray:
    """Decode whole samples of ``encoding`` to Int16 PCM."""
    if encoding == "linear16":
        return np.frombuffer(data, dtype="<i2")
    if encoding == "linear32":
        return (np.frombuffer(data, dtype="<i4") >> 16).astype(np.int16)
    if encoding == "mulaw":
        return _ULAW_TO_INT16[np.frombuffer(data, dtype=np.uint8)]
    if encoding == "alaw":
        return _ALAW_TO_INT16[np.frombuffer(data, dtype=np.uint8)]
    raise ValueError(f"unsupported encoding {encoding!r}")


def from_int16(samples: np.ndarray | bytes, encoding: str) -> bytes:
    """Encode Int16 PCM as ``encoding`` (what a telephony client sends; tests and benchmarks)."""
    pcm = np.frombuffer(samples, dtype="<i2") if isinstance(samples, (bytes, bytearray, memoryview)) else np.asarray(samples, dtype=np.int16)
    if encoding == "linear16":
        return pcm.astype("<i2").tobytes()
    if encoding == "linear32":
        return (pcm.astype("<i4") << 16).tobytes()
    return _g711_encode(pcm, encoding).tobytes()


class Resampler:
    """Streaming conversion of any supported input to float32 mono at ``target_rate``.

    Decodes too (:func:`relay.flux.codecs.decoder_for`), so call :meth:`process` where CPU work
    belongs (an engine's worker pool), then hand :meth:`take_warnings` to the client. For
    ``opus`` the data is length-prefixed packets (:func:`relay.flux.codecs.frame_packet`).
    """

    def __init__(self, encoding: str, source_rate: int, target_rate: int = 16000) -> None:
        from relay.flux.codecs import decoder_for

        self.encoding = encoding
        self.decoder = decoder_for(encoding, source_rate)
        self.source_rate = self.decoder.rate
        self.target_rate = target_rate
        self._stream = None
        self.failed = False
        if self.source_rate != target_rate:
            import soxr

            self._stream = soxr.ResampleStream(self.source_rate, target_rate, 1, dtype="float32", quality="HQ")

    def process(self, data: bytes, last: bool = False) -> np.ndarray:
        """Raises relay.exceptions.InvalidAudio when the audio is past saving; from then on the
        decoder takes nothing more, but ``last=True`` still flushes what was decoded before."""
        from relay.exceptions import InvalidAudio

        pcm = np.zeros(0, dtype=np.int16)
        if not self.failed:
            try:
                if data:
                    pcm = self.decoder.decode(data)
                if last:
                    tail = self.decoder.finish()
                    pcm = np.concatenate((pcm, tail)) if tail.size else pcm
            except InvalidAudio:
                self.failed = True
                raise
        samples = pcm.astype(np.float32) / 32768.0
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)

    def take_warnings(self) -> list[str]:
        """``INVALID_AUDIO_PACKET`` descriptions since the last call."""
        return self.decoder.take_warnings()
