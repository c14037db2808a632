"""The account and room pages over HTTP (Django's test client): sign-up, tokens, My sessions, a
session's page with its owner's actions, share links, password reset by e-mail."""
from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.core import mail

from relay.exceptions import Unauthorized
from relay.live import auth
from relay.models import ApiToken, Membership, Session, ShareLink, Turn
from relay.store import access, rooms

pytestmark = pytest.mark.django_db


def test_sign_up_signs_in_and_lands_on_my_sessions(client):
    page = client.get("/account/signup/")
    assert page.status_code == 200 and b"Create an account" in page.content
    done = client.post("/account/signup/", {"username": "alice", "email": "alice@example.org", "password1": "a-Long-pass-123", "password2": "a-Long-pass-123"})
    assert done.status_code == 302 and done["Location"] == "/sessions/"
    mine = client.get("/sessions/")
    assert mine.status_code == 200 and b"No sessions yet" in mine.content and b"alice" in mine.content


def test_sign_up_can_be_turned_off(client, settings):
    settings.RELAY_SIGNUP_ENABLED = False
    assert client.get("/account/signup/").status_code == 404
    assert b"/account/signup/" not in client.get("/account/login/").content


def test_sign_up_refuses_a_taken_name_and_a_weak_password(client):
    get_user_model().objects.create_user("alice", password="x-Long-pass-123")
    page = client.post("/account/signup/", {"username": "alice", "password1": "123", "password2": "123"})
    assert page.status_code == 200 and b"already exists" in page.content and get_user_model().objects.count() == 1


def test_sign_in_and_out(client):
    get_user_model().objects.create_user("alice", password="a-Long-pass-123")
    bad = client.post("/account/login/", {"username": "alice", "password": "wrong"})
    assert bad.status_code == 200 and b"correct username and password" in bad.content
    good = client.post("/account/login/", {"username": "alice", "password": "a-Long-pass-123", "next": "/account/"})
    assert good["Location"] == "/account/"
    assert client.post("/account/logout/").status_code == 302
    assert client.get("/account/")["Location"].startswith("/account/login/")


def test_password_reset_sends_a_link_that_sets_a_new_password(client):
    get_user_model().objects.create_user("alice", email="alice@example.org", password="a-Long-pass-123")
    assert client.post("/account/password/reset/", {"email": "alice@example.org"})["Location"] == "/account/password/reset/sent/"
    assert len(mail.outbox) == 1 and "alice" in mail.outbox[0].body
    link = re.search(r"http://testserver(/account/password/reset/\S+)", mail.outbox[0].body).group(1)
    form = client.get(link, follow=True)
    assert b"Choose a new password" in form.content
    done = client.post(form.redirect_chain[-1][0], {"new_password1": "b-New-pass-456", "new_password2": "b-New-pass-456"})
    assert done["Location"] == "/account/password/reset/done/"
    assert client.login(username="alice", password="b-New-pass-456")


def test_the_account_page_creates_a_token_shown_once_and_revokes_it(client):
    alice = get_user_model().objects.create_user("alice", password="a-Long-pass-123")
    client.force_login(alice)
    page = client.get("/account/")
    assert b"/account/usage/" in page.content
    made = client.post("/account/", {"action": "token", "name": "meeting bot"})
    key = re.search(rb'value="(rly_[^"]+)"', made.content).group(1).decode()
    assert made["Cache-Control"] == "no-store"
    token = ApiToken.objects.get(user=alice)
    assert token.name == "meeting bot" and token.digest == auth.digest(key) and key not in client.get("/account/").content.decode()
    assert auth.token_authenticate(key=key).user == alice
    bob = get_user_model().objects.create_user("bob")
    client.force_login(bob)
    assert client.post(f"/account/tokens/{token.pk}/revoke/").status_code == 404  # not bob's
    client.force_login(alice)
    client.post(f"/account/tokens/{token.pk}/revoke/")
    with pytest.raises(Unauthorized, match="revoked"):
        auth.token_authenticate(key=key)


def test_the_profile_name_labels_turns(client):
    alice = get_user_model().objects.create_user("alice")
    client.force_login(alice)
    client.post("/account/", {"action": "profile", "first_name": "Alice", "last_name": "Liddell", "email": ""})
    alice.refresh_from_db()
    assert access.display_name(alice) == "Alice Liddell"


def test_my_sessions_lists_searches_and_hides_other_peoples_sessions(client):
    alice, bob = (get_user_model().objects.create_user(n) for n in ("alice", "bob"))
    mine = Session.objects.create(pk="mine", owner=alice, title="Standup")
    Turn.objects.create(session=mine, index=0, transcript="the giraffe project is late")
    theirs = Session.objects.create(pk="theirs", owner=bob)
    Turn.objects.create(session=theirs, index=0, transcript="giraffe secrets")
    client.force_login(alice)
    page = client.get("/sessions/", {"q": "giraffe"}).content.decode()
    assert 'data-session="mine"' in page and 'data-session="theirs"' not in page
    assert 'data-session="mine"' not in client.get("/sessions/", {"q": "zebra"}).content.decode()
    assert client.get("/sessions/theirs/").status_code == 404


def test_the_owner_renames_invites_makes_and_revokes_links_and_deletes(client):
    alice, bob = (get_user_model().objects.create_user(n) for n in ("alice", "bob"))
    session = Session.objects.create(pk="room", owner=alice)
    Turn.objects.create(session=session, index=0, transcript="hello there")
    client.force_login(alice)
    page = client.get("/sessions/room/")
    assert b"hello there" in page.content and b"/sessions/room/transcript.vtt" in page.content
    client.post("/sessions/room/", {"action": "rename", "title": "Weekly sync"})
    assert Session.objects.get(pk="room").title == "Weekly sync"
    client.post("/sessions/room/", {"action": "invite", "username": "bob", "role": "viewer"})
    assert Membership.objects.get(session=session).user == bob
    made = client.post("/sessions/room/", {"action": "link", "role": "viewer", "expires": "1h"})
    url = re.search(rb'id="new-link"[^>]*value="([^"]+)"', made.content).group(1).decode()
    link = ShareLink.objects.get(session=session)
    assert link.expires_at is not None and url.startswith("http://testserver/s/")
    # Bob (a viewer) reads but may not change anything.
    client.force_login(bob)
    assert b"viewer" in client.get("/sessions/room/").content
    assert client.post("/sessions/room/", {"action": "rename", "title": "mine now"}).status_code == 403
    assert client.post("/sessions/room/", {"action": "delete"}).status_code == 403
    client.force_login(alice)
    client.post("/sessions/room/", {"action": "revoke", "link": link.pk})
    assert client.get(url.removeprefix("http://testserver")).status_code == 410
    client.post("/sessions/room/", {"action": "delete"})
    assert not Session.objects.filter(pk="room").exists() and not Turn.objects.exists()


@pytest.mark.django_db(transaction=True)  # the export view reads through database_sync_to_async, as under daphne
def test_a_share_link_opens_the_live_page_and_keeps_the_session_for_a_signed_in_user(client):
    alice, carol = (get_user_model().objects.create_user(n) for n in ("alice", "carol"))
    session = Session.objects.create(pk="room", owner=alice)
    _, token = rooms.share_link_create(session=session, role="viewer", created_by=alice)
    client.force_login(carol)
    opened = client.get(f"/s/{token}/")
    assert opened.status_code == 302 and opened["Location"] == f"/demo/ai-voice/?session=room&share={token}"
    assert [s.pk for s in access.sessions_for_user(user=carol)] == ["room"]
    assert client.get("/sessions/room/transcript.txt").status_code == 200  # a member reads the export
    client.logout()
    assert client.get("/sessions/room/transcript.txt").status_code == 403
    assert client.get("/sessions/room/transcript.txt", {"share": token}).status_code == 200
    assert client.get("/s/not-a-link/").status_code == 410
