"""Shared sessions in-process: fan-out to every tab, presence, replay without gap or duplicate,
session-wide turn indexes, access rules, ending a session, connection caps."""
from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import Client as HttpClient

from relay.store import services
from relay.models import Turn
from tests.support.audio import silence, tone
from tests.support.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)

TURN = tone(0.5) + silence(0.7)  # "one two", then EndOfTurn


def finals(client: Client) -> list[dict]:
    return [m for m in client.messages if m.get("type") == "TurnInfo" and m["event"] == "EndOfTurn"]


async def test_second_tab_sees_live_updates_of_the_first_with_speaker(settings):
    settings.RELAY_LISTENER_UPDATE_SECONDS = 0  # every Update, to check each one
    a = Client("/v2/listen?session=tabs")
    ha = await a.connect()
    b = Client("/v2/listen?session=tabs")
    hb = await b.connect()
    assert hb["resumed"] is True
    joined = await a.recv_until(lambda m: m.get("type") == "Presence" and m["connection_id"] == hb["connection_id"])
    assert joined["event"] == "join" and joined["connection_id"] == hb["connection_id"] and joined["connections"] == 2
    await a.send_audio(TURN)
    end_a = await a.recv_turn_end()
    end_b = await b.recv_turn_end()
    assert end_a["transcript"] == end_b["transcript"] == "one two"
    assert end_b["speaker"] == ha["connection_id"] and end_b["turn_index"] == end_a["turn_index"] == 0
    assert "replayed" not in end_b
    b_events = [m["event"] for m in b.messages if m.get("type") == "TurnInfo"]
    assert b_events == ["StartOfTurn", "Update", "Update", "EndOfTurn"]
    # The speaker got each of its events once (not echoed back through the layer).
    a_events = [m["event"] for m in a.messages if m.get("type") == "TurnInfo"]
    assert a_events == ["StartOfTurn", "Update", "Update", "EndOfTurn"]
    await b.disconnect()
    left = await a.recv_until(lambda m: m.get("type") == "Presence" and m["event"] == "leave")
    assert left["event"] == "leave" and left["connections"] == 1
    await a.disconnect()


async def speaker_and_listener(session: str) -> tuple[Client, Client]:
    """Two tabs of one session, the first knowing of the second."""
    a = Client(f"/v2/listen?session={session}")
    await a.connect()
    b = Client(f"/v2/listen?session={session}")
    await b.connect()
    await a.recv_until(lambda m: m.get("type") == "Presence" and m["event"] == "join" and m["connections"] == 2)
    return a, b


async def test_listening_tabs_get_interim_updates_coalesced_and_every_final(settings):
    """At most one Update per RELAY_LISTENER_UPDATE_SECONDS of audio reaches other tabs; the
    speaker still gets every one, and the listener every StartOfTurn and EndOfTurn."""
    settings.RELAY_LISTENER_UPDATE_SECONDS = 0.5
    a, b = await speaker_and_listener("coalesce")
    await a.send_audio(tone(1.6) + silence(0.7) + tone(0.3) + silence(0.7))  # 6 Updates, then 1
    await a.recv_until(lambda m: m.get("type") == "TurnInfo" and m["event"] == "EndOfTurn" and m["turn_index"] == 1)
    await b.recv_until(lambda m: m.get("type") == "TurnInfo" and m["event"] == "EndOfTurn" and m["turn_index"] == 1)

    def updates(client: Client, turn: int) -> list[float]:
        return [m["audio_window_end"] for m in client.messages if m.get("type") == "TurnInfo" and m["event"] == "Update" and m["turn_index"] == turn]

    assert len(updates(a, 0)) == 6 and len(updates(a, 1)) == 1
    heard = updates(b, 0)
    assert heard == [t for t in updates(a, 0) if t in heard]  # a subsequence, in order
    assert 2 <= len(heard) <= 4 and all(later - earlier >= 0.5 for earlier, later in zip(heard, heard[1:]))
    assert len(updates(b, 1)) == 1  # a new turn starts afresh
    for turn in (0, 1):
        b_events = [m["event"] for m in b.messages if m.get("type") == "TurnInfo" and m["turn_index"] == turn]
        assert b_events[0] == "StartOfTurn" and b_events[-1] == "EndOfTurn"
    assert [m["transcript"] for m in finals(b)] == [m["transcript"] for m in finals(a)]
    await a.disconnect()
    await b.disconnect()


async def test_a_held_back_update_reaches_listeners_when_the_speaker_pauses(settings):
    settings.RELAY_LISTENER_UPDATE_SECONDS = 0.5
    a, b = await speaker_and_listener("pause")
    await a.send_audio(tone(1.0))  # four Updates, the turn still open: the last ones are held back
    last = await a.recv_until(lambda m: m.get("event") == "Update" and m["transcript"] == "one two three four")
    # Within about the interval the listener has the turn as far as it goes.
    seen = await b.recv_until(lambda m: m.get("event") == "Update" and m["transcript"] == "one two three four", timeout=3)
    assert seen["audio_window_end"] == last["audio_window_end"]
    heard = [m["transcript"] for m in b.messages if m.get("event") == "Update"]
    assert len(heard) < 4 and heard[-1] == "one two three four"
    await a.disconnect()
    await b.disconnect()


async def test_own_presence_comes_with_connected():
    a = Client("/v2/listen?session=presence-self")
    await a.connect()
    me = await a.recv(presence=True)
    assert me["type"] == "Presence" and me["event"] == "join" and me["connections"] == 1 and me["sequence_id"] == 1
    await a.disconnect()


async def test_two_tabs_speaking_at_once_get_unique_monotonic_indexes():
    a = Client("/v2/listen?session=both-speak")
    b = Client("/v2/listen?session=both-speak")
    await a.connect()
    await b.connect()
    for _ in range(4):
        await asyncio.gather(a.send_audio(TURN), b.send_audio(TURN))
        await asyncio.gather(
            a.recv_until(lambda m: m.get("event") == "EndOfTurn" and m["speaker"] == a.messages[0]["connection_id"]),
            b.recv_until(lambda m: m.get("event") == "EndOfTurn" and m["speaker"] == b.messages[0]["connection_id"]),
        )
    await a.disconnect()
    await b.disconnect()
    indexes = await sync_to_async(lambda: list(Turn.objects.filter(session_id="both-speak").order_by("index").values_list("index", flat=True)))()
    assert indexes == list(range(8))


async def test_replay_has_no_gap_or_duplicate_while_turns_finish_during_join():
    """A speaker finishes turns back to back while listeners keep joining: every listener sees
    each turn after its join point exactly once, replayed or live."""
    speaker = Client("/v2/listen?session=race")
    await speaker.connect()
    total = 12

    async def speak():
        for _ in range(total):
            await speaker.send_audio(tone(0.25) + silence(0.6))
            await speaker.recv_turn_end()

    async def listen(delay_turns: int) -> list[int]:
        while len(finals(speaker)) < delay_turns:
            await asyncio.sleep(0.005)
        c = Client("/v2/listen?session=race")
        await c.connect()
        while True:
            got = [m["turn_index"] for m in finals(c)]
            if len(got) >= total:
                break
            await c.recv_until(lambda m: m.get("event") == "EndOfTurn", timeout=20)
        await c.disconnect()
        return [m["turn_index"] for m in finals(c)]

    results = await asyncio.gather(speak(), *(listen(k) for k in (0, 2, 5, 7, 9, 11)))
    for seen in results[1:]:
        assert seen == list(range(total))
    await speaker.disconnect()


async def test_since_replays_only_later_turns_and_pages(settings):
    settings.RELAY_REPLAY_PAGE_SIZE = 3
    a = Client("/v2/listen?session=pages")
    await a.connect()
    for _ in range(7):
        await a.send_audio(tone(0.25) + silence(0.6))
        await a.recv_turn_end()
    await a.disconnect()
    b = Client("/v2/listen?session=pages&since=2")
    await b.connect()
    replay = [await b.recv() for _ in range(4)]
    assert [m["turn_index"] for m in replay] == [3, 4, 5, 6]
    assert all(m["created_at"].endswith("Z") for m in replay)
    done = await b.recv()
    assert done["type"] == "History" and done["turns"] == 4 and done["last_turn_index"] == 6 and done["since"] == 2
    await b.disconnect()


async def _login_cookie(username: str, *, staff: bool = False) -> list[tuple[bytes, bytes]]:
    def make():
        user = get_user_model().objects.create_user(username, password="pw-Relay-123", is_staff=staff)
        http = HttpClient()
        http.force_login(user)
        return [(b"cookie", f"sessionid={http.cookies['sessionid'].value}".encode())]

    return await sync_to_async(make)()


async def test_owned_session_refuses_other_users_and_admits_staff():
    alice = await _login_cookie("alice")
    bob = await _login_cookie("bob")
    staff = await _login_cookie("ops", staff=True)
    a = Client("/v2/listen?session=owned", headers=alice)
    await a.connect()
    for headers in (bob, []):
        intruder = Client("/v2/listen?session=owned", headers=headers)
        await intruder.comm.connect()
        code, seen = await intruder.expect_close()
        assert code == 4003 and seen[-1]["code"] == "FORBIDDEN"
    monitor = Client("/v2/listen?session=owned", headers=staff)
    assert (await monitor.connect())["resumed"] is True
    await monitor.disconnect()
    await a.disconnect()


async def test_ending_a_session_closes_every_connection_and_refuses_new_ones():
    a = Client("/v2/listen?session=to-end")
    b = Client("/v2/listen?session=to-end")
    await a.connect()
    await b.connect()
    await a.send_audio(tone(0.5))
    await a.recv_until(lambda m: m.get("event") == "Update")
    await sync_to_async(services.session_end)(session_id="to-end", reason="maintenance")
    for c in (a, b):
        code, seen = await c.expect_close()
        assert code == 4010 and seen[-1]["code"] == "SESSION_ENDED" and "maintenance" in seen[-1]["description"]
    assert await sync_to_async(Turn.objects.filter(session_id="to-end").count)() == 1  # the open turn was kept
    late = Client("/v2/listen?session=to-end")
    await late.comm.connect()
    code, seen = await late.expect_close()
    assert code == 4010 and seen[0]["code"] == "SESSION_ENDED"


async def test_connections_per_session_are_capped(settings):
    settings.RELAY_MAX_CONNECTIONS_PER_SESSION = 2
    a, b, c = (Client("/v2/listen?session=capped") for _ in range(3))
    await a.connect()
    await b.connect()
    await c.comm.connect()
    code, seen = await c.expect_close()
    assert code == 4013 and seen[-1]["code"] == "SESSION_FULL"
    await b.disconnect()
    d = Client("/v2/listen?session=capped")
    assert (await d.connect())["type"] == "Connected"
    await a.disconnect()
    await d.disconnect()


async def test_a_plain_flux_client_gets_no_relay_messages_but_its_history():
    speaker = Client("/v2/listen?session=plain-flux")
    await speaker.connect()
    await speaker.send_audio(tone(0.5) + silence(0.7))
    await speaker.recv_turn_end()
    plain = Client("/v2/listen?session=plain-flux", relay_events=None)
    assert (await plain.connect())["type"] == "Connected"
    replayed = await plain.recv()
    assert (replayed["type"], replayed["event"], replayed["replayed"]) == ("TurnInfo", "EndOfTurn", True)
    await speaker.send_audio(tone(0.5) + silence(0.7))  # a live turn of the other tab reaches it
    await plain.recv_turn_end()
    await speaker.disconnect()  # its leave is a Presence: not for this client
    await plain.send_json({"type": "CloseStream"})
    await plain.expect_close()
    assert {m["type"] for m in plain.messages} <= {"Connected", "TurnInfo"}, {m["type"] for m in plain.messages}
    await plain.disconnect()


async def test_a_final_the_layer_silently_drops_is_repaired_from_the_store_before_the_next(monkeypatch):
    from channels.layers import get_channel_layer

    speaker = Client("/v2/listen?session=gap")
    listener = Client("/v2/listen?session=gap")
    await speaker.connect()
    await listener.connect()
    layer = get_channel_layer()
    real_send = layer.group_send

    async def lossy(group, message):  # no error anywhere: turn 1's EndOfTurn just never arrives
        if message.get("final") and message.get("turn_index") == 1:
            return
        await real_send(group, message)

    monkeypatch.setattr(layer, "group_send", lossy)
    for _ in range(3):
        await speaker.send_audio(tone(0.25) + silence(0.7))
        await speaker.recv_turn_end()
    finals = [await listener.recv_turn_end() for _ in range(3)]
    assert [(m["turn_index"], m.get("replayed", False)) for m in finals] == [(0, False), (1, True), (2, False)]
    assert not [m for m in listener.messages if m.get("type") == "Warning"]
    await speaker.disconnect()
    await listener.disconnect()
