"""How faithfully a received recording matches the audio that was played into the microphone.

The browser tests play a clip as Chromium's fake microphone and record what the relay receives
(tests.support.engines.RecordingEngine). A faithful path delivers the clip itself, delayed and
resampled: this module finds that delay to a fraction of a sample (cross-correlation, refined on
a finer grid), then measures the signal-to-noise ratio of the received audio against the
reference shifted by it, and the delay of every voiced stretch on its own, which moves when a
block of audio was dropped or repeated on the way.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

#: Local delays are measured over windows of this many samples (128 ms at 16 kHz)...
WINDOW = 2048
#: ...that hold at least this share of the clip's mean energy (silence has no delay to measure).
VOICED = 0.25
#: How far (samples) a window is looked for around where the overall delay puts it: more than
#: one 128-frame render quantum at any capture rate.
REACH = 200
#: Fraction of a sample the delay is resolved to.
UPSAMPLE = 16


@dataclass(frozen=True)
class Fidelity:
    delay: float  # where the clip's first sample sits in the received audio, in samples (< 0: lost)
    snr_db: float  # received vs the reference shifted by ``delay``, over the clip's extent
    local_offsets: list[float]  # per voiced window: where it arrived relative to ``delay`` (samples)
    local_snr_db: list[float]  # each voiced window against the reference shifted by ``delay``
    gain: float  # least-squares gain of the received audio against the reference

    @property
    def slips(self) -> list[float]:
        """Where the arrival offset changes from one voiced window to the next, by how much:
        audio dropped (< 0) or repeated (> 0) between those windows, in samples."""
        offsets = self.local_offsets
        return [b - a for a, b in zip(offsets, offsets[1:]) if b != a]


def to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0


def _xcorr_fft(a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    # c[k] = sum_i a[i + k] * b[i] for k = -(len(b) - 1) .. len(a) - 1
    spec = np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size))
    c = np.fft.irfft(spec, size)
    return np.concatenate((c[size - (len(b) - 1):], c[: len(a)]))


def whole_delay(received: np.ndarray, reference: np.ndarray) -> int:
    """Delay (whole samples) at which ``reference`` best matches inside ``received``: the peak of
    their cross-correlation (negative: ``reference`` starts before ``received``)."""
    corr = _xcorr_fft(received, reference, 1 << (len(received) + len(reference)).bit_length())
    return int(np.argmax(corr)) - (len(reference) - 1)


def first_difference(received: np.ndarray, expected: np.ndarray) -> tuple[int, int, int | None]:
    """Align ``expected`` inside ``received`` (whole samples) and compare them sample for sample
    where both have audio: (delay, samples compared, index in ``received`` of the first sample
    that differs, or None when none does)."""
    delay = whole_delay(received, expected)
    lo, hi = max(0, delay), min(len(received), delay + len(expected))
    differ = np.nonzero(received[lo:hi] != expected[lo - delay : hi - delay])[0]
    return delay, max(0, hi - lo), (lo + int(differ[0])) if differ.size else None


def best_delay(received: np.ndarray, reference: np.ndarray) -> float:
    """Delay (samples, fractional) at which ``reference`` best matches inside ``received``.

    Coarse by integer cross-correlation, then refined on a grid of 1/UPSAMPLE sample by
    upsampling both with soxr around the coarse peak.
    """
    coarse = whole_delay(received, reference)
    # Refine: upsample a stretch of received around the coarse match and the reference.
    up_ref = soxr.resample(reference, 1, UPSAMPLE, quality="VHQ")
    pad = 4
    lo = max(0, coarse - pad)
    stretch = received[lo : coarse + len(reference) + pad]
    up_rec = soxr.resample(stretch, 1, UPSAMPLE, quality="VHQ")
    fine = _xcorr_fft(up_rec, up_ref, 1 << (len(up_rec) + len(up_ref)).bit_length())
    fine_lags = np.arange(-(len(up_ref) - 1), len(up_rec))
    window = np.abs(fine_lags - (coarse - lo) * UPSAMPLE) <= 2 * pad * UPSAMPLE
    peak = int(fine_lags[window][int(np.argmax(fine[window]))])
    return lo + peak / UPSAMPLE


def shifted(reference: np.ndarray, delay: float, length: int) -> np.ndarray:
    """``reference`` placed at ``delay`` (fractional) in a signal of ``length`` samples (band-limited shift)."""
    whole = int(np.floor(delay))
    frac = delay - whole
    n = len(reference) + 64
    size = 1 << (n - 1).bit_length()
    spec = np.fft.rfft(reference, size) * np.exp(-2j * np.pi * np.fft.rfftfreq(size) * frac)
    moved = np.fft.irfft(spec, size)[: len(reference) + 32]
    out = np.zeros(length)
    lo, hi = max(0, whole), min(length, whole + len(moved))
    if hi > lo:
        out[lo:hi] = moved[lo - whole : hi - whole]
    return out


def compare(received: np.ndarray, reference: np.ndarray) -> Fidelity:
    """Align ``reference`` (the clip, resampled to the received rate) inside ``received`` and measure."""
    delay = best_delay(received, reference)
    aligned = shifted(reference, delay, len(received))
    lo = max(0, int(np.floor(delay)))
    hi = min(len(received), int(np.ceil(delay)) + len(reference))
    rec, ref = received[lo:hi], aligned[lo:hi]
    noise = rec - ref
    snr = 10 * np.log10(np.sum(ref**2) / max(np.sum(noise**2), 1e-20))
    gain = float(np.dot(rec, ref) / np.dot(ref, ref))
    # Each voiced window of the reference, as placed by the overall delay, looked for again
    # within REACH samples: the offset with the least residual is where that stretch arrived.
    energy = np.mean(reference**2)
    base = int(np.floor(delay))
    local, local_snr = [], []
    for start in range(0, len(reference) - WINDOW, WINDOW // 2):
        if np.mean(reference[start : start + WINDOW] ** 2) < VOICED * energy:
            continue
        at = base + start
        if at - REACH < 0 or at + WINDOW + REACH > len(received):
            continue
        piece = aligned[at : at + WINDOW]
        candidates = np.lib.stride_tricks.sliding_window_view(received[at - REACH : at + WINDOW + REACH], WINDOW)
        residual = np.sum((candidates - piece) ** 2, axis=1)
        local.append(float(int(np.argmin(residual)) - REACH))
        local_snr.append(float(10 * np.log10(np.sum(piece**2) / max(residual[REACH], 1e-20))))
    return Fidelity(delay=delay, snr_db=float(snr), local_offsets=local, local_snr_db=local_snr, gain=gain)
