"""relay.flux.audio: G.711 without ``audioop``, sample alignment."""
from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest

from relay.flux import audio


def _audioop():
    """The standard library's codec while it exists (Python 3.11, 3.12): the reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")
        except ImportError:
            pytest.skip("audioop is gone (Python 3.13+); the cross-check needs it")


ALL_CODES = bytes(range(256))
ALL_SAMPLES = np.arange(-32768, 32768, dtype="<i2").tobytes()


@pytest.mark.parametrize("encoding,decode", [("mulaw", "ulaw2lin"), ("alaw", "alaw2lin")])
def test_g711_decoding_matches_audioop_for_every_code(encoding, decode):
    expected = getattr(_audioop(), decode)(ALL_CODES, 2)
    assert audio.to_int16(ALL_CODES, encoding).tobytes() == expected


@pytest.mark.parametrize("encoding,encode", [("mulaw", "lin2ulaw"), ("alaw", "lin2alaw")])
def test_g711_encoding_matches_audioop_for_every_sample(encoding, encode):
    expected = getattr(_audioop(), encode)(ALL_SAMPLES, 2)
    assert audio.from_int16(ALL_SAMPLES, encoding) == expected


@pytest.mark.parametrize(
    "encoding,code,sample",
    [("mulaw", 0xFF, 0), ("mulaw", 0x7F, 0), ("mulaw", 0x00, -32124), ("mulaw", 0x80, 32124),
     ("alaw", 0xD5, 8), ("alaw", 0x55, -8), ("alaw", 0xAA, 32256), ("alaw", 0x2A, -32256)],
)
def test_g711_reference_points(encoding, code, sample):
    assert audio.to_int16(bytes([code]), encoding).tolist() == [sample]


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_g711_round_trip_is_exact_on_codes_and_close_on_samples(encoding):
    decoded = audio.to_int16(ALL_CODES, encoding)
    # Every code decodes to a value that encodes back to a code with the same value.
    assert audio.to_int16(audio.from_int16(decoded, encoding), encoding).tolist() == decoded.tolist()
    # Any sample comes back within its segment's quantisation step (largest: 1024 for mu-law).
    samples = np.frombuffer(ALL_SAMPLES, dtype="<i2").astype(np.int32)
    back = audio.to_int16(audio.from_int16(ALL_SAMPLES, encoding), encoding).astype(np.int32)
    assert np.abs(back - samples).max() <= 1024
    assert np.all(np.sign(back[np.abs(samples) > 64]) == np.sign(samples[np.abs(samples) > 64]))


def test_linear16_passes_through_and_unknown_encodings_are_refused():
    pcm = np.array([0, 1, -1, 32767, -32768], dtype="<i2")
    assert audio.to_int16(pcm.tobytes(), "linear16").tolist() == pcm.tolist()
    assert audio.from_int16(pcm, "linear16") == pcm.tobytes()
    with pytest.raises(ValueError):
        audio.to_int16(b"\x00", "opus")
    with pytest.raises(ValueError):
        audio.from_int16(pcm, "opus")


def test_sample_aligner_carries_a_split_sample():
    aligner = audio.SampleAligner(2)
    assert aligner.push(b"\x01\x02\x03") == b"\x01\x02" and aligner.pending == 1
    assert aligner.push(b"\x04") == b"\x03\x04" and aligner.pending == 0
