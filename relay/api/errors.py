"""Errors as JSON with the WebSocket's stable codes: ``{"type": "Error", "code", "description"}``.

The body has the same keys as the Flux ``Error`` message, so a client handles both with one
function. Codes the WebSocket has (FORBIDDEN, UNAUTHORIZED, RATE_LIMITED, SESSION_ENDED,
INVALID_PARAMETER...) mean the same here; HTTP-only ones (NOT_FOUND, METHOD_NOT_ALLOWED, ...)
are listed in docs/api.md.
"""
from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import set_rollback

from relay import exceptions as relay_errors

#: HTTP status for the relay's own errors raised by API code.
RELAY_STATUS: dict[type[relay_errors.RelayError], int] = {
    relay_errors.Unauthorized: status.HTTP_401_UNAUTHORIZED,
    relay_errors.Forbidden: status.HTTP_403_FORBIDDEN,
    relay_errors.InvalidSession: status.HTTP_400_BAD_REQUEST,
    relay_errors.InvalidParameter: status.HTTP_400_BAD_REQUEST,
    relay_errors.SessionEnded: status.HTTP_409_CONFLICT,
    relay_errors.RateLimited: status.HTTP_429_TOO_MANY_REQUESTS,
    relay_errors.StorageUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    relay_errors.Capacity: status.HTTP_503_SERVICE_UNAVAILABLE,
}

#: DRF's exceptions and the code each gets.
DRF_CODES: list[tuple[type[exceptions.APIException], str]] = [
    (exceptions.NotAuthenticated, relay_errors.Unauthorized.code),
    (exceptions.AuthenticationFailed, relay_errors.Unauthorized.code),
    (exceptions.PermissionDenied, relay_errors.Forbidden.code),
    (exceptions.NotFound, "NOT_FOUND"),
    (exceptions.ValidationError, relay_errors.InvalidParameter.code),
    (exceptions.ParseError, "INVALID_REQUEST"),
    (exceptions.MethodNotAllowed, "METHOD_NOT_ALLOWED"),
    (exceptions.NotAcceptable, "NOT_ACCEPTABLE"),
    (exceptions.UnsupportedMediaType, "UNSUPPORTED_MEDIA_TYPE"),
    (exceptions.Throttled, relay_errors.RateLimited.code),
]


def error_body(code: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "Error", "code": code, "description": description, **extra}


def _sentence(detail: Any) -> str:
    if isinstance(detail, (list, tuple)) and detail:
        return _sentence(detail[0])
    if isinstance(detail, dict) and detail:
        key, value = next(iter(detail.items()))
        return f"{key}: {_sentence(value)}"
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, with the relay's codes and body; anything else is left to Django (a 500)."""
    if isinstance(exc, relay_errors.RelayError):
        set_rollback()
        code = RELAY_STATUS.get(type(exc), status.HTTP_400_BAD_REQUEST if exc.close_code == 4008 else status.HTTP_500_INTERNAL_SERVER_ERROR)
        return Response(error_body(exc.code, exc.description), status=code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "Not found.")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    if not isinstance(exc, exceptions.APIException):
        return None
    code = next((c for kind, c in DRF_CODES if isinstance(exc, kind)), str(exc.default_code).upper())
    extra: dict[str, Any] = {}
    if isinstance(exc, exceptions.ValidationError):
        extra["fields"] = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
    headers: dict[str, str] = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(exc.wait))
    set_rollback()
    return Response(error_body(code, _sentence(exc.detail), **extra), status=exc.status_code, headers=headers)
