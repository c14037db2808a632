"""The dashboard in Debian's headless Chromium: it renders for a staff user, and a screenshot is
saved to test-artifacts/ for people to look at."""
from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from playwright.sync_api import sync_playwright

from tests.support import histories
from tests.support.live import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"


def test_dashboard_screenshot(live_server):
    histories.busy_day()
    staff = User.objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(staff)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": live_server.url}])
            page = context.new_page()
            failed: list[str] = []  # every asset the page asked for must load (favicon aside)
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
            response = page.goto(f"{live_server.url}/admin/relay/session/dashboard/?window=24h")
            assert response is not None and response.status == 200
            page.wait_for_selector("svg.relay-chart")
            assert page.locator(".relay-card").count() == 4
            levels = page.locator(".relay-card").evaluate_all("cards => cards.map(c => c.dataset.level)")
            assert set(levels) <= {"good", "warn", "bad"}
            assert page.locator("#live-sessions").inner_text() == "3"
            # Admin CSS loaded (served locally): the header has the admin's colours, not defaults.
            header_bg = page.locator("#header").evaluate("e => getComputedStyle(e).backgroundColor")
            assert header_bg not in {"rgba(0, 0, 0, 0)", "transparent"}
            page.screenshot(path=str(shot), full_page=True)
            assert not failed, failed
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    print(f"dashboard screenshot: {Path(shot).relative_to(ROOT)}")
