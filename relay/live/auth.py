"""API tokens for programmatic clients, in the forms Flux accepts.

``Authorization: Token <key>`` (or ``Bearer <key>``), or, for browsers that cannot set headers,
the subprotocol pair ``Sec-WebSocket-Protocol: token, <key>``. Keys are stored as SHA-256 digests.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
import secrets
from typing import Any

from django.conf import settings
from django.utils import timezone

from relay.store.db import db_async
from relay.exceptions import RelayError, Unauthorized
from relay.models import ApiToken
from relay.server.denial_response import EXTENSION as DENIAL_RESPONSE

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


def key_in_header(scope: dict[str, Any]) -> bool:
    """Whether the client sent an ``Authorization`` header: SDKs and server programs do; a browser
    cannot set one on a WebSocket (it uses the subprotocols, or its login cookie)."""
    return any(name == b"authorization" for name, _ in scope.get("headers", []))


#: The refusals Deepgram gives at the WebSocket handshake, as (HTTP status, ``err_code`` of its JSON
#: error body), by the relay's error code. A bad key: ``401`` with ``{"err_code": "INVALID_AUTH",
#: "err_msg": ..., "request_id": ...}`` (developers.deepgram.com/reference/errors, "401 Incorrect API
#: key"). Too many requests: ``429`` (developers.deepgram.com/reference/api-rate-limits; Deepgram's
#: staff in github.com/orgs/deepgram/discussions/1621: Flux refuses the handshake with it); Deepgram
#: documents no body for it, so its err_code is the relay's own.
HANDSHAKE_REFUSALS = {"UNAUTHORIZED": (401, "INVALID_AUTH"), "RATE_LIMITED": (429, "RATE_LIMITED")}


def handshake_refusal(scope: dict[str, Any], error: RelayError) -> tuple[int, str] | None:
    """(HTTP status, err_code) when ``error`` refuses the handshake instead of ``Error`` + its close.

    Only for a client that sent an ``Authorization`` header, and where the server can answer with a
    status (ASGI's WebSocket Denial Response, relay.server.denial_response): a Deepgram program
    handles the status as it does Deepgram's (and Deepgram's JS SDK does not retry it, as it retries
    a 4xxx close), while a browser, which cannot read a handshake status, keeps the readable Error
    and close.
    """
    refusal = HANDSHAKE_REFUSALS.get(error.code)
    if refusal is None or not key_in_header(scope) or DENIAL_RESPONSE not in (scope.get("extensions") or {}):
        return None
    return refusal


def refusal_body(error: RelayError, *, err_code: str, request_id: str) -> bytes:
    """The JSON body of a handshake refusal, in Deepgram's error shape (never the key)."""
    return json.dumps({"err_code": err_code, "err_msg": error.description, "request_id": request_id}).encode()


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


async def authenticate(scope: dict[str, Any], *, share: bool = False) -> Credentials:
    """The credentials of a WebSocket, under the relay's policy.

    ``share``: the connection presents a share link (``share=``), itself a credential an owner
    issued, checked by :mod:`relay.store.access`: with it, ``RELAY_REQUIRE_AUTH`` does not ask
    for a login or token too (a guest with a link needs no account).

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
        if settings.RELAY_REQUIRE_AUTH and not share:
            raise Unauthorized("The API token is not valid.")
        return Credentials(user=user, ignored_key=True)
    if settings.RELAY_REQUIRE_AUTH and not share and not getattr(user, "is_authenticated", False):
        raise Unauthorized()
    return Credentials(user=user)
