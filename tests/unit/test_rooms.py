"""Rooms with roles, in-process: invitations, share links, the WebSocket rules, labels, search.

Real consumer (WebsocketCommunicator), fake engine, the test database; share-link expiry is
tested with an injected ``now``, never by waiting.
"""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client as HttpClient
from django.utils import timezone

from relay.exceptions import Forbidden, InvalidParameter, ShareLinkInvalid
from relay.models import Connection, Membership, Session, Turn
from relay.ops.exports import export_text
from relay.store import access, rooms
from tests.support import histories
from tests.support.audio import silence, tone
from tests.support.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)

TURN = tone(0.5) + silence(0.7)  # "one two", then EndOfTurn (fake engine)


def user(username: str, **extra):
    return get_user_model().objects.create_user(username, password="pw-Relay-123", **extra)


def cookie(u) -> list[tuple[bytes, bytes]]:
    http = HttpClient()
    http.force_login(u)
    return [(b"cookie", f"sessionid={http.cookies['sessionid'].value}".encode())]


# --- the rules, no WebSocket ----------------------------------------------------------------------
def test_roles_by_ownership_membership_and_staff():
    alice, bob, carol, ops = user("alice"), user("bob"), user("carol"), user("ops", is_staff=True)
    session = Session.objects.create(pk="room", owner=alice)
    rooms.member_invite(session=session, username="BOB", role="viewer", invited_by=alice)
    assert access.session_role(user=alice, session=session) == "owner"
    assert access.session_role(user=ops, session=session) == "owner"
    assert access.session_role(user=bob, session=session) == "viewer"
    assert access.session_role(user=carol, session=session) is None
    with pytest.raises(Forbidden):
        access.connection_role(user=carol, session=session)
    rooms.member_invite(session=session, username="bob", role="speaker", invited_by=alice)  # again: the role changes
    assert access.session_role(user=bob, session=session) == "speaker" and Membership.objects.count() == 1
    assert rooms.member_remove(session=session, user_id=bob.pk)
    assert access.session_role(user=bob, session=session) is None


def test_inviting_nobody_or_with_a_bad_role_is_a_clear_error():
    alice = user("alice")
    session = Session.objects.create(pk="room", owner=alice)
    with pytest.raises(InvalidParameter, match="no user called"):
        rooms.member_invite(session=session, username="ghost", role="viewer", invited_by=alice)
    with pytest.raises(InvalidParameter, match="role must be"):
        rooms.member_invite(session=session, username="alice", role="admin", invited_by=alice)


def test_a_share_link_admits_with_its_role_until_it_expires_or_is_revoked():
    alice = user("alice")
    session = Session.objects.create(pk="room", owner=alice)
    Session.objects.create(pk="other", owner=alice)
    expires = timezone.now() + timedelta(minutes=10)
    link, token = rooms.share_link_create(session=session, role="viewer", created_by=alice, expires_at=expires)
    assert access.share_link_resolve(token=token, session_id="room").pk == link.pk
    assert access.connection_role(user=None, session=session, share=token) == "viewer"
    with pytest.raises(Forbidden, match="not speak"):
        access.connection_role(user=None, session=session, share=token, wants="speaker")
    with pytest.raises(ShareLinkInvalid, match="expired"):
        access.share_link_resolve(token=token, now=expires)
    with pytest.raises(ShareLinkInvalid, match="another session"):
        access.share_link_resolve(token=token, session_id="other")
    with pytest.raises(ShareLinkInvalid, match="altered"):
        access.share_link_resolve(token=token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])
    rooms.share_link_revoke(link=link)
    with pytest.raises(ShareLinkInvalid, match="revoked"):
        access.share_link_resolve(token=token)


def test_a_membership_from_a_link_lasts_as_long_as_the_link():
    alice, bob = user("alice"), user("bob")
    session = Session.objects.create(pk="room", owner=alice)
    expires = timezone.now() + timedelta(minutes=10)
    link, _ = rooms.share_link_create(session=session, role="speaker", created_by=alice, expires_at=expires)
    assert rooms.share_link_join(link=link, user=bob) is not None
    assert access.session_role(user=bob, session=session) == "speaker"
    assert [s.pk for s in access.sessions_for_user(user=bob)] == ["room"]
    assert access.session_role(user=bob, session=session, now=expires + timedelta(seconds=1)) is None
    rooms.share_link_revoke(link=link)
    assert access.session_role(user=bob, session=session) is None
    assert list(access.sessions_for_user(user=bob)) == []
    assert rooms.share_link_join(link=link, user=alice) is None  # the owner keeps being the owner


def test_my_sessions_lists_owned_and_joined_newest_first_and_searches_transcripts_and_titles():
    alice, bob = user("alice"), user("bob")
    old = Session.objects.create(pk="old", owner=alice, created_at=timezone.now() - timedelta(days=2))
    new = Session.objects.create(pk="new", owner=bob, title="Budget review")
    Session.objects.create(pk="not-mine", owner=bob)
    rooms.member_invite(session=new, username="alice", role="viewer", invited_by=bob)
    Turn.objects.create(session=old, index=0, transcript="We bought marmalade and bread")
    Turn.objects.create(session=new, index=0, transcript="the quarterly numbers")
    rows = list(access.sessions_for_user(user=alice))
    assert [s.pk for s in rows] == ["new", "old"]
    assert [access.role_of_listed(s, alice) for s in rows] == ["viewer", "owner"]
    assert [s.turn_count for s in rows] == [1, 1] and not any(s.is_live for s in rows)
    assert [s.pk for s in access.sessions_for_user(user=alice, query="marmalade")] == ["old"]
    assert [s.pk for s in access.sessions_for_user(user=alice, query="budget")] == ["new"]
    assert list(access.sessions_for_user(user=alice, query="nowhere")) == []
    assert list(access.sessions_for_user(user=None)) == []


# --- over the WebSocket ---------------------------------------------------------------------------
async def test_an_invited_viewer_hears_the_owner_live_by_name_and_cannot_speak():
    alice = await sync_to_async(user)("alice", first_name="Alice", last_name="Liddell")
    bob = await sync_to_async(user)("bob")
    a = Client("/v2/listen?session=room", headers=await sync_to_async(cookie)(alice))
    hello_a = await a.connect()
    assert hello_a["role"] == "owner" and hello_a["speaker_name"] == "Alice Liddell"
    session = await Session.objects.aget(pk="room")
    await sync_to_async(rooms.member_invite)(session=session, username="bob", role="viewer", invited_by=alice)
    b = Client("/v2/listen?session=room", headers=await sync_to_async(cookie)(bob))
    hello_b = await b.connect()
    assert hello_b["role"] == "viewer" and hello_b["speaker_name"] == "bob"
    await b.send_audio(TURN)
    await b.send_json({"type": "ForceEndTurn"})
    refused = await b.recv_until(lambda m: m.get("type") == "Error")
    assert refused["code"] == "FORBIDDEN"
    await a.send_audio(TURN)
    end_b = await b.recv_turn_end()
    assert end_b["speaker"] == hello_a["connection_id"] and end_b["speaker_name"] == "Alice Liddell"
    errors = [m for m in b.messages if m.get("type") == "Error"]
    assert [e["code"] for e in errors] == ["FORBIDDEN", "FORBIDDEN"]  # once for audio, once for control
    await b.disconnect()
    await a.disconnect()
    turns = [t async for t in Turn.objects.select_related("connection").all()]
    assert [t.connection.speaker_name for t in turns] == ["Alice Liddell"]  # the viewer's audio made no turn
    roles = {c.speaker_name: c.role async for c in Connection.objects.all()}
    assert roles == {"Alice Liddell": "owner", "bob": "viewer"}


async def test_a_viewer_announcing_audio_is_refused_at_connect_and_strangers_are_refused():
    alice, bob, carol = [await sync_to_async(user)(n) for n in ("alice", "bob", "carol")]
    a = Client("/v2/listen?session=room", headers=await sync_to_async(cookie)(alice))
    await a.connect()
    session = await Session.objects.aget(pk="room")
    await sync_to_async(rooms.member_invite)(session=session, username="bob", role="viewer", invited_by=alice)
    for who, query in ((bob, "&role=speaker"), (carol, "")):
        c = Client("/v2/listen?session=room" + query, headers=await sync_to_async(cookie)(who))
        await c.comm.connect()
        code, seen = await c.expect_close()
        assert code == 4003 and seen[-1]["code"] == "FORBIDDEN"
    await a.disconnect()


async def test_an_owner_may_join_as_a_viewer_and_a_share_link_lets_a_guest_view():
    alice = await sync_to_async(user)("alice")
    a = Client("/v2/listen?session=room", headers=await sync_to_async(cookie)(alice))
    await a.connect()
    listener = Client("/v2/listen?session=room&role=viewer", headers=await sync_to_async(cookie)(alice))
    assert (await listener.connect())["role"] == "viewer"
    session = await Session.objects.aget(pk="room")
    link, token = await sync_to_async(rooms.share_link_create)(session=session, role="viewer", created_by=alice)
    guest = Client(f"/v2/listen?session=room&share={token}")
    hello = await guest.connect()
    assert hello["role"] == "viewer" and hello["speaker_name"].startswith("Guest")
    await a.send_audio(TURN)
    assert (await guest.recv_turn_end())["transcript"] == "one two"
    await guest.disconnect()
    await sync_to_async(rooms.share_link_revoke)(link=link)
    late = Client(f"/v2/listen?session=room&share={token}")
    await late.comm.connect()
    code, seen = await late.expect_close()
    assert code == 4003 and seen[-1]["code"] == "SHARE_LINK_INVALID"
    await listener.disconnect()
    await a.disconnect()


async def test_anonymous_sessions_still_let_anyone_speak(settings):
    settings.RELAY_ANONYMOUS_READ_ONLY = False
    a = Client("/v2/listen?session=open")
    await a.connect()
    b = Client("/v2/listen?session=open")
    assert (await b.connect())["role"] == "speaker"
    await b.send_audio(TURN)
    assert (await b.recv_turn_end())["transcript"] == "one two"
    await b.disconnect()
    await a.disconnect()


async def test_read_only_anonymous_links_let_the_creator_and_its_reconnects_speak_and_others_view(settings):
    settings.RELAY_ANONYMOUS_READ_ONLY = True
    a = Client("/v2/listen?session=talk")
    first = await a.connect()
    assert first["role"] == "speaker" and first["speaker_name"] == "Guest 1"
    b = Client("/v2/listen?session=talk")
    other = await b.connect()
    assert other["role"] == "viewer" and other["speaker_name"] == "Guest 2"
    await a.disconnect()
    again = Client(f"/v2/listen?session=talk&previous_connection={first['connection_id']}")
    back = await again.connect()
    assert back["role"] == "speaker" and back["speaker_name"] == "Guest 1"  # the label survives the reconnect
    await again.send_audio(TURN)
    end = await b.recv_turn_end()
    assert end["speaker_name"] == "Guest 1" and end["speaker"] == back["connection_id"]
    await again.disconnect()
    await b.disconnect()


async def test_with_auth_required_a_share_link_still_admits_a_guest_and_nothing_else_does(settings):
    settings.RELAY_REQUIRE_AUTH = True
    alice = await sync_to_async(user)("alice")
    a = Client("/v2/listen?session=room", headers=await sync_to_async(cookie)(alice))
    await a.connect()
    session = await Session.objects.aget(pk="room")
    _, token = await sync_to_async(rooms.share_link_create)(session=session, role="viewer", created_by=alice)
    guest = Client(f"/v2/listen?session=room&share={token}")
    assert (await guest.connect())["role"] == "viewer"
    await guest.disconnect()
    for query in ("", "&share=forged"):
        stranger = Client("/v2/listen?session=room" + query)
        await stranger.comm.connect()
        code, seen = await stranger.expect_close()
        assert (code, seen[-1]["code"]) == ((4001, "UNAUTHORIZED") if not query else (4003, "SHARE_LINK_INVALID"))
    await a.disconnect()


def test_opening_a_stronger_link_never_turns_an_invitation_into_a_membership_that_expires():
    alice, bob = user("alice"), user("bob")
    session = Session.objects.create(pk="room", owner=alice)
    rooms.member_invite(session=session, username="bob", role="viewer", invited_by=alice)
    expires = timezone.now() + timedelta(minutes=10)
    link, token = rooms.share_link_create(session=session, role="speaker", created_by=alice, expires_at=expires)
    assert rooms.share_link_join(link=link, user=bob) is None
    assert access.connection_role(user=bob, session=session, share=token) == "speaker"
    assert access.session_role(user=bob, session=session, now=expires + timedelta(days=1)) == "viewer"


def test_exports_label_turns_with_speaker_names_when_more_than_one_person_spoke():
    s = histories.session("names", created=timezone.now() - timedelta(minutes=10))
    a = histories.connection(s, opened=s.created_at, duration=30, speaker_name="Alice Liddell")
    b = histories.connection(s, opened=s.created_at + timedelta(seconds=60), duration=30, speaker_name="Guest 1")
    again = histories.connection(s, opened=s.created_at + timedelta(seconds=120), duration=30, speaker_name="Alice Liddell")
    histories.turns(s, a, ["hello"], start_index=0)
    histories.turns(s, b, ["hi alice"], start_index=1)
    histories.turns(s, again, ["back again"], start_index=2)
    assert export_text(session=s, fmt="txt") == "Alice Liddell: hello\nGuest 1: hi alice\nAlice Liddell: back again\n"
    turns = json.loads(export_text(session=s, fmt="json"))["turns"]
    assert [t["speaker_name"] for t in turns] == ["Alice Liddell", "Guest 1", "Alice Liddell"]
    assert "<v Guest 1>hi alice" in export_text(session=s, fmt="vtt")

    alone = histories.session("alone", created=timezone.now() - timedelta(minutes=10))
    for n in range(2):  # one person, reconnecting: one unlabelled voice, as before
        c = histories.connection(alone, opened=alone.created_at + timedelta(seconds=60 * n), duration=30, speaker_name="Alice Liddell")
        histories.turns(alone, c, [f"part {n}"], start_index=n)
    assert export_text(session=alone, fmt="txt") == "part 0\npart 1\n"
    assert json.loads(export_text(session=alone, fmt="json"))["turns"][0]["speaker_name"] == "Alice Liddell"


def test_the_page_leaves_out_empty_sessions_the_api_keeps_them():
    alice = user("alice")
    Session.objects.create(pk="empty", owner=alice)
    Session.objects.create(pk="named", owner=alice, title="Planning")
    said = Session.objects.create(pk="said", owner=alice)
    Turn.objects.create(session=said, index=0, transcript="something")
    assert {s.pk for s in access.sessions_for_user(user=alice, include_empty=False)} == {"named", "said"}
    assert {s.pk for s in access.sessions_for_user(user=alice)} == {"empty", "named", "said"}
