"""The upstream engine family: one process-wide engine per alias, its settings and its credential.

:class:`UpstreamEngine` is the base that :mod:`.deepgram` and :mod:`.cloudflare` fill in (where
to connect, how to sign in); each client stream becomes an
:class:`~relay.engines.upstream.stream.UpstreamStream`.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from django.conf import settings

from relay.exceptions import EngineUnavailable

from relay.engines.base import Engine, EngineStream, EngineWarning, StreamOptions

from .flux_client import flux_query, loggable_url, with_query
from .stream import UpstreamStream


class Secret:
    """A credential that never prints: repr/str are masked, :meth:`reveal` builds the header."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Timeouts and limits for one stream, from RELAY_UPSTREAM_* settings or engine OPTIONS."""

    connect_timeout: float = 10.0
    stall_seconds: float = 5.0
    keepalive_seconds: float = 4.0
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    fallback_after: float = 30.0
    fallback_engine: str = "whisper"
    replay_seconds: float = 30.0
    close_timeout: float = 5.0
    speech_rms: float = 500.0

    SETTINGS: ClassVar[dict[str, str]] = {
        "connect_timeout": "RELAY_UPSTREAM_CONNECT_TIMEOUT_SECONDS",
        "stall_seconds": "RELAY_UPSTREAM_STALL_SECONDS",
        "keepalive_seconds": "RELAY_UPSTREAM_KEEPALIVE_SECONDS",
        "backoff_initial": "RELAY_UPSTREAM_BACKOFF_INITIAL_SECONDS",
        "backoff_max": "RELAY_UPSTREAM_BACKOFF_MAX_SECONDS",
        "fallback_after": "RELAY_UPSTREAM_FALLBACK_AFTER_SECONDS",
        "fallback_engine": "RELAY_UPSTREAM_FALLBACK_ENGINE",
        "replay_seconds": "RELAY_UPSTREAM_REPLAY_SECONDS",
        "close_timeout": "RELAY_UPSTREAM_CLOSE_TIMEOUT_SECONDS",
        "speech_rms": "RELAY_UPSTREAM_SPEECH_RMS",
    }

    @classmethod
    def resolve(cls, overrides: Mapping[str, Any]) -> "UpstreamConfig":
        """Engine OPTIONS win over settings, settings over the defaults above."""
        values: dict[str, Any] = {}
        for name, setting in cls.SETTINGS.items():
            if name in overrides:
                values[name] = overrides[name]
            elif hasattr(settings, setting):
                values[name] = getattr(settings, setting)
        return cls(**values)

    def backoff(self, attempt: int) -> float:
        """Delay before reconnect ``attempt`` (0 = at once: most drops are one-off)."""
        if attempt <= 0:
            return 0.0
        delay = min(self.backoff_initial * 2 ** (attempt - 1), self.backoff_max)
        return delay * random.uniform(0.8, 1.0)


class UpstreamEngine(Engine):
    """Base for engines that relay to a Flux service; subclasses say where and how to sign in."""

    name = "upstream"
    stream_class = UpstreamStream
    #: ``Authorization: <scheme> <secret>``.
    auth_scheme: ClassVar[str] = "Token"
    #: Whether the upstream takes a ``model`` query parameter.
    sends_model: ClassVar[bool] = True

    def __init__(self, alias: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(alias, options)
        # A key given in OPTIONS leaves the options dict at once, so nothing that shows engine
        # options (health checks, debug pages) can print it.
        key = self.options.pop("api_key", None)
        self._key_override = Secret(key) if key else None

    # -- what subclasses provide --------------------------------------------------------------------
    def endpoint(self) -> str:
        """The upstream WebSocket URL without query; raise EngineUnavailable if not configured."""
        raise NotImplementedError

    def secret(self) -> Secret:
        """The credential; raise EngineUnavailable when it is missing."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------
    def config(self) -> UpstreamConfig:
        return UpstreamConfig.resolve(self.options)

    def url_for(self, options: StreamOptions) -> str:
        return with_query(self.endpoint(), flux_query(options, include_model=self.sends_model))

    def loggable_url(self) -> str:
        try:
            return loggable_url(self.endpoint())
        except EngineUnavailable:
            return "-"

    def authorization(self) -> str:
        return f"{self.auth_scheme} {self.secret().reveal()}"

    def option_warnings(self, options: StreamOptions) -> list[EngineWarning]:
        """Warnings about options this upstream cannot honour (sent after Connected)."""
        return []

    def open_stream(self, options: StreamOptions) -> EngineStream:
        self.endpoint()
        self.secret()
        return super().open_stream(options)

    def readiness(self) -> tuple[bool, str]:
        try:
            self.endpoint()
            self.secret()
        except EngineUnavailable as exc:
            return False, exc.description
        return True, f"relays to {self.loggable_url()}"
