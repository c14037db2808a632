"""ASGI middleware for WebSockets."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from channels.auth import AuthMiddleware
from channels.security.websocket import OriginValidator
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.request import is_same_domain


class OriginCheckMiddleware(OriginValidator):
    """Cross-site WebSocket hijacking guard.

    A browser always sends Origin; it must name one of ALLOWED_HOSTS (or RELAY_ALLOWED_ORIGINS).
    Non-browser clients send none and are let through (API tokens, when required, guard them).
    """

    def __init__(self, application: Any) -> None:
        super().__init__(application, [])

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        if settings.DEBUG and not settings.ALLOWED_HOSTS:
            return True
        allowed = list(settings.ALLOWED_HOSTS) + list(getattr(settings, "RELAY_ALLOWED_ORIGINS", []))
        host = parsed_origin.hostname or ""
        if parsed_origin.port:
            host_port = f"{host}:{parsed_origin.port}"
        else:
            host_port = host
        for pattern in allowed:
            if pattern == "*":
                return True
            if "://" in pattern:
                p = urlparse(pattern)
                if p.scheme == parsed_origin.scheme and p.netloc == parsed_origin.netloc:
                    return True
                continue
            pattern = pattern.lower()
            if is_same_domain(host, pattern) or is_same_domain(host_port, pattern):
                return True
            if pattern.startswith("[") and host_port.lower() in (pattern, pattern.strip("[]")):
                return True
        return False


class SessionCookieAuthMiddleware(AuthMiddleware):
    """Channels' AuthMiddleware, without a database thread hop for clients with no login cookie.

    Channels resolves ``scope["user"]`` through ``database_sync_to_async`` on every connect, on
    asgiref's single thread, even when there is no session cookie to look up, so a burst of SDK
    or CLI connects queued on that one thread. Without the cookie the user is anonymous anyway.
    """

    async def resolve_scope(self, scope: dict) -> None:
        if settings.SESSION_COOKIE_NAME not in scope.get("cookies", {}):
            scope["user"]._wrapped = AnonymousUser()
            return
        await super().resolve_scope(scope)


def RelayAuthMiddlewareStack(inner: Any) -> Any:
    """Channels' AuthMiddlewareStack with :class:`SessionCookieAuthMiddleware`."""
    return CookieMiddleware(SessionMiddleware(SessionCookieAuthMiddleware(inner)))
