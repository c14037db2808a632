"""The bare server: a ``websockets`` asyncio server that answers like the relay and does nothing else.

What the relay sends, in the same shapes and at the same moments, with no engine work, no
Django, no Channels, no channel layer and no database: ``Connected``, then per stream a
``StartOfTurn`` on the first audio of a turn, one ``Update`` per 250 ms of audio (one more word,
the whole turn so far, as the fake engine does with speech) and, on ``ForceEndTurn``, the
``EndOfTurn`` listing every word. Every audio frame counts as speech (the benchmark client sends
a tone) and nothing looks at the samples. Bodies are built by the relay's own protocol code
(:mod:`relay.flux.protocol`, each word's JSON once), so they are the same bytes.

Its CPU per frame is the floor: what receiving frames and sending these messages costs in one
asyncio process. The relay's "x bare" ratio against it is the relay's own overhead, the fake
engine included (``bench.baseline`` runs that engine too, so its ratio leaves the engine out).

    python -m bench.bare --port 8765
"""
from __future__ import annotations

import itertools
import uuid

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from bench.baseline import cli
from relay.engines.base import TurnEvent, Word
from relay.engines.fake import number_word
from relay.flux import protocol

UPDATE_SECONDS = 0.25  # the fake engine's update_interval_ms
WINDOW = 160  # the fake engine decides per 10 ms of 16 kHz audio
_turns = itertools.count()


class Stream:
    """One connection's turn state: samples seen, the open turn's words."""

    def __init__(self, connection_id: str, sample_rate: int, sample_width: int) -> None:
        self.connection_id = connection_id
        self.rate = sample_rate
        self.width = sample_width
        self.interval = int(sample_rate * UPDATE_SECONDS)
        self.window = max(1, sample_rate // 100)
        self.words_json = protocol.WordsJson()
        self.seq = 0
        self.samples = 0
        self.index: int | None = None  # the open turn's index
        self.turn_start = 0.0
        self.speech = 0  # samples of the open turn
        self.words: list[Word] = []

    def stamp(self, body: str) -> str:
        text = protocol.stamp(body, sequence_id=self.seq, request_id=self.connection_id)
        self.seq += 1
        return text

    def _body(self, event: str, end: float, **extra: object) -> str:
        words = list(self.words)
        item = TurnEvent(event=event, turn=0, transcript=" ".join(w.word for w in words), words=words,  # type: ignore[arg-type]
                         audio_window_start=round(self.turn_start, 3), audio_window_end=round(end, 3), **extra)  # type: ignore[arg-type]
        return self.stamp(protocol.turn_info_body(item, turn_index=self.index or 0, speaker=self.connection_id, words=self.words_json))

    def audio(self, nbytes: int) -> list[str]:
        n = nbytes // self.width
        out = []
        if self.index is None:
            self.index = next(_turns)
            self.turn_start = self.samples / self.rate
            self.speech = 0
            self.words = []
            out.append(self._body("StartOfTurn", self.turn_start + self.window / self.rate))
        start, self.samples, self.speech = self.speech, self.samples + n, self.speech + n
        crossing = (start // self.interval + 1) * self.interval
        while crossing <= self.speech:  # an Update where each 250 ms of the turn's audio is complete
            at = self.samples - (self.speech - crossing)
            at += -at % self.window
            self.words.append(Word(number_word(len(self.words) + 1), 0.99, round((at - self.interval) / self.rate, 3), round(at / self.rate, 3)))
            out.append(self._body("Update", at / self.rate, end_of_turn_confidence=0.05))
            crossing += self.interval
        return out

    def end_turn(self) -> list[str]:
        if self.index is None:
            return []
        body = self._body("EndOfTurn", self.samples / self.rate, end_of_turn_confidence=1.0, trigger="manual")
        self.index = None
        return [body]


async def handler(ws: ServerConnection) -> None:
    _, _, query = (ws.request.path if ws.request else "/").partition("?")
    try:
        params = protocol.parse_connect_params(query.encode())
    except Exception as exc:
        await ws.send(protocol.stamp(protocol.error_body("BAD_REQUEST", str(exc)), sequence_id=0, request_id=""))
        await ws.close(4000)
        return
    connection_id = str(uuid.uuid4())
    stream = Stream(connection_id, params.options.sample_rate, params.options.sample_width)
    await ws.send(stream.stamp(protocol.connected_body(session_id=params.session_id or str(uuid.uuid4()), resumed=False,
                                                        connection_id=connection_id, engine="fake")))
    try:
        async for message in ws:
            if isinstance(message, bytes):
                texts = stream.audio(len(message))
            else:
                kind = protocol.parse_client_text(message).type
                if kind == "CloseStream":
                    for text in stream.end_turn():
                        await ws.send(text)
                    break
                texts = stream.end_turn() if kind == "ForceEndTurn" else []
            for text in texts:
                await ws.send(text)
    except (ConnectionClosed, protocol.BadClientMessage):
        pass


if __name__ == "__main__":
    cli(handler, __doc__.splitlines()[0])
