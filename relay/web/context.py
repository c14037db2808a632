"""Template context every page gets (the account links in the top bar need it)."""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest


def accounts(request: HttpRequest) -> dict[str, Any]:
    return {"signup_enabled": settings.RELAY_SIGNUP_ENABLED}
