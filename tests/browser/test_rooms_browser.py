"""Accounts and rooms in a real Chromium against a real daphne (fake engine: speech is not the point).

One story: Alice signs up and starts a session; Bob signs up and is invited as a viewer; Bob
watches Alice's turns arrive live, labelled with her name, and cannot speak (his microphone is
off-limits on the page, and audio he sends anyway is refused with ``FORBIDDEN``); a guest with a
share link that has an expiry watches too, and once the link's expiry has passed the link no
longer works; Alice finds the session on "My sessions" by a word said in it.

Expiry without waiting: the link is made on the session page with a real expiry, then its
``expires_at`` row is moved into the past in the server's database (time passing, for the link
only), and the server's own clock decides.
"""
from __future__ import annotations

import re
import sqlite3

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import new_page, page_errors, screenshot
from tests.browser.test_demo_page_browser import BURST, bursts_wav, demo_url, finals

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(240)]

PASSWORD = "Relay-browser-pass-42"


def sign_up(browser: Browser, base: str, username: str) -> Page:
    page = new_page(browser)
    page.goto(base + "/account/signup/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Email").fill(f"{username}@example.org")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password confirmation").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page).to_have_url(base + "/sessions/")
    expect(page.get_by_role("navigation", name="Account")).to_contain_text(username)
    return page


def open_live(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-state", "open")


def send_audio_as(page: Page, ws_url: str) -> list[dict]:
    """Open a raw WebSocket from ``page`` (its login cookie goes along) and keep sending audio and
    ForceEndTurn (the relay takes frames once set-up is done) until both were refused, then ten
    more of each; returns every message that came back."""
    return page.evaluate(
        """(url) => new Promise((resolve) => {
            const ws = new WebSocket(url);
            const seen = [];
            let after = 0;
            let timer = null;
            ws.onmessage = (event) => seen.push(JSON.parse(event.data));
            ws.onopen = () => {
                timer = setInterval(() => {
                    ws.send(new Uint8Array(3200));
                    ws.send('{"type": "ForceEndTurn"}');
                    if (seen.filter((m) => m.type === "Error").length >= 2 && ++after > 10) {
                        clearInterval(timer);
                        ws.send('{"type": "CloseStream"}');
                    }
                }, 50);
            };
            ws.onclose = () => { clearInterval(timer); resolve(seen); };
        })""",
        ws_url,
    )


def expire_share_links(server_env: dict[str, str], session_id: str) -> int:
    """Move the session's share-link expiries into the past (UTC, as Django stores them in SQLite)."""
    path = server_env["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return db.execute(
            "UPDATE relay_sharelink SET expires_at = '2000-01-01 00:00:00' WHERE session_id = ? AND expires_at IS NOT NULL", (session_id,)
        ).rowcount


def test_invite_a_viewer_share_a_link_that_expires_and_find_the_session_by_a_word(fake_server, launch, tmp_path):
    base = fake_server.http_url
    browser = launch(bursts_wav(tmp_path / "bursts.wav", 2))
    bob = sign_up(browser, base, "bob")
    alice = sign_up(browser, base, "alice")

    # Alice starts a session: signed in, it is hers.
    open_live(alice, demo_url(base))
    session_id = re.search(r"session=([^&]+)", alice.url).group(1)
    expect(alice.locator("body")).to_have_attribute("data-role", "owner")

    # She invites Bob as a viewer from the session's page.
    alice.get_by_role("link", name="Invite people and share links").click()
    expect(alice).to_have_url(f"{base}/sessions/{session_id}/")
    alice.get_by_label("Username").fill("bob")
    alice.locator("#invite-role").select_option("viewer")
    alice.get_by_role("button", name="Invite").click()
    expect(alice.locator('[data-member="bob"]')).to_contain_text("viewer")

    # And makes a viewer link that expires in an hour, for a guest without an account.
    alice.locator("#link-role").select_option("viewer")
    alice.locator("#link-expires").select_option("1h")
    alice.get_by_role("button", name="Make link").click()
    link = alice.locator("#new-link").input_value()
    assert link.startswith(f"{base}/s/")
    screenshot(alice, "rooms-session-page-owner")

    # Bob and the guest open the live page before Alice speaks.
    live = f"{demo_url(base)}?session={session_id}"
    open_live(bob, live)
    expect(bob.locator("body")).to_have_attribute("data-role", "viewer")
    expect(bob.locator("#mic")).to_be_disabled()
    expect(bob.locator("#mic-hint")).to_contain_text("cannot speak")
    guest = new_page(browser)
    guest.goto(link)
    expect(guest).to_have_url(re.compile(re.escape(live) + "&share="))
    expect(guest.locator("body")).to_have_attribute("data-state", "open")
    expect(guest.locator("body")).to_have_attribute("data-role", "viewer")

    # Alice speaks (alice/bob/guest all open first): both watchers see her turns live, by her name.
    open_live(alice, live)
    alice.get_by_role("button", name="Start microphone").click()
    expect(alice.locator("#turns .turn")).to_have_count(2)
    for watcher in (bob, guest):
        expect(watcher.locator("#turns .turn")).to_have_count(2)
        turns = finals(watcher)
        assert [t["text"] for t in turns] == [BURST] * 2
        assert {t["speaker"] for t in turns} == {"alice"} and not any(t["replayed"] for t in turns)
    screenshot(bob, "rooms-viewer-live")

    # Bob cannot speak even by going around the page: audio and ForceEndTurn are refused, once each.
    seen = send_audio_as(bob, f"{fake_server.ws_url}/v2/listen?session={session_id}")
    assert seen[0]["type"] == "Connected" and seen[0]["role"] == "viewer" and seen[0]["speaker_name"] == "bob"
    assert [(m["code"]) for m in seen if m["type"] == "Error"] == ["FORBIDDEN", "FORBIDDEN"]
    assert not [m for m in seen if m["type"] == "TurnInfo" and m.get("speaker_name") == "bob"]
    alice.get_by_role("button", name="Stop").click()
    expect(alice.locator("body")).to_have_attribute("data-recording", "false")

    # Once the link's expiry has passed, it admits nobody: neither the link page nor the live socket.
    assert expire_share_links(fake_server.env, session_id) == 1
    expired = new_page(browser)
    expired.goto(link)
    expect(expired.get_by_role("alert")).to_contain_text("expired")
    guest.reload()
    expect(guest.locator("#error-text")).to_contain_text("expired or was revoked")
    screenshot(guest, "rooms-expired-link")
    expect(bob.locator("#turns .turn")).to_have_count(2)  # Bob's invitation does not depend on the link

    # Alice finds the session on "My sessions" by a word from it; a word never said finds nothing.
    alice.goto(base + "/sessions/")
    alice.get_by_label("Search titles and transcripts").fill("three")
    alice.get_by_role("button", name="Search").click()
    rows = alice.locator("table.sessions tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-session", session_id)
    expect(rows.first).to_contain_text("bob")  # participants: the people who joined
    screenshot(alice, "rooms-my-sessions-search")
    alice.get_by_label("Search titles and transcripts").fill("zebra")
    alice.get_by_role("button", name="Search").click()
    expect(alice.locator("table.sessions")).to_have_count(0)
    expect(alice.locator(".empty")).to_contain_text("No session matches")
    # Bob, a member, lists it too, as a viewer.
    bob.goto(base + "/sessions/")
    expect(bob.locator(f'tr[data-session="{session_id}"]')).to_contain_text("viewer")
    assert page_errors(alice) == [] and page_errors(bob) == [] and page_errors(guest) == []
