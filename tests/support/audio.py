"""Synthetic audio for tests: tone bursts (speech to the fake engine) and silence."""
from __future__ import annotations

import io
import wave

import numpy as np

RATE = 16000


def tone(seconds: float, *, rate: int = RATE, freq: float = 440.0, amplitude: int = 8000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * freq * t) * amplitude).astype("<i2").tobytes()


def silence(seconds: float, *, rate: int = RATE) -> bytes:
    return bytes(2 * int(seconds * rate))


def chunks(data: bytes, size: int = 2560) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def wav_bytes(pcm: bytes, *, rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()
