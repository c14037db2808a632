"""The sans-I/O half of the relay's Flux client: what to send, what came back, what to resend.

Nothing here touches a socket, a clock or the event loop (python-websockets splits protocol from
I/O the same way), so every rule is unit-tested without a server:

* :func:`flux_query` (the client's options as query parameters), :func:`configure_message`, and
  the fixed client messages (:data:`KEEPALIVE`, :data:`CLOSE_STREAM`, :data:`FORCE_END_TURN`);
* :func:`parse_server_message` (upstream JSON -> :class:`ServerMessage`, or
  :class:`BadUpstreamMessage`) and :func:`shift` (a connection's times onto the stream's clock);
* :class:`TurnMapper`, the stream's own turn numbers across reconnects and a fallback.

:mod:`.replay` holds what is resent to a new connection; :mod:`relay.engines.upstream.stream`
carries all of it out over a WebSocket.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from relay.flux.constants import TURN_EVENTS

from relay.engines.base import StreamOptions, TurnEvent, Word

# Warning codes sent to the client (docs/upstream.md).
RECONNECTING = "UPSTREAM_RECONNECTING"
RECONNECTED = "UPSTREAM_RECONNECTED"
AUDIO_LOST = "UPSTREAM_AUDIO_LOST"
FALLBACK = "UPSTREAM_FALLBACK"

#: Upstream Error codes (and close codes) that mean "your credentials", so retrying cannot help.
AUTH_ERROR_CODES = frozenset({"UNAUTHORIZED", "FORBIDDEN", "INVALID_AUTH", "UPSTREAM_AUTH_FAILED"})
AUTH_CLOSE_CODES = frozenset({4001, 4003})

KEEPALIVE = json.dumps({"type": "KeepAlive"})
CLOSE_STREAM = json.dumps({"type": "CloseStream"})
FORCE_END_TURN = json.dumps({"type": "ForceEndTurn"})

#: Speech-loud audio this far past the upstream's last reported audio_window_end is "unanswered".
UNANSWERED_SLACK_SECONDS = 0.5
#: Audio kept before a turn's start when it is replayed, so the upstream hears the onset.
TURN_LEAD_SECONDS = 1.0


# --- what the relay sends ------------------------------------------------------------------------
def _number(value: float | int) -> str:
    return format(value, "g")


def flux_query(options: StreamOptions, *, include_model: bool = True) -> str:
    """The client's Flux parameters, passed through to the upstream."""
    pairs: list[tuple[str, str]] = []
    if include_model:
        pairs.append(("model", options.model))
    pairs += [("encoding", options.encoding), ("sample_rate", str(options.sample_rate))]
    for name in ("eot_threshold", "eager_eot_threshold", "eot_timeout_ms"):
        value = getattr(options, name)
        if value is not None:
            pairs.append((name, _number(value)))
    pairs += [("keyterm", term) for term in options.keyterms]
    if include_model:  # Flux takes hints only with model=flux-general-multi, which the relay checked
        pairs += [("language_hint", hint) for hint in options.language_hints]
    for name in ("tag", "mip_opt_out"):
        pairs += [(name, value) for value in options.extra.get(name, [])]
    return urlencode(pairs)


def with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    joined = f"{parts.query}&{query}" if parts.query and query else parts.query or query
    return urlunsplit(parts._replace(query=joined))


def loggable_url(url: str) -> str:
    """scheme://host/path: no credentials, no query (keyterms are the client's words)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def configure_message(
    thresholds: Mapping[str, Any] | None = None, keyterms: list[str] | None = None, language_hints: list[str] | None = None
) -> str:
    """A Flux ``Configure`` message; only what is given is changed upstream."""
    body: dict[str, Any] = {"type": "Configure"}
    if thresholds:
        body["thresholds"] = dict(thresholds)
    if keyterms is not None:
        body["keyterms"] = keyterms
    if language_hints is not None:
        body["language_hints"] = language_hints
    return json.dumps(body)


# --- what the upstream sends ---------------------------------------------------------------------
class BadUpstreamMessage(ValueError):
    """An upstream text frame that is not a Flux message we can use (logged and skipped)."""


@dataclass(slots=True)
class ServerMessage:
    type: str
    data: dict[str, Any]
    event: TurnEvent | None = None


def _finite(data: dict[str, Any], name: str, default: float | None = None) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadUpstreamMessage(f"{name} is not a number")
    return float(value)


def _words(raw: Any) -> list[Word]:
    if not isinstance(raw, list):
        raise BadUpstreamMessage("words is not a list")
    words = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("word"), str):
            raise BadUpstreamMessage("a word is malformed")
        start = _finite(item, "start") if item.get("start") is not None else None
        end = _finite(item, "end") if item.get("end") is not None else None
        words.append(Word(item["word"], _finite(item, "confidence", 0.0), start, end))
    return words


def parse_server_message(text: str) -> ServerMessage:
    """Parse one upstream text frame; raises BadUpstreamMessage for anything unusable."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise BadUpstreamMessage("not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise BadUpstreamMessage("not an object with a type")
    if data["type"] != "TurnInfo":
        return ServerMessage(data["type"], data)
    event = data.get("event")
    if event not in TURN_EVENTS:
        raise BadUpstreamMessage("unknown TurnInfo event")
    turn = data.get("turn_index")
    if isinstance(turn, bool) or not isinstance(turn, (int, float)) or turn < 0 or turn != int(turn):
        raise BadUpstreamMessage("turn_index is not a whole number")
    transcript = data.get("transcript", "")
    if not isinstance(transcript, str):
        raise BadUpstreamMessage("transcript is not a string")
    trigger = data.get("trigger")
    languages = data.get("languages")
    return ServerMessage(
        "TurnInfo",
        data,
        TurnEvent(
            event=event,
            turn=int(turn),
            transcript=transcript,
            words=_words(data.get("words", [])),
            audio_window_start=_finite(data, "audio_window_start"),
            audio_window_end=_finite(data, "audio_window_end"),
            end_of_turn_confidence=_finite(data, "end_of_turn_confidence", 0.0),
            trigger=trigger if isinstance(trigger, str) else None,
            languages=[x for x in languages if isinstance(x, str)] if isinstance(languages, list) else None,
        ),
    )


def shift(event: TurnEvent, seconds: float) -> TurnEvent:
    """The event with its times moved from a connection's clock to the stream's."""
    if not seconds:
        return event

    def at(t: float | None) -> float | None:
        return None if t is None else round(t + seconds, 3)

    return dataclasses.replace(
        event,
        audio_window_start=round(event.audio_window_start + seconds, 3),
        audio_window_end=round(event.audio_window_end + seconds, 3),
        words=[Word(w.word, w.confidence, at(w.start), at(w.end)) for w in event.words],
    )


# --- turn numbering -------------------------------------------------------------------------------
class TurnMapper:
    """Maps a source's turns (an upstream connection, a fallback stream) onto the stream's own.

    Every new source numbers its turns from 0 again. The stream's counter only grows, so the
    consumer's session-wide turn_index stays monotonic. When a source starts while a turn is open,
    its first turn continues that turn (the replayed audio holds it): the repeated StartOfTurn and
    Updates that only repeat words already shown are dropped, so the client sees the turn go on.
    """

    def __init__(self) -> None:
        self.turn = 0
        self.open = False
        self.last: TurnEvent | None = None
        self._source_turn: int | None = None
        self._resume = False
        self._catching_up = False
        self._shown = 0

    def new_source(self) -> None:
        self._source_turn = None
        self._resume = self.open
        self._catching_up = False

    def map(self, event: TurnEvent, *, skipped_trigger: str = "model") -> list[TurnEvent]:
        out: list[TurnEvent] = []
        if event.turn != self._source_turn:
            self._source_turn = event.turn
            if self.open and self._resume:
                self._catching_up = True
            elif self.open:  # the source moved on without an EndOfTurn we could read
                out += self.close(skipped_trigger)
            self._resume = False
        if self._catching_up:
            if event.event == "StartOfTurn" or (event.event == "Update" and len(event.words) <= self._shown):
                return out
            self._catching_up = False
        if not self.open:
            self.open = True
            self._shown = 0
        mapped = dataclasses.replace(event, turn=self.turn)
        out.append(mapped)
        self._shown = max(self._shown, len(mapped.words))
        if event.event == "EndOfTurn":
            self._end()
        else:
            self.last = mapped
        return out

    def close(self, trigger: str) -> list[TurnEvent]:
        """End the open turn with what was last said (upstream Flux sends no EndOfTurn on close)."""
        if not self.open:
            return []
        last = self.last or TurnEvent(event="Update", turn=self.turn)
        end = dataclasses.replace(last, event="EndOfTurn", turn=self.turn, trigger=trigger)
        self._end()
        return [end]

    def _end(self) -> None:
        self.open = False
        self.last = None
        self._shown = 0
        self._catching_up = False
        self.turn += 1
