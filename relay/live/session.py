"""The state of one connection's stream, with no I/O: events in, actions out.

:class:`StreamSession` decides everything the relay promises about one connection (sequence ids,
session-wide turn indexes for the engine's turns, what is stored before it is sent, which events
reach the session's other tabs and when, replay dedupe, what an error or a hang-up does) and
carries out none of it. Each method takes one event (a client frame, an engine event, a
channel-layer message, the result of a store call, a timer) and returns the actions it implies,
in the order they must happen. :mod:`relay.live.consumer` performs them and feeds results back;
unit tests drive this class directly with no server, database, channel layer or event loop.

The ordering rules, each kept here:

* ``Connected`` is the first message; every message is stamped with the next ``sequence_id``.
* An engine turn gets its session-wide index (:class:`AllocateTurnIndex`) before its first event
  is sent, and one index for all its events.
* ``EndOfTurn`` is stored (:class:`StoreTurn`) before anyone hears of it, the speaker included:
  it is the client's receipt, and replay relies on it. The store reports how many other live
  connections the session has *after* the commit; a joiner counted there gets the turn live,
  one that committed later reads it from history. So the turn goes to the group when this
  connection knew of peers or the store counted some.
* Other tabs get at most one interim ``Update`` per ``listener_update_seconds`` of audio. A held
  Update is replaced by newer ones, dropped by the turn's next non-Update event, and otherwise
  released by a timer, so a listener never stays behind a paused speaker.
* A finished turn is sent to a tab once: a live final it already got by replay is dropped. A
  tab that sees a finished turn skip an index it never heard of reads the skipped ones from the
  store (:class:`ReadTurns`) and sends them, marked ``replayed``, before that turn (another tab's)
  or right after it (its own, which is the speaker's receipt and never waits); after a channel
  layer outage it reads everything it may have missed (:meth:`StreamSession.layer_up`).
* Other tabs are the connections the store reports live after each finished turn, plus those that
  announced themselves since: a tab of a process that died stops counting once its process stops
  heartbeating, instead of for the rest of the stream.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.engines.base import EngineWarning, StreamOptions, TurnEvent
from relay.exceptions import BacklogExceeded, ConfigureRejected, Forbidden, FrameTooLarge, RateLimited, RelayError
from relay.flux import protocol
from relay.flux.audio import SampleAligner
from relay.live.actions import (
    NOTHING,
    Action,
    AllocateTurnIndex,
    CloseStream,
    Configure,
    CountPresence,
    Fail,
    FeedAudio,
    ForceEndTurn,
    JoinGroup,
    ReadTurns,
    SendClient,
    SendGroup,
    StartTimer,
    StoreTurn,
)
from relay.live.ledger import TurnLedger
from relay.live.limits import SlidingWindowLimiter

LISTENER_UPDATE = "listener_update"
"""The one timer a stream uses: release the Update held back from other tabs."""


@dataclass(frozen=True, slots=True)
class Finished:
    """A turn this connection stored, for the caller's log and metrics."""

    index: int
    event: TurnEvent


class StreamSession:
    """One connection's stream: Flux in from the client and the engine, Flux out to the session."""

    def __init__(
        self,
        *,
        options: StreamOptions,
        max_frame_bytes: int,
        max_backlog_seconds: float,
        listener_update_seconds: float,
        configures_per_minute: int,
        channel_name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_backlog_seconds = max_backlog_seconds
        self.use_options(options)
        self.listener_update_seconds = listener_update_seconds
        self.channel_name = channel_name
        self.clock = clock
        self._configures = SlidingWindowLimiter(configures_per_minute, 60.0, clock=clock)

        self.session_id = ""
        self.connection_id = ""
        self.speaker_name = ""  # the label this connection's turns carry (relay.store.access.display_name, or "Guest N")
        self.role = "speaker"  # owner, speaker or viewer (relay.store.access); set by opened()
        self.may_speak = True  # the one check per audio frame: False for a viewer
        self._refused: set[str] = set()  # what a viewer was already told it may not do ("audio", "control")
        self.sequence_id = 0
        self.peers: set[str] = set()  # other live connections of the session
        self.ledger = TurnLedger()  # finished turns this tab was sent
        self._words_json = protocol.WordsJson()  # the open turn's words, each encoded once
        self.sharing = False  # in the session's channel-layer group
        self.layer_outage = False  # the process's channel layer is down (told to the client once)
        self.streaming = False  # audio and control frames are taken (after Connected, until the end)
        self.closing = False  # an end (error, CloseStream) is under way
        self.client_gone = False
        self.flushing = False  # the engine is being flushed: the stream's last events are coming
        self.close_code: int | None = None
        self.close_reason = ""
        self.engine_error: RelayError | None = None

        self._engine_turn: int | None = None
        self._turn_index: int | None = None
        self._waiting: TurnEvent | None = None  # an event waiting for its turn index
        self._final: tuple[str, int, bool, TurnEvent] | None = None  # an EndOfTurn waiting for its store
        self._listener_update_at = float("-inf")
        self._held: tuple[str, int, float] | None = None
        self._peers_at_store: frozenset[str] = frozenset()
        self._timer_pending = False

        self.audio_bytes = 0
        self.last_frame: float | None = None  # clock time of the last frame received
        self.messages_received = 0
        self.messages_sent = 0
        self.errors = 0
        self.last_error_code = ""

    @classmethod
    def from_settings(cls, settings: Any, *, channel_name: str = "") -> StreamSession:
        """A session with the limits a deployment configured (``RELAY_*`` settings)."""
        return cls(
            options=StreamOptions(),
            max_frame_bytes=settings.RELAY_MAX_FRAME_BYTES,
            max_backlog_seconds=settings.RELAY_MAX_BACKLOG_SECONDS,
            listener_update_seconds=settings.RELAY_LISTENER_UPDATE_SECONDS,
            configures_per_minute=settings.RELAY_CONFIGURES_PER_MINUTE,
            channel_name=channel_name,
        )

    # -- connecting ----------------------------------------------------------------------------
    def use_options(self, options: StreamOptions, relay_events: frozenset[str] = frozenset()) -> None:
        """The stream's options and the relay extensions it asked for, from the query string."""
        self.options = options
        self.relay_events = relay_events
        self._aligner = SampleAligner(options.sample_width)
        self.bytes_per_second = options.bytes_per_second
        # A frame is also too large when its audio alone is more than the backlog allows (1 MiB is
        # 32.8 s at 16 kHz Int16, past the default 30 s): it could never be accepted.
        self._audio_frame_limit = min(self.max_frame_bytes, int(self.max_backlog_seconds * self.bytes_per_second) or self.max_frame_bytes)

    def opened(
        self, *, session_id: str, connection_id: str, others: list[str], resumed: bool, engine: str, since: int | None = None,
        role: str = "speaker", speaker_name: str = "",
    ) -> list[Action]:
        """The connection row is committed: say ``Connected`` (always the first message).

        ``since``: the client already has every finished turn up to it. ``role``: as
        :func:`relay.store.access.connection_role` decided; a ``viewer`` never feeds the engine.
        """
        self.session_id = session_id
        self.connection_id = connection_id
        self.role = role
        self.may_speak = role != "viewer"
        self.speaker_name = speaker_name
        self.peers = set(others)
        self.ledger = TurnLedger(since if since is not None else -1)
        return self._send([], protocol.connected_body(session_id=session_id, resumed=resumed, connection_id=connection_id, engine=engine,
                                                      role=role, speaker_name=speaker_name))

    def joined(self, *, sharing: bool) -> list[Action]:
        """The group join was attempted (``sharing``: it worked); announce this tab."""
        self.sharing = sharing
        out: list[Action] = []
        if not sharing:
            self._send(out, protocol.warning_body("SHARING_UNAVAILABLE", "Live sharing with other tabs is unavailable right now; your own transcript is not affected."))
        if "presence" in self.relay_events:
            self._send(out, protocol.presence_body(event="join", connection_id=self.connection_id, connections=len(self.peers) + 1, session_id=self.session_id))
        if self.peers:
            out.append(SendGroup(self._presence_message("join")))
        return out

    def replay_page(self, records: list[dict[str, Any]]) -> list[Action]:
        """Finished turns read from the store, oldest first, sent as replayed EndOfTurn."""
        out: list[Action] = []
        for record in records:
            if not self.ledger.sent(record["index"]):
                self.ledger.mark_sent(record["index"])
                self._send(out, protocol.turn_info_from_record(record))
        return out

    def turns_read(self, read: ReadTurns, records: list[dict[str, Any]]) -> list[Action]:
        """The store's answer to :class:`ReadTurns`: what this tab missed, then the held final."""
        out = self.replay_page(records)
        self.ledger.read_done(read.after, read.before)
        if read.then is not None and read.then_index is not None and not self.ledger.sent(read.then_index):
            self.ledger.mark_sent(read.then_index)
            self._send(out, read.then)
        return out

    def replay_done(self, *, turns: int, last_turn_index: int | None, since: int | None) -> list[Action]:
        """The replay is complete; a client that asked for ``history`` is told so."""
        if "history" not in self.relay_events:
            return []
        return self._send([], protocol.history_body(turns=turns, last_turn_index=last_turn_index, since=since))

    def ready(self, warnings: list[EngineWarning | protocol.Notice]) -> list[Action]:
        """Set-up is done: send the warnings gathered meanwhile and take audio from now on."""
        out: list[Action] = []
        for warning in warnings:
            self._send(out, protocol.warning_body(warning.code, warning.description))
        self.streaming = True
        return out

    # -- client -> relay -----------------------------------------------------------------------
    def receive_bytes(self, data: bytes) -> list[Action] | tuple[Action, ...]:
        size = len(data)
        if not size or self.closing or not self.streaming:
            return NOTHING
        if not self.may_speak:
            return self._refuse("audio", "A viewer cannot send audio; this frame and later ones are ignored.")
        limit = self._audio_frame_limit
        if size > limit:
            audio = f" ({limit / self.bytes_per_second:.1f} s of this stream's audio)" if self.bytes_per_second else ""
            return [Fail(FrameTooLarge(f"Frames may be at most {limit} bytes{audio}; got {size}."))]
        self.messages_received += 1
        self.audio_bytes += size
        self.last_frame = self.clock()
        pcm = self._aligner.push(data)
        return [FeedAudio(pcm)] if pcm else NOTHING

    def backlog(self, seconds: float) -> Fail | None:
        """The engine's unprocessed audio after a feed; too much ends the stream."""
        if seconds > self.max_backlog_seconds and not self.closing:
            return Fail(BacklogExceeded())
        return None

    def receive_text(self, text: str) -> list[Action] | tuple[Action, ...]:
        if self.closing or not self.streaming:
            return NOTHING
        self.messages_received += 1
        self.last_frame = self.clock()
        if len(text) > self.max_frame_bytes:
            return [Fail(FrameTooLarge(f"Frames may be at most {self.max_frame_bytes} bytes."))]
        try:
            message = protocol.parse_client_text(text)
        except protocol.BadClientMessage as exc:
            return self._send([], protocol.warning_body(exc.code, exc.description))
        if message.type == "KeepAlive":
            return NOTHING
        if not self.may_speak and message.type in ("ForceEndTurn", "Configure"):
            return self._refuse("control", f"A viewer cannot send {message.type}; it was ignored, as later ones will be.")
        if message.type == "ForceEndTurn":
            return [ForceEndTurn()]
        if message.type == "Configure":
            if not self._configures.hit("configure"):
                return [Fail(RateLimited("Too many Configure messages; at most %d a minute." % self._configures.limit))]
            try:
                thresholds, keyterms, language_hints = protocol.parse_configure_request(message.data, self.options)
            except ConfigureRejected as exc:
                return self.configure_rejected(exc)
            return [Configure(thresholds, keyterms, language_hints)]
        # CloseStream
        self.closing = True
        self.close_code, self.close_reason = 1000, "CloseStream"
        return [CloseStream()]

    def configured(self, options: StreamOptions, warnings: list[EngineWarning]) -> list[Action]:
        self.options = options
        out = self._send([], protocol.configure_success_body(options))
        for warning in warnings:
            self._send(out, protocol.warning_body(warning.code, warning.description))
        return out

    def configure_rejected(self, exc: ConfigureRejected) -> list[Action]:
        return self._send([], protocol.configure_failure_body(exc.code, exc.description))

    def client_disconnected(self, code: int) -> None:
        """The socket is gone: nothing more is sent to it; the stream is flushed and stored."""
        self.client_gone = True
        if self.close_code is None:
            self.close_code = code
            self.close_reason = "client closed" if code in (1000, 1001) else "connection lost"

    # -- engine -> clients ---------------------------------------------------------------------
    def engine_warning(self, warning: EngineWarning) -> list[Action]:
        return self._send([], protocol.warning_body(warning.code, warning.description))

    def engine_event(self, event: TurnEvent) -> list[Action]:
        if event.turn != self._engine_turn or self._turn_index is None:
            self._engine_turn = event.turn
            self._turn_index = None
            self._waiting = event
            return [AllocateTurnIndex()]
        return self._turn_event(event)

    def turn_index_allocated(self, index: int) -> list[Action]:
        event, self._waiting = self._waiting, None
        assert event is not None, "turn_index_allocated without a waiting event"
        self._turn_index = index
        return self._turn_event(event)

    def _turn_event(self, event: TurnEvent) -> list[Action]:
        index = self._turn_index
        assert index is not None
        body = protocol.turn_info_body(event, turn_index=index, speaker=self.connection_id, speaker_name=self.speaker_name,
                                       words=self._words_json)
        out: list[Action] = []
        fan_out = bool(self.peers)
        if event.event == "Update":
            if fan_out:
                # Each Update carries the whole turn so far, so one held back loses nothing.
                if event.audio_window_end - self._listener_update_at < self.listener_update_seconds:
                    self._held = (body, index, event.audio_window_end)
                    fan_out = False
                    if not self._timer_pending:
                        self._timer_pending = True
                        out.append(StartTimer(LISTENER_UPDATE, self.listener_update_seconds))
                else:
                    self._listener_update_at = event.audio_window_end
                    self._held = None
        else:
            self._listener_update_at = float("-inf")
            self._held = None
        if event.event == "EndOfTurn":
            self._final = (body, index, fan_out, event)
            self._peers_at_store = frozenset(self.peers)
            out.append(StoreTurn(index=index, event=event, timed=not self.flushing))
            return out
        self._send(out, body)
        if fan_out:
            out.append(SendGroup(self._event_message(body, index, final=False)))
        return out

    def turn_stored(self, others: frozenset[str]) -> tuple[Finished, list[Action]]:
        """The finished turn is committed; ``others``: the session's other live connections then."""
        final, self._final = self._final, None
        assert final is not None, "turn_stored without a finished turn"
        body, index, fan_out, event = final
        self._turn_index = None
        self._engine_turn = None
        # Peers known when the store began and not live after it are gone (left, or their process
        # died); tabs that joined meanwhile stay.
        self.peers = (self.peers - (self._peers_at_store - others)) | others
        after = self.ledger.gap_before(index, self.channel_name)
        self.ledger.mark_sent(index)
        out = self._send([], body)
        if fan_out or others:
            out.append(SendGroup(self._event_message(body, index, final=True)))
        if after is not None:
            out.append(ReadTurns(after=after, before=index))
        return Finished(index, event), out

    def engine_failed(self, error: RelayError) -> None:
        """The engine's event stream died; the stream ends with ``error`` (see :meth:`fail`)."""
        self.engine_error = error

    def timer_fired(self, name: str) -> list[Action]:
        if name != LISTENER_UPDATE:
            return []
        self._timer_pending = False
        held, self._held = self._held, None
        if held is None:  # superseded meanwhile
            return []
        body, index, audio_end = held
        self._listener_update_at = audio_end
        return [SendGroup(self._event_message(body, index, final=False))]

    # -- other tabs -> this one ----------------------------------------------------------------
    def layer_event(self, message: dict[str, Any]) -> list[Action] | tuple[Action, ...]:
        if message["origin"] == self.channel_name:
            return NOTHING
        index = message["turn_index"]
        ledger = self.ledger
        if not message["final"]:
            ledger.mark_open(index, message["origin"])
            return self._send([], message["body"])
        if ledger.sent(index):
            return NOTHING
        after = ledger.gap_before(index, message["origin"])
        if after is not None:
            return [ReadTurns(after=after, before=index, then=message["body"], then_index=index)]
        ledger.mark_sent(index)
        return self._send([], message["body"])

    def layer_down(self) -> list[Action]:
        """This process lost its channel layer: other tabs' live events may be missed meanwhile."""
        if self.layer_outage or self.client_gone or self.closing:
            return []
        self.layer_outage = True
        return self._send([], protocol.warning_body("SHARING_INTERRUPTED", "Live sharing with other tabs is interrupted; finished turns you miss meanwhile are sent once it is back."))

    def layer_up(self) -> list[Action]:
        """The channel layer is back: rejoin the group if the join failed, and read what was missed."""
        self.layer_outage = False
        if self.client_gone or self.closing or not self.connection_id:
            return []
        out: list[Action] = [] if self.sharing else [JoinGroup()]
        out.append(ReadTurns(after=self.ledger.resync_from(), before=None))
        return out

    def rejoined(self, sharing: bool) -> None:
        self.sharing = sharing

    def layer_presence(self, message: dict[str, Any]) -> list[Action] | tuple[Action, ...]:
        if message["origin"] == self.channel_name:
            return NOTHING
        if message["event"] == "join":
            self.peers.add(message["connection_id"])
        else:
            self.peers.discard(message["connection_id"])
        if self.client_gone or self.closing or "presence" not in self.relay_events:
            return NOTHING
        return [CountPresence(message["event"], message["connection_id"])]

    def presence_counted(self, event: str, connection_id: str, count: int | None) -> list[Action]:
        """``count``: the session's live connections, or None when the store could not say."""
        if count is None:
            count = len(self.peers) + 1
        return self._send([], protocol.presence_body(event=event, connection_id=connection_id, connections=count, session_id=self.session_id))

    # -- ending --------------------------------------------------------------------------------
    def fail(self, error: RelayError) -> bool:
        """Begin ending the stream with ``error``; False when an end is already under way."""
        if self.closing:
            return False
        self.closing = True
        self._record_error(error)
        return True

    def flush_started(self) -> None:
        """The stream is ending; its remaining events are a flush, not load on open streams."""
        self.flushing = True

    def final_error(self, error: RelayError | None) -> tuple[RelayError | None, list[Action]]:
        """After the flush: the error to report (an engine failure during the flush counts)."""
        if error is None and self.engine_error is not None:
            error = self.engine_error
            self._record_error(error)
        if error is None:
            return None, []
        return error, self._send([], protocol.error_body(error.code, error.description))

    def leave(self) -> list[Action]:
        """The connection is over: other tabs hear that it left."""
        self._held = None
        if not self.peers:
            return []
        return [SendGroup(self._presence_message("leave"))]

    def counters(self) -> dict[str, Any]:
        """The connection's totals, as the store records them."""
        return {
            "audio_bytes": self.audio_bytes,
            "audio_seconds": self.audio_bytes / self.bytes_per_second if self.bytes_per_second else 0.0,
            "messages_received": self.messages_received,
            "messages_sent": self.messages_sent,
            "errors": self.errors,
            "last_error_code": self.last_error_code,
        }

    # -- helpers -------------------------------------------------------------------------------
    def _refuse(self, what: str, description: str) -> list[Action] | tuple[Action, ...]:
        """A viewer tried to change the transcript: ``Error`` ``FORBIDDEN`` the first time, then silence.

        Not fatal: the viewer keeps receiving the session's turns.
        """
        if what in self._refused:
            return NOTHING
        self._refused.add(what)
        self.errors += 1
        self.last_error_code = Forbidden.code
        return self._send([], protocol.error_body(Forbidden.code, description))

    def _record_error(self, error: RelayError) -> None:
        self.errors += 1
        self.last_error_code = error.code
        self.close_code, self.close_reason = error.close_code, error.code

    def _send(self, out: list[Action], body: str) -> list[Action]:
        if not self.client_gone:
            out.append(SendClient(protocol.stamp(body, sequence_id=self.sequence_id, request_id=self.connection_id)))
            self.sequence_id += 1
            self.messages_sent += 1
        return out

    def _event_message(self, body: str, index: int, *, final: bool) -> dict[str, Any]:
        return {"type": "relay.event", "origin": self.channel_name, "body": body, "turn_index": index, "final": final}

    def _presence_message(self, event: str) -> dict[str, Any]:
        return {"type": "relay.presence", "event": event, "connection_id": self.connection_id, "origin": self.channel_name}
