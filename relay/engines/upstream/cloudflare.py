"""Deepgram Flux through Cloudflare Workers AI (``@cf/deepgram/flux``), signed in with a Bearer token.

Same wire protocol as :mod:`relay.engines.upstream.deepgram`; the model is fixed by the URL, so no ``model``
parameter is sent, and Workers AI takes linear16 only.
"""
from __future__ import annotations

from urllib.parse import quote

from django.conf import settings

from relay.exceptions import EngineUnavailable
from relay.flux.constants import DEFAULT_MODEL

from relay.engines.base import EngineWarning, StreamOptions, language_ignored_warning, model_ignored_warning
from relay.engines.upstream.engine import Secret, UpstreamEngine
from relay.engines.upstream.flux_client import loggable_url

#: The one model ``@cf/deepgram/flux`` serves: Flux's default English model.
CLOUDFLARE_MODEL = DEFAULT_MODEL


class CloudflareEngine(UpstreamEngine):
    """OPTIONS (all optional): ``url`` (a template with ``{account_id}``, default CLOUDFLARE_URL),
    ``account_id`` (CLOUDFLARE_ACCOUNT_ID), ``api_key`` (CLOUDFLARE_API_TOKEN), and any
    UpstreamConfig field."""

    name = "cloudflare"
    auth_scheme = "Bearer"
    sends_model = False

    def _account(self) -> str:
        account = self.options.get("account_id") or settings.CLOUDFLARE_ACCOUNT_ID
        if not account:
            raise EngineUnavailable(f"The {self.alias} engine has no account; set CLOUDFLARE_ACCOUNT_ID.")
        return account

    def endpoint(self) -> str:
        template = self.options.get("url") or settings.CLOUDFLARE_URL
        return template.replace("{account_id}", quote(self._account(), safe=""))

    def loggable_url(self) -> str:
        # The account id is not a secret, but it is not the logs' business either: log the template.
        return loggable_url(self.options.get("url") or settings.CLOUDFLARE_URL or "-")

    def secret(self) -> Secret:
        secret = self._key_override or Secret(settings.CLOUDFLARE_API_TOKEN)
        if not secret:
            raise EngineUnavailable(f"The {self.alias} engine has no API token; set CLOUDFLARE_API_TOKEN.")
        return secret

    def supported_encodings(self) -> set[str]:
        return {"linear16"}

    def option_warnings(self, options: StreamOptions) -> list[EngineWarning]:
        serving = f"Cloudflare Workers AI serves {CLOUDFLARE_MODEL} only"
        warnings = [model_ignored_warning(options, serving=serving, supported=CLOUDFLARE_MODEL), language_ignored_warning(options, serving=serving)]
        return [w for w in warnings if w is not None]
