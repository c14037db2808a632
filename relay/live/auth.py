"""API tokens for programmatic clients, in the forms Flux accepts.

``Authorization: Token <key>`` (or ``Bearer <key>``), or, for browsers that cannot set headers,
the subprotocol pair ``Sec-WebSocket-Protocol: token, <key>``. Keys are stored as SHA-256 digests.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
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


def token_authenticate(*, key: str) -> ApiToken | None:
    """The relay token ``key`` names; None when the relay issued no such key.

    Raises Unauthorized for a key the relay issued and revoked: that is never served.
    """
    if not key or len(key) > 200:
        return None
    token = ApiToken.objects.select_related("user").filter(digest=digest(key)).first()
    if token is None:
        return None
    if token.revoked_at is not None:
        raise Unauthorized("The API token was revoked.")
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return token


atoken_authenticate = db_async(token_authenticate)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a WebSocket is: its Django user, the relay token it used, and what was ignored."""

    user: Any
    token_id: int | None = None
    ignored_key: bool = False


UNKNOWN_CREDENTIALS_IGNORED = "UNKNOWN_CREDENTIALS_IGNORED"


async def authenticate(scope: dict[str, Any]) -> Credentials:
    """The credentials of a WebSocket, under the relay's policy.

    A relay token signs in as its user; a revoked one is refused. A key the relay did not issue
    (a Deepgram key, say: Deepgram's SDKs always send one) is refused when ``RELAY_REQUIRE_AUTH``
    is on, and otherwise ignored: the stream is served as anonymous and told so with a Warning.
    Without any key, the login session decides (and ``RELAY_REQUIRE_AUTH`` needs one).
    """
    user = scope.get("user")
    key = key_from_scope(scope)
    if key is not None:
        token = await atoken_authenticate(key=key)
        if token is not None:
            return Credentials(user=token.user or user, token_id=token.pk)
        if settings.RELAY_REQUIRE_AUTH:
            raise Unauthorized("The API token is not valid.")
        return Credentials(user=user, ignored_key=True)
    if settings.RELAY_REQUIRE_AUTH and not getattr(user, "is_authenticated", False):
        raise Unauthorized()
    return Credentials(user=user)
