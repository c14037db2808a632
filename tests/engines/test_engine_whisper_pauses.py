"""Whether a pause ends the whisper engine's turn depends on the audio, not on where the VAD's
32 ms windows fall (issue #16: one connection streaming a recording five times gives five
identical transcripts).

The decoder is swapped for one that reads every final as a finished sentence, so every pause's
hangover is ``eot_complete_ms`` (300 ms); the Silero VAD and the turn machine are the real ones.
Two utterances in two flite voices (rms, awb), the pause between them swept across the
hangover, each streamed at several offsets against the windows: every offset must split (or
not) alike.
"""
from __future__ import annotations

import numpy as np
import pytest

from relay.engines.base import StreamOptions, Word
from relay.engines.offline.whisper import WhisperEngine
from relay.engines.offline.whisper.runner import RATE, Decoded
from relay.engines.offline.whisper.stream import speech_span
from tests.support.speech import check_turn_grammar, finals, pcm, run_stream, silence

pytestmark = pytest.mark.slow

OFFSETS_MS = [0, 5, 11, 17, 23, 29]
PAUSES_MS = range(180, 350, 10)  # of digital silence between the two clips, trimmed to their speech
TRIM_MS = 20  # of each clip's own quiet kept next to the pause


@pytest.fixture(scope="module")
def engine():
    engine = WhisperEngine("whisper-pause-test", {"max_streams": 6, "max_queue_wait_s": 600})
    engine.wait_loaded_sync(120)
    runner = engine.runner

    def finished(piece: np.ndarray, final: bool, hotwords: str | None, *language: str | None, abandoned=None) -> Decoded:
        seconds = piece.size / RATE
        return Decoded("Done.", [Word("Done.", 0.9, 0.0, seconds)], 0.9, seconds, None, 1.0 if final else None)

    real, runner.decode = runner.decode, finished
    yield engine
    runner.decode = real
    engine.close()


def _speech(name: str) -> tuple[bytes, bytes]:
    """The clip up to TRIM_MS after its speech ends, and from TRIM_MS before its speech starts."""
    samples = np.frombuffer(pcm(name), dtype=np.int16)
    span = speech_span(samples.astype(np.float32) / 32768, final=True)
    assert span.speech_end is not None
    keep = TRIM_MS * RATE // 1000
    return samples[: span.speech_end + keep].tobytes(), samples[max(0, span.onset - keep) :].tobytes()


async def test_a_pause_near_the_hangover_ends_the_turn_or_not_whatever_the_windows(engine):
    first, _ = _speech("turns/short09_rms.wav")  # "Thank you."
    _, second = _speech("turns/short10_awb.wav")  # "Good morning."
    splits: dict[int, list[int]] = {}
    for pause_ms in PAUSES_MS:
        counts = []
        for offset_ms in OFFSETS_MS:
            audio = silence(0.5 + offset_ms / 1000) + first + silence(pause_ms / 1000) + second + silence(1.0)
            events = await run_stream(engine.open_stream(StreamOptions()), audio)
            check_turn_grammar(events)
            counts.append(len(finals(events)))
        splits[pause_ms] = counts
    print("turns at each offset, by pause:", splits)
    for pause_ms, counts in splits.items():
        assert len(set(counts)) == 1, (pause_ms, splits)
    turns = [counts[0] for counts in splits.values()]
    # The sweep crosses the hangover: short pauses keep one turn, long ones make two, never back.
    assert turns[0] == 1 and turns[-1] == 2 and turns == sorted(turns), splits
