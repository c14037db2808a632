"""Deepgram Flux (``wss://api.deepgram.com/v2/listen``), or anything that speaks it (a relay, a gateway).

The client's Flux parameters pass through as query parameters; Configure, ForceEndTurn and
CloseStream pass through as messages. Reconnects, replay and fallback live in
:mod:`relay.engines.upstream.stream`; this module only says where to connect and how to sign in.
"""
from __future__ import annotations

from django.conf import settings

from relay.exceptions import EngineUnavailable

from relay.engines.upstream.engine import Secret, UpstreamEngine


class DeepgramEngine(UpstreamEngine):
    """OPTIONS (all optional): ``url`` (default DEEPGRAM_URL), ``api_key`` (default
    DEEPGRAM_API_KEY), and any UpstreamConfig field (``stall_seconds``...)."""

    name = "deepgram"
    auth_scheme = "Token"

    def endpoint(self) -> str:
        url = self.options.get("url") or settings.DEEPGRAM_URL
        if not url:
            raise EngineUnavailable(f"The {self.alias} engine has no URL; set DEEPGRAM_URL.")
        return url

    def secret(self) -> Secret:
        secret = self._key_override or Secret(settings.DEEPGRAM_API_KEY)
        if not secret:
            raise EngineUnavailable(f"The {self.alias} engine has no API key; set DEEPGRAM_API_KEY.")
        return secret
