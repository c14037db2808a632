"""``/account/usage/``: the signed-in user's usage, from the aggregate rows (a few reads per view)."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from relay.api import usage
from relay.api.models import WebhookEndpoint

PERIODS = (7, 30, 90)


@require_GET
@login_required
def usage_page(request: HttpRequest) -> HttpResponse:
    try:
        days = int(request.GET.get("days", "30"))
    except ValueError:
        days = 30
    if days not in PERIODS:
        days = 30
    data = usage.usage_for_user(user=request.user, period=usage.Period.last_days(days))
    endpoints = list(WebhookEndpoint.objects.filter(user=request.user).order_by("-created_at"))
    return render(request, "relay_api/usage.html", {
        "usage": data, "days": days, "periods": PERIODS, "endpoints": endpoints,
        "disabled_endpoints": [e for e in endpoints if not e.is_active and e.disabled_at],
    })
