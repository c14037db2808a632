"""The relay's error hierarchy.

Every error that reaches a client carries a stable ``code`` (the string in the Flux ``Error`` /
``Warning`` message), a human sentence, and for fatal errors the WebSocket close code the
connection ends with. Daphne lets an application close only with 1000 or 3000-4999, so every
fatal error maps to a 4xxx code; docs/protocol.md has the table.
"""
from __future__ import annotations


class RelayError(Exception):
    """Base class: a problem the client is told about."""

    code = "INTERNAL_SERVER_ERROR"
    close_code = 4011
    description = "The relay hit an unexpected error."

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description or self.description)
        self.description = description or self.description


class InvalidSession(RelayError):
    """The session id is not acceptable."""

    code = "INVALID_SESSION"
    close_code = 4008
    description = "Session ids are 1-128 characters of letters, digits and -_.:"


class InvalidParameter(RelayError):
    """A query parameter or Configure value is malformed or out of range."""

    code = "INVALID_PARAMETER"
    close_code = 4008


class UnsupportedEncoding(RelayError):
    """The requested audio encoding is not one the relay decodes."""

    code = "UNSUPPORTED_ENCODING"
    close_code = 4008


class UnsupportedSampleRate(RelayError):
    """The requested sample rate is outside what the relay accepts."""

    code = "UNSUPPORTED_SAMPLE_RATE"
    close_code = 4008


class InvalidAudio(RelayError):
    """The audio cannot be decoded in the declared encoding (garbage, or too many bad packets)."""

    code = "INVALID_AUDIO"
    close_code = 4007
    description = "The audio could not be decoded in the declared encoding."


class FrameTooLarge(RelayError):
    """A single WebSocket message exceeded RELAY_MAX_FRAME_BYTES."""

    code = "FRAME_TOO_LARGE"
    close_code = 4009


class BacklogExceeded(RelayError):
    """The client sent audio faster than the engine can take it, past the bounded backlog."""

    code = "BACKLOG_EXCEEDED"
    close_code = 4008
    description = "Audio arrived faster than it could be transcribed and the backlog limit was reached."


class Forbidden(RelayError):
    """The session belongs to another user."""

    code = "FORBIDDEN"
    close_code = 4003
    description = "This session belongs to another user."


class ShareLinkInvalid(RelayError):
    """A share link that was tampered with, revoked, expired, or is for another session."""

    code = "SHARE_LINK_INVALID"
    close_code = 4003
    description = "This share link is not valid: it expired, was revoked, or is not for this session."


class Unauthorized(RelayError):
    """The relay requires a valid API token or login."""

    code = "UNAUTHORIZED"
    close_code = 4001
    description = "A valid API token or login is required."


class SessionFull(RelayError):
    """The session already has the maximum number of connections."""

    code = "SESSION_FULL"
    close_code = 4013
    description = "This session already has the maximum number of connections; try again later."


class ServerRestarting(RelayError):
    """The process is stopping (a restart or deploy); reconnect and another one serves you."""

    code = "SERVER_RESTARTING"
    close_code = 4012
    description = "The relay is restarting; reconnect to continue."


class SessionEnded(RelayError):
    """The session was ended by an operator and takes no more connections."""

    code = "SESSION_ENDED"
    close_code = 4010
    description = "This session has been ended."


class Capacity(RelayError):
    """The relay (or its engine pool) is full; a load balancer may retry elsewhere."""

    code = "CAPACITY"
    close_code = 4013
    description = "The relay is at capacity; try again later."


class RateLimited(RelayError):
    """Too many connection attempts or control messages."""

    code = "RATE_LIMITED"
    close_code = 4029
    description = "Too many requests; slow down and try again later."


class EngineError(RelayError):
    """The speech engine failed in a way the stream cannot recover from."""

    code = "ENGINE_ERROR"
    close_code = 4011
    description = "The speech engine failed."


class EngineUnavailable(EngineError):
    """The configured engine cannot be loaded (missing dependency, model or key)."""

    code = "ENGINE_UNAVAILABLE"
    close_code = 4013
    description = "The speech engine is not available."


class FlushIncomplete(EngineError):
    """A closing stream's engine stopped making progress, or ran past RELAY_FLUSH_LIMIT_SECONDS,
    before it finished the audio it was sent: the turns after the last EndOfTurn are not stored."""

    code = "FLUSH_INCOMPLETE"
    close_code = 4011
    description = "The speech engine did not finish the audio sent before the stream closed."


class UpstreamAuthFailed(EngineError):
    """The upstream speech service refused our credentials (401/403)."""

    code = "UPSTREAM_AUTH_FAILED"
    close_code = 4011
    description = "The upstream speech service rejected the relay's credentials."


class StorageUnavailable(RelayError):
    """The database stayed unreachable past RELAY_DB_RETRY_SECONDS."""

    code = "STORAGE_UNAVAILABLE"
    close_code = 4013
    description = "The relay cannot store transcripts right now; try again shortly."


class ConfigureRejected(RelayError):
    """A Configure message could not be applied (answered with ConfigureFailure, not fatal)."""

    code = "INVALID_CONFIGURE"
    close_code = 4008



ALL_ERRORS: list[type[RelayError]] = [
    RelayError,
    InvalidSession,
    InvalidParameter,
    UnsupportedEncoding,
    UnsupportedSampleRate,
    InvalidAudio,
    FrameTooLarge,
    BacklogExceeded,
    Forbidden,
    ShareLinkInvalid,
    Unauthorized,
    SessionFull,
    SessionEnded,
    Capacity,
    RateLimited,
    EngineError,
    EngineUnavailable,
    UpstreamAuthFailed,
    StorageUnavailable,
    ServerRestarting,
]
