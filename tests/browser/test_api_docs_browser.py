"""The API's docs page in Debian's Chromium, against a production-mode daphne (collectstatic,
DEBUG=0): Swagger UI renders the relay's OpenAPI schema from the relay's own static files, and
nothing is fetched from any other host (the machines have no internet)."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import new_page, page_errors, screenshot

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_swagger_ui_renders_the_schema_from_local_assets(launch, fake_server):
    page = new_page(launch())
    elsewhere: list[str] = []

    def only_the_relay(route):
        if route.request.url.startswith(fake_server.http_url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_relay)
    page.goto(fake_server.http_url + "/api/docs/")
    expect(page.locator(".swagger-ui .opblock-summary-path", has_text="/api/v1/sessions/{id}/turns/").first).to_be_visible()
    expect(page.locator(".swagger-ui .opblock-summary-path", has_text="/api/v1/webhooks/").first).to_be_visible()
    screenshot(page, "api-docs")
    assert elsewhere == [], f"the docs page fetched other hosts: {elsewhere}"
    assert page_errors(page) == []
