"""The Flux v2 wire protocol, parsed and built with no I/O.

Inbound: the connection's query string (validated into :class:`ConnectParams`) and text frames
(:func:`parse_client_text`). Outbound: message bodies built once as JSON and stamped per
connection with ``sequence_id``/``request_id`` by :func:`stamp`, so one event fanned out to many
tabs is encoded once. docs/protocol.md describes every message and the relay's extensions.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from relay.flux.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, SUPPORTED_ENCODINGS
from relay.flux.constants import (
    RELAY_EVENTS,
    CLIENT_MESSAGE_TYPES,
    DEFAULT_EOT_THRESHOLD,
    DEFAULT_EOT_TIMEOUT_MS,
    FLUX_ENCODINGS,
    LANGUAGE_CODES,
    MAX_LANGUAGE_HINTS,
    MULTILINGUAL_MODEL,
    SESSION_ID_RE,
    THRESHOLDS,
)
from relay.engines.base import StreamOptions, TurnEvent, Word
from relay.exceptions import (
    ConfigureRejected,
    InvalidParameter,
    InvalidSession,
    RelayError,
    UnsupportedEncoding,
    UnsupportedSampleRate,
)

MAX_QUERY_STRING = 8192
MAX_KEYTERMS = 100
MAX_KEYTERM_LENGTH = 100
#: Every query parameter the relay reads, in the order docs/protocol.md lists them.
KNOWN_PARAMS = (
    "model",
    "encoding",
    "sample_rate",
    "eot_threshold",
    "eager_eot_threshold",
    "eot_timeout_ms",
    "keyterm",
    "language_hint",
    "language",
    "tag",
    "mip_opt_out",
    "session",
    "since",
    "token",
    "relay_events",
    "previous_connection",
    "share",
    "role",
)
#: ``role=``: what a connection announces it will do (docs/accounts.md).
CONNECT_ROLES = ("speaker", "viewer")
MAX_SHARE_LENGTH = 512


@dataclass(slots=True)
class Notice:
    """A Warning to send after Connected."""

    code: str
    description: str


@dataclass
class ConnectParams:
    session_id: str | None
    since: int | None
    options: StreamOptions
    notices: list[Notice] = field(default_factory=list)
    relay_events: frozenset[str] = frozenset()
    previous_connection: str | None = None
    share: str | None = None
    role: str | None = None


def validate_session_id(value: str) -> str:
    if not SESSION_ID_RE.fullmatch(value):
        raise InvalidSession()
    return value


def _number(name: str, raw: Any, *, exc: type[RelayError] = InvalidParameter) -> float | int:
    lo, hi, is_int = THRESHOLDS[name]
    if isinstance(raw, bool):
        raise exc(f"{name} must be a number between {lo:g} and {hi:g}.")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise exc(f"{name} must be a number between {lo:g} and {hi:g}.") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise exc(f"{name} must be between {lo:g} and {hi:g}; got {raw!r}.")
    if is_int:
        if value != int(value):
            raise exc(f"{name} must be a whole number of milliseconds.")
        return int(value)
    return value


def parse_connect_params(query_string: bytes | str) -> ConnectParams:
    """Validate the query string of a new connection.

    Raises a RelayError (sent as ``Error`` then close) for anything that makes the stream
    impossible; collects Notices for what is merely unknown.
    """
    if isinstance(query_string, bytes):
        if len(query_string) > MAX_QUERY_STRING:
            raise InvalidParameter(f"The query string is longer than {MAX_QUERY_STRING} bytes.")
        try:
            query_string = query_string.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameter("The query string is not valid UTF-8.") from None
    if len(query_string) > MAX_QUERY_STRING:
        raise InvalidParameter(f"The query string is longer than {MAX_QUERY_STRING} bytes.")
    try:
        pairs = parse_qsl(query_string, keep_blank_values=True, max_num_fields=256, strict_parsing=False)
    except ValueError as exc:
        raise InvalidParameter(f"The query string could not be parsed: {exc}.") from None

    values: dict[str, list[str]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)

    options = StreamOptions()
    notices: list[Notice] = []
    session_id: str | None = None
    since: int | None = None

    def single(name: str) -> str | None:
        items = values.get(name)
        if not items:
            return None
        if len(items) > 1:
            raise InvalidParameter(f"{name} may be given only once.")
        return items[0]

    if (raw := single("session")) is not None:
        session_id = validate_session_id(raw)
    if (raw := single("since")) is not None:
        if not re.fullmatch(r"-?\d{1,12}", raw):
            raise InvalidParameter("since must be a turn index (a whole number).")
        since = int(raw)
    if (raw := single("model")) is not None:
        if not raw or len(raw) > 64:
            raise InvalidParameter("model must be 1-64 characters.")
        options.model = raw
        options.explicit.add("model")
    if (raw := single("encoding")) is not None:
        encoding = raw.strip().lower()
        if encoding not in SUPPORTED_ENCODINGS:
            known = "a Flux encoding the relay does not decode" if encoding in FLUX_ENCODINGS else "not an encoding"
            raise UnsupportedEncoding(
                f"encoding {raw[:32]!r} is {known}; use one of {', '.join(SUPPORTED_ENCODINGS)}."
            )
        options.encoding = encoding
        options.explicit.add("encoding")
    if (raw := single("sample_rate")) is not None:
        if not re.fullmatch(r"\d{1,6}", raw) or not MIN_SAMPLE_RATE <= int(raw) <= MAX_SAMPLE_RATE:
            raise UnsupportedSampleRate(
                f"sample_rate {raw[:16]!r} is not supported; use a whole number of Hz from "
                f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} (16000 recommended)."
            )
        options.sample_rate = int(raw)
        options.explicit.add("sample_rate")
    for name in THRESHOLDS:
        if (raw := single(name)) is not None:
            setattr(options, name, _number(name, raw))
            options.explicit.add(name)
    _check_eager(options.eot_threshold, options.eager_eot_threshold, InvalidParameter)
    keyterms = values.get("keyterm", [])
    options.keyterms = validate_keyterms(keyterms, InvalidParameter)
    if keyterms:
        options.explicit.add("keyterms")
    # Flux's name is language_hint (repeatable); language=xx is the relay's alias for one hint.
    hints = values.get("language_hint", []) + values.get("language", [])
    options.language_hints = validate_language_hints(hints, options.model, InvalidParameter)
    if hints:
        options.explicit.add("language_hints")
    for name in values:
        if name not in KNOWN_PARAMS:
            notices.append(Notice("UNKNOWN_PARAMETER", f"Query parameter {name[:64]!r} is not recognised and was ignored."))
    options.extra = {k: v for k, v in values.items() if k in {"tag", "mip_opt_out"}}
    relay_events = parse_relay_events(values.get("relay_events", []), notices)
    previous = single("previous_connection")
    if previous is not None:
        try:
            previous = str(uuid.UUID(previous))
        except ValueError:
            raise InvalidParameter("previous_connection must be the connection_id a previous Connected gave.") from None
    share = single("share")
    if share is not None and not 0 < len(share) <= MAX_SHARE_LENGTH:
        raise InvalidParameter(f"share must be a share link's value (1-{MAX_SHARE_LENGTH} characters).")
    role = single("role")
    if role is not None and role not in CONNECT_ROLES:
        raise InvalidParameter(f"role must be one of {', '.join(CONNECT_ROLES)}; got {role[:32]!r}.")
    return ConnectParams(session_id=session_id, since=since, options=options, notices=notices, relay_events=relay_events,
                         previous_connection=previous, share=share or None, role=role)


def parse_relay_events(raw: list[str], notices: list[Notice]) -> frozenset[str]:
    """``relay_events=presence,history`` (comma-separated or repeated): the relay's extra messages."""
    wanted = {name.strip().lower() for item in raw for name in item.split(",") if name.strip()}
    for name in sorted(wanted - RELAY_EVENTS)[:8]:
        notices.append(Notice("UNKNOWN_RELAY_EVENT", f"relay_events {name[:32]!r} is not one of {', '.join(sorted(RELAY_EVENTS))}; it was ignored."))
    return frozenset(wanted & RELAY_EVENTS)


def _check_eager(eot: float | None, eager: float | None, exc: type[RelayError]) -> None:
    if eager is not None and eager > (eot if eot is not None else DEFAULT_EOT_THRESHOLD):
        raise exc("eager_eot_threshold must not be greater than eot_threshold.")


def validate_keyterms(terms: Any, exc: type[RelayError]) -> list[str]:
    if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
        raise exc("keyterms must be a list of strings.")
    if len(terms) > MAX_KEYTERMS:
        raise exc(f"At most {MAX_KEYTERMS} keyterms are allowed.")
    cleaned = []
    for term in terms:
        term = term.strip()
        if not term or len(term) > MAX_KEYTERM_LENGTH:
            raise exc(f"Each keyterm must be 1-{MAX_KEYTERM_LENGTH} characters.")
        cleaned.append(term)
    return cleaned


def validate_language_hints(hints: Any, model: str, exc: type[RelayError]) -> list[str]:
    """Language codes (Whisper's, with an optional locale subtag), only for the multilingual model.

    Flux answers a hint for any other model with a 400, so the relay refuses it too.
    """
    if not isinstance(hints, list) or not all(isinstance(h, str) for h in hints):
        raise exc("language_hints must be a list of language codes.")
    if hints and model != MULTILINGUAL_MODEL:
        raise exc(f"Language hints need model={MULTILINGUAL_MODEL}; model {model[:64]!r} transcribes one language.")
    if len(hints) > MAX_LANGUAGE_HINTS:
        raise exc(f"At most {MAX_LANGUAGE_HINTS} language hints are allowed.")
    cleaned: list[str] = []
    for hint in hints:
        hint = hint.strip()
        if not re.fullmatch(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})?", hint) or hint.split("-")[0].lower() not in LANGUAGE_CODES:
            raise exc(f"Language {hint[:16]!r} is not a language code (such as en, de, es or pt-BR).")
        if hint not in cleaned:
            cleaned.append(hint)
    return cleaned


# --- client text frames --------------------------------------------------------------------------
@dataclass(slots=True)
class ClientMessage:
    type: str
    data: dict[str, Any]


class BadClientMessage(Exception):
    """A text frame that is not a known message; answered with a Warning, never fatal."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


def parse_client_text(text: str) -> ClientMessage:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise BadClientMessage("INVALID_JSON", "Text frames must be JSON control messages.") from None
    if not isinstance(data, dict):
        raise BadClientMessage("INVALID_MESSAGE", "Control messages must be JSON objects with a type.")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in CLIENT_MESSAGE_TYPES:
        shown = kind[:40] if isinstance(kind, str) else kind
        raise BadClientMessage("UNKNOWN_MESSAGE_TYPE", f"Unknown message type {shown!r}; it was ignored.")
    if kind == "Finalize":  # the v1 name; treat it as ending the turn now
        kind = "ForceEndTurn"
    return ClientMessage(kind, data)


def parse_configure(data: dict[str, Any], current: StreamOptions) -> tuple[dict[str, Any], list[str] | None]:
    """Validate a Configure message against the stream's current options (language hints aside)."""
    thresholds, keyterms, _ = parse_configure_request(data, current)
    return thresholds, keyterms


def parse_configure_request(
    data: dict[str, Any], current: StreamOptions
) -> tuple[dict[str, Any], list[str] | None, list[str] | None]:
    """Validate a Configure message: (thresholds, keyterms or None, language_hints or None).

    ``language_hints`` is Flux's Configure field for the multilingual model; ``[]`` clears the
    hints (detection again).
    """
    thresholds_raw = data.get("thresholds", {})
    if thresholds_raw is None:
        thresholds_raw = {}
    if not isinstance(thresholds_raw, dict):
        raise ConfigureRejected("thresholds must be an object.")
    unknown = set(thresholds_raw) - set(THRESHOLDS)
    if unknown:
        raise ConfigureRejected(f"Unknown threshold {sorted(unknown)[0][:40]!r}.")
    thresholds = {name: _number(name, value, exc=ConfigureRejected) for name, value in thresholds_raw.items()}
    eot = thresholds.get("eot_threshold", current.eot_threshold)
    eager = thresholds.get("eager_eot_threshold", current.eager_eot_threshold)
    _check_eager(eot, eager, ConfigureRejected)
    keyterms = None
    if "keyterms" in data:
        keyterms = validate_keyterms(data["keyterms"], ConfigureRejected)
    language_hints = None
    if "language_hints" in data:
        language_hints = validate_language_hints(data["language_hints"], current.model, ConfigureRejected)
    if not thresholds and keyterms is None and language_hints is None:
        raise ConfigureRejected("Configure needs thresholds, keyterms or language_hints.")
    return thresholds, keyterms, language_hints


# --- server messages -----------------------------------------------------------------------------
def dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def stamp(body_json: str, *, sequence_id: int, request_id: str) -> str:
    """Add the per-connection fields to a pre-encoded body (``{"type":...}``)."""
    return f'{{"sequence_id":{sequence_id},"request_id":"{request_id}",{body_json[1:]}'


def connected_body(*, session_id: str, resumed: bool, connection_id: str, engine: str, role: str = "", speaker_name: str = "") -> str:
    """``role`` and ``speaker_name`` (relay extensions): how this connection is served and labelled."""
    body = {"type": "Connected", "session_id": session_id, "resumed": resumed, "connection_id": connection_id, "engine": engine}
    if role:
        body["role"] = role
    if speaker_name:
        body["speaker_name"] = speaker_name
    return dumps(body)


class WordsJson:
    """A turn's ``words`` as JSON, each word encoded once.

    An engine's Updates repeat the turn so far, so a stream encoding every Update's whole list
    would encode its words quadratically often. One of these per stream keeps the words it
    encoded and their JSON; a list that starts with them (compared by value, the same objects
    being the cheap case) only encodes what is new. A Word is a value: engines never change one
    after emitting it.
    """

    __slots__ = ("words", "parts")

    def __init__(self) -> None:
        self.words: list[Word] = []
        self.parts: list[str] = []

    def encode(self, words: list[Word]) -> str:
        known = len(self.words)
        if words[:known] != self.words:  # a new turn, or a revised word: start over
            self.words, self.parts, known = [], [], 0
        for word in words[known:]:
            self.words.append(word)
            self.parts.append(dumps(word.as_dict()))
        return "[" + ",".join(self.parts) + "]"


def turn_info_body(
    event: TurnEvent, *, turn_index: int, speaker: str, replayed: bool = False, created_at: datetime | None = None, speaker_name: str = "",
    words: WordsJson | None = None,
) -> str:
    """``words``: the stream's :class:`WordsJson`, so a growing turn's words are encoded once."""
    body: dict[str, Any] = {
        "type": "TurnInfo",
        "event": event.event,
        "turn_index": turn_index,
        "audio_window_start": event.audio_window_start,
        "audio_window_end": event.audio_window_end,
        "transcript": event.transcript,
        "words": [] if words is not None else [w.as_dict() for w in event.words],
        "end_of_turn_confidence": round(event.end_of_turn_confidence, 4),
    }
    if event.event == "EndOfTurn":
        body["trigger"] = event.trigger or "model"
    if event.languages:
        body["languages"] = event.languages
    body["speaker"] = speaker
    if speaker_name:
        body["speaker_name"] = speaker_name
    if replayed:
        body["replayed"] = True
    if created_at is not None:
        body["created_at"] = created_at.isoformat().replace("+00:00", "Z")
    if words is not None and event.words:
        # The first '"words":[]' is the key's: a string value before it has its quotes escaped.
        return dumps(body).replace('"words":[]', '"words":' + words.encode(event.words), 1)
    return dumps(body)


def turn_info_from_record(record: dict[str, Any]) -> str:
    """A persisted turn (a record from relay.store.turns.turn_record) as a replayed EndOfTurn.

    Built by :func:`turn_info_body` from the turn's event, so replay and live bodies agree.
    """
    return turn_info_body(
        record["event"], turn_index=record["index"], speaker=record["speaker"], replayed=True, created_at=record.get("created_at"),
        speaker_name=record.get("speaker_name") or "",
    )


def history_body(*, turns: int, last_turn_index: int | None, since: int | None) -> str:
    """Relay extension: the replay of finished turns is complete; live events follow."""
    return dumps({"type": "History", "turns": turns, "last_turn_index": last_turn_index, "since": since})


def warning_body(code: str, description: str) -> str:
    return dumps({"type": "Warning", "code": code, "description": description})


def error_body(code: str, description: str) -> str:
    return dumps({"type": "Error", "code": code, "description": description})


def configure_success_body(options: StreamOptions) -> str:
    thresholds = {
        "eot_threshold": options.eot_threshold if options.eot_threshold is not None else DEFAULT_EOT_THRESHOLD,
        "eot_timeout_ms": options.eot_timeout_ms if options.eot_timeout_ms is not None else DEFAULT_EOT_TIMEOUT_MS,
    }
    if options.eager_eot_threshold is not None:
        thresholds["eager_eot_threshold"] = options.eager_eot_threshold
    body: dict[str, Any] = {"type": "ConfigureSuccess", "thresholds": thresholds, "keyterms": list(options.keyterms)}
    if options.model == MULTILINGUAL_MODEL:
        body["language_hints"] = list(options.language_hints)
    return dumps(body)


def configure_failure_body(code: str, description: str) -> str:
    return dumps({"type": "ConfigureFailure", "code": code, "description": description})


def presence_body(*, event: str, connection_id: str, connections: int, session_id: str) -> str:
    return dumps(
        {"type": "Presence", "event": event, "connection_id": connection_id, "connections": connections, "session_id": session_id}
    )
