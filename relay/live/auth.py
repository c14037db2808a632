"""API tokens for programmatic clients, in the forms Flux accepts.

``Authorization: Token <key>`` (or ``Bearer <key>``), or, for browsers that cannot set headers,
the subprotocol pair ``Sec-WebSocket-Protocol: token, <key>``. Keys are stored as SHA-256 digests.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Any

from django.conf import settings
from django.utils import timezone

from relay.store.db import db_async
from relay.exceptions import Unauthorized
from relay.models import ApiToken

KEY_PREFIX = "rly_"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def token_create(*, name: str, user: Any = None) -> tuple[ApiToken, str]:
    """Create a token; returns it and the key (shown once, never stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(name=name, user=user, prefix=key[:12], digest=digest(key))
    return token, key


def key_from_scope(scope: dict[str, Any]) -> str | None:
    """The key a client presented, if any (header first, then subprotocols)."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            try:
                scheme, _, key = value.decode("latin-1").partition(" ")
            except UnicodeDecodeError:
                return ""
            if scheme.lower() in ("token", "bearer") and key.strip():
                return key.strip()
            return ""
    protocols = scope.get("subprotocols") or []
    if len(protocols) >= 2 and protocols[0] == "token":
        return protocols[1]
    return None


def token_authenticate(*, key: str) -> ApiToken:
    if not key or len(key) > 200:
        raise Unauthorized("The API token is not valid.")
    token = ApiToken.objects.select_related("user").filter(digest=digest(key), revoked_at__isnull=True).first()
    if token is None:
        raise Unauthorized("The API token is not valid.")
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token


atoken_authenticate = db_async(token_authenticate)


async def authenticate(scope: dict[str, Any]) -> Any:
    """The Django user of a WebSocket: from an API token, else the login session.

    Records the token's pk in the scope. Raises Unauthorized for a bad or revoked key, and for
    no credentials at all when ``RELAY_REQUIRE_AUTH`` is on.
    """
    user = scope.get("user")
    key = key_from_scope(scope)
    if key is not None:
        token = await atoken_authenticate(key=key)
        scope["relay_token"] = token.pk
        return token.user or user
    if settings.RELAY_REQUIRE_AUTH and not getattr(user, "is_authenticated", False):
        raise Unauthorized()
    return user
