"""A stream's TurnInfo bodies are the same byte for byte whether its words are encoded once
(relay.flux.protocol.WordsJson) or the whole list on every event."""
from __future__ import annotations

import json

from relay.engines.base import TurnEvent, Word
from relay.flux import protocol


def turn(words: list[Word], event: str = "Update", transcript: str | None = None) -> TurnEvent:
    return TurnEvent(event=event, turn=0, transcript=" ".join(w.word for w in words) if transcript is None else transcript,
                     words=list(words), audio_window_end=0.25 * len(words), end_of_turn_confidence=0.05, trigger="manual" if event == "EndOfTurn" else None)


def test_bodies_match_the_plain_encoding_through_growth_revision_and_a_new_turn():
    cache = protocol.WordsJson()
    growing: list[Word] = []
    events = []
    for i in range(6):
        growing.append(Word(f"w{i}", 0.9, i * 0.25, (i + 1) * 0.25))  # the same objects again, as engines repeat them
        events.append(turn(growing))
    revised = [Word(w.word, w.confidence, w.start, w.end) for w in growing[:3]] + [Word("changed", 0.5, 0.75, 1.0)]
    events += [turn(revised), turn(revised, "EndOfTurn"), turn([]), turn([Word("next", 0.8, 0.0, 0.25)])]
    events.append(turn([Word('he said "words":[] twice', 0.7, 0.0, 0.5)], transcript='"words":[] "words":[]'))
    for event in events:
        plain = protocol.turn_info_body(event, turn_index=3, speaker="c")
        assert protocol.turn_info_body(event, turn_index=3, speaker="c", words=cache) == plain
        assert json.loads(plain)["words"] == [w.as_dict() for w in event.words]
    assert cache.words == events[-1].words  # only the last list is kept
