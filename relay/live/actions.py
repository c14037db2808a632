"""What the stream core asks the consumer to do: one small immutable class per kind of action.

:class:`relay.live.session.StreamSession` returns lists of these; the consumer performs each
(``SendClient`` -> ``_send_client``, ``StoreTurn`` -> ``_store_turn``, ...) and answers the ones
that have a result by calling the method each names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.engines.base import TurnEvent
from relay.exceptions import RelayError


@dataclass(frozen=True, slots=True)
class SendClient:
    """Send this (already stamped) text frame to the client."""

    text: str


@dataclass(frozen=True, slots=True)
class SendGroup:
    """Send this channel-layer message to the session's group (other tabs, any process)."""

    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FeedAudio:
    """Give these whole samples to the engine stream."""

    pcm: bytes


@dataclass(frozen=True, slots=True)
class AllocateTurnIndex:
    """Reserve the session's next turn index; answer with :meth:`StreamSession.turn_index_allocated`."""


@dataclass(frozen=True, slots=True)
class StoreTurn:
    """Store the finished turn; answer with :meth:`StreamSession.turn_stored` (live peers after commit).

    ``timed``: an open stream waits on this write (admission measures it); a closing stream's
    flush does not.
    """

    index: int
    event: TurnEvent
    timed: bool


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Call :meth:`StreamSession.timer_fired` with ``name`` after ``delay`` seconds."""

    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class CountPresence:
    """Count the session's live connections; answer with :meth:`StreamSession.presence_counted`."""

    event: str
    connection_id: str


@dataclass(frozen=True, slots=True)
class ForceEndTurn:
    """Ask the engine to end the current turn now."""


@dataclass(frozen=True, slots=True)
class Configure:
    """Apply validated thresholds/keyterms/language hints; answer with ``configured`` or ``configure_rejected``."""

    thresholds: dict[str, Any]
    keyterms: list[str] | None
    language_hints: list[str] | None = None


@dataclass(frozen=True, slots=True)
class CloseStream:
    """The client asked to end: flush the engine (its last turn is stored and sent), close 1000."""


@dataclass(frozen=True, slots=True)
class Fail:
    """End the stream with this error: flush and store, send ``Error``, close with its code."""

    error: RelayError


@dataclass(frozen=True, slots=True)
class ReadTurns:
    """Read the finished turns with ``after < index < before`` (no bound: None); answer with
    :meth:`StreamSession.turns_read`. ``then``: a live final held back until they are sent."""

    after: int
    before: int | None
    then: str | None = None
    then_index: int | None = None


@dataclass(frozen=True, slots=True)
class JoinGroup:
    """Join the session's group again (it failed while the channel layer was down); answer with
    :meth:`StreamSession.rejoined`."""


Action = SendClient | SendGroup | FeedAudio | AllocateTurnIndex | StoreTurn | StartTimer | CountPresence | ForceEndTurn | Configure | CloseStream | Fail | ReadTurns | JoinGroup
NOTHING: tuple[Action, ...] = ()
