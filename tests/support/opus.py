"""Opus test audio made at test time with PyAV's libopus encoder (no binary fixtures)."""
from __future__ import annotations

import io

import av
import numpy as np


def _frames(pcm: bytes, rate: int, frame_size: int | None = None) -> list[av.AudioFrame]:
    """Int16 mono ``pcm`` at ``rate`` as 48 kHz frames (Opus encodes at 48 kHz)."""
    frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, dtype="<i2").reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="s16", layout="mono", rate=48000, frame_size=frame_size)
    return resampler.resample(frame) + resampler.resample(None)


def ogg_opus(pcm: bytes, *, rate: int = 16000, bitrate: int = 32000) -> bytes:
    """An Ogg Opus file (RFC 7845) of Int16 mono ``pcm``."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000)
        stream.layout = "mono"
        stream.bit_rate = bitrate
        for frame in _frames(pcm, rate):
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def opus_packets(pcm: bytes, *, rate: int = 16000, frame_ms: int = 20, bitrate: int = 32000) -> list[bytes]:
    """Raw Opus packets (RFC 6716) of Int16 mono ``pcm``, one per ``frame_ms``: one WebSocket frame each."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate = 48000
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = bitrate
    codec.options = {"frame_duration": str(frame_ms)}
    codec.open()
    packets = []
    for frame in _frames(pcm, rate, frame_size=codec.frame_size):
        packets += [bytes(p) for p in codec.encode(frame)]
    packets += [bytes(p) for p in codec.encode(None)]
    return packets
