"""The same recording several times on one whisper stream, through the engine interface at full
speed: how many distinct transcripts the loops give (issue #16: five loops, five identical).

Each case is ``CLIP+GAP``: a committed clip (tests/fixtures/speech) followed by GAP seconds of
digital silence, looped; a loop that is not a whole number of 512-sample VAD windows meets the
windows at another offset each time. Prints a table (markdown) and each loop's transcript with
``-v``; the real-time check through a real relay is ``make bench-engines`` (determinism phase).

    .venv/bin/python -m bench.loops [--loops 5] [-v] [turns/conv_b.wav+1.0 long.wav+0.9 ...]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

DEFAULT_CASES = ["turns/conv_b.wav+1.0", "turns/conv_b.wav+0.77", "turns/conv_b.wav+1.31", "turns/conv_a.wav+1.0",
                 "turns/conv_a.wav+0.61", "long.wav+0.9"]
VAD_WINDOW = 512


async def run_case(engine, clip: str, gap_s: float, loops: int) -> tuple[list[list[str]], int]:
    """Each loop's finals, and a loop's length in samples."""
    from relay.engines.base import StreamOptions
    from tests.support.speech import check_turn_grammar, finals_per_loop, pcm, run_stream, silence

    audio = pcm(clip) + silence(gap_s)
    events = await run_stream(engine.open_stream(StreamOptions()), audio * loops)
    check_turn_grammar(events)
    return finals_per_loop(events, audio, loops), len(audio) // 2


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", default=DEFAULT_CASES, help="CLIP+GAP_SECONDS (default: %(default)s)")
    parser.add_argument("--loops", type=int, default=5)
    parser.add_argument("-v", "--verbose", action="store_true", help="print each loop's turns")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "transcription_site.settings")
    import django

    django.setup()
    from relay.engines.offline.whisper import WhisperEngine

    engine = WhisperEngine("bench-loops", {"max_streams": 2, "max_queue_wait_s": 600})
    engine.wait_loaded_sync(120)
    rows = []
    try:
        for i, case in enumerate(args.cases, 1):
            clip, _, gap = case.partition("+")
            gap_s = float(gap or 1.0)
            print(f"[{i}/{len(args.cases)}] {clip} + {gap_s} s, {args.loops} loops", file=sys.stderr, flush=True)
            per_loop, loop_samples = await run_case(engine, clip, gap_s, args.loops)
            rows.append((clip, gap_s, loop_samples % VAD_WINDOW, [len(t) for t in per_loop], len({tuple(t) for t in per_loop})))
            if args.verbose:
                for turns in per_loop:
                    print("   ", " | ".join(turns), file=sys.stderr)
    finally:
        engine.close()
    print("| clip | gap (s) | loop mod 512 samples | turns per loop | distinct transcripts |")
    print("|---|---|---|---|---|")
    for clip, gap_s, phase, turns, distinct in rows:
        print(f"| `{clip}` | {gap_s} | {phase} | {', '.join(map(str, turns))} | {distinct} |")


if __name__ == "__main__":
    asyncio.run(main())
