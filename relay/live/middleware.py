"""ASGI middleware for WebSockets."""
from __future__ import annotations

from importlib import import_module
from typing import Any
from urllib.parse import urlparse

from channels import auth as channels_auth
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.http.cookie import parse_cookie
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


class WebsocketAuthMiddleware:
    """Cookies, session and user for a WebSocket scope: Channels' AuthMiddlewareStack in one step.

    Channels' stack is three middlewares (three scope copies, three frames kept alive for as long
    as each connection lasts, a session wrapper that saves sessions on an HTTP response a
    WebSocket never sends), and it resolves the user through ``database_sync_to_async`` on
    asgiref's single thread even when there is no session cookie, so a burst of SDK or CLI
    connects queued on that one thread. Here: one scope copy, and without a login cookie the
    user is anonymous with no database call.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.session_store = import_module(settings.SESSION_ENGINE).SessionStore

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        cookies: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                cookies = parse_cookie(value.decode("latin1"))
                break
        session_key = cookies.get(settings.SESSION_COOKIE_NAME)
        scope = {**scope, "cookies": cookies, "session": self.session_store(session_key)}
        scope["user"] = await channels_auth.get_user(scope) if session_key else AnonymousUser()
        return await self.inner(scope, receive, send)
