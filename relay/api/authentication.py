"""The relay's own API tokens for the REST API: ``Authorization: Token <key>`` or ``Bearer <key>``.

The same keys, digests and revocation as the WebSocket (relay.live.auth); a token acts as its
user. A key the relay did not issue is refused here (HTTP has no anonymous fallback to offer:
the API needs an identity), and so is a token without a user (staff can make those in the
admin for the WebSocket only).
"""
from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from relay.exceptions import Unauthorized
from relay.live import auth
from relay.models import ApiToken


class RelayTokenAuthentication(authentication.BaseAuthentication):
    """Authenticates ``request.user`` as the token's user; ``request.auth`` is the ApiToken."""

    keywords = ("token", "bearer")

    def authenticate(self, request: Any) -> tuple[Any, ApiToken] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() not in self.keywords:
            return None  # Basic and others: not ours
        key = key.strip()
        if not key or " " in key:
            raise exceptions.AuthenticationFailed("The Authorization header must be 'Token <key>' or 'Bearer <key>'.")
        try:
            token = auth.token_authenticate(key=key)
        except Unauthorized as exc:  # issued and revoked
            raise exceptions.AuthenticationFailed(exc.description) from exc
        if token is None:
            raise exceptions.AuthenticationFailed("The API token is not valid.")
        if token.user is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("This API token has no active user; the REST API needs one.")
        return token.user, token

    def authenticate_header(self, request: Any) -> str:
        return 'Token realm="relay"'
