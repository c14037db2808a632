"""tests.support.fidelity, the yardstick of the browser's audio-path test, catches what it must:
a dropped or repeated render block, a lost start, a filter that eats the top of the band."""
from __future__ import annotations

import numpy as np
import pytest
import soxr

from tests.support.fidelity import compare, first_difference
from tests.support.speech import pcm

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return np.frombuffer(pcm("s01.wav"), dtype="<i2").astype(np.float64) / 32768


def through(samples: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz -> ``rate`` -> 16 kHz with soxr, as a faithful capture path would."""
    return soxr.resample(soxr.resample(samples, 16000, rate, quality="VHQ"), rate, 16000, quality="VHQ")


def test_a_faithful_path_is_found_at_its_fractional_delay(speech):
    received = np.concatenate((np.zeros(1000), through(speech, 44100), np.zeros(500)))
    result = compare(received, speech)
    assert result.delay == pytest.approx(1000, abs=0.1)
    assert result.snr_db > 40 and result.slips == []
    # A fraction of a sample of delay (Chromium's resamplers add one) is measured, not a loss.
    late = np.concatenate((np.zeros(100), soxr.resample(np.concatenate((np.zeros(7), soxr.resample(speech, 16000, 48000))), 48000, 16000)))
    result = compare(late, speech)
    assert result.delay == pytest.approx(100 + 7 / 3, abs=0.1)
    assert result.snr_db > 35 and result.slips == []  # aligned to 1/16 sample: a little is left


def test_a_dropped_or_repeated_render_block_is_a_slip(speech):
    received = np.concatenate((np.zeros(1000), speech))
    block = round(128 * 16000 / 44100)  # one 128-frame quantum of a 44.1 kHz context, at 16 kHz
    dropped = np.delete(received, slice(20000, 20000 + block))
    repeated = np.insert(received, 30000, received[30000 - block : 30000])
    assert -block in compare(dropped, speech).slips
    assert block in compare(repeated, speech).slips
    assert compare(dropped, speech).snr_db < 10


def test_a_lost_start_shows_as_a_negative_delay(speech):
    result = compare(speech[480:], speech)  # the first 30 ms never arrived
    assert result.delay == pytest.approx(-480, abs=0.1)


def test_a_low_pass_in_the_speech_band_costs_snr(speech):
    # Cut everything above 4 kHz: fricatives go, and the figure says so.
    narrow = soxr.resample(soxr.resample(speech, 16000, 8000, quality="VHQ"), 8000, 16000, quality="VHQ")
    assert compare(narrow, speech).snr_db < 30


def test_first_difference_aligns_then_finds_the_first_changed_sample(speech):
    # The page's own part at 16 kHz: what the relay received against what the page's worklet was
    # given, starting a few render blocks apart, must be equal sample for sample.
    given = np.concatenate((np.zeros(300), speech))
    received = given[256:].copy()
    assert first_difference(received, given) == (-256, len(received), None)
    received[12345] += 1 / 32768  # one sample one step off
    assert first_difference(received, given) == (-256, len(received), 12345)
    received[12345] = given[12345 + 256]
    repeated = np.insert(received, 20000, received[20000 - 128 : 20000])  # one render block twice
    assert first_difference(repeated, given)[2] is not None  # whichever side it aligns on
    # Where the two end differently, only the samples both hold are compared.
    assert first_difference(given[:20000], given) == (0, 20000, None)
