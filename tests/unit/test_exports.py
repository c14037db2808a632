"""Transcript exports in four formats, round-tripped through parser libraries; access rules."""
from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
import srt
import webvtt
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.utils import timezone

from relay.ops import exports
from relay.models import Session, Turn
from relay.store import selectors
from tests.support import histories

pytestmark = pytest.mark.django_db(transaction=True)

TEXTS = ["hello there", "a <b> & c --> d", "third turn"]


async def fetch(client, sid: str, fmt: str, **extra) -> tuple[int, bytes, object]:
    response = await client.get(f"/sessions/{sid}/transcript.{fmt}", **extra)
    if response.status_code != 200:
        return response.status_code, response.content, response
    body = b"".join([chunk async for chunk in response.streaming_content])
    return 200, body, response


@sync_to_async
def one_speaker(sid: str = "exp-1") -> Session:
    s = histories.session(sid, created=timezone.now() - timedelta(minutes=5))
    c = histories.connection(s, opened=s.created_at, duration=30)
    histories.turns(s, c, TEXTS)  # windows 0-1.5, 2-3.5, 4-5.5
    return s


async def test_txt_is_one_line_per_turn(async_client):
    await one_speaker()
    status, body, response = await fetch(async_client, "exp-1", "txt")
    assert status == 200 and response["Content-Type"] == "text/plain; charset=utf-8"
    assert body.decode() == "hello there\na <b> & c --> d\nthird turn\n"
    assert response["Content-Disposition"] == 'inline; filename="transcript-exp-1.txt"'
    _, _, response = await fetch(async_client, "exp-1", "txt", QUERY_STRING="download=1")
    assert response["Content-Disposition"].startswith("attachment;")


async def test_json_carries_every_field(async_client):
    await one_speaker()
    status, body, _ = await fetch(async_client, "exp-1", "json")
    data = json.loads(body)
    assert data["session"]["id"] == "exp-1" and data["session"]["engine"] == "fake"
    assert [t["index"] for t in data["turns"]] == [0, 1, 2]
    first = data["turns"][0]
    assert first["transcript"] == "hello there" and first["start"] == 0.0 and first["end"] == 1.5
    assert [w["word"] for w in first["words"]] == ["hello", "there"]
    assert first["trigger"] == "model" and first["speaker"] == "" and first["connection_id"]


async def test_srt_round_trips_through_the_srt_library(async_client):
    await one_speaker()
    _, body, response = await fetch(async_client, "exp-1", "srt")
    assert response["Content-Type"].startswith("application/x-subrip")
    subs = list(srt.parse(body.decode()))
    assert [s.index for s in subs] == [1, 2, 3]
    assert [s.content for s in subs] == TEXTS
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [(0, 1.5), (2, 3.5), (4, 5.5)]


async def test_vtt_round_trips_through_webvtt_py(async_client):
    await one_speaker()
    _, body, response = await fetch(async_client, "exp-1", "vtt")
    assert response["Content-Type"] == "text/vtt; charset=utf-8"
    captions = webvtt.from_buffer(io.StringIO(body.decode())).captions
    assert [c.identifier for c in captions] == ["turn-0", "turn-1", "turn-2"]
    assert [c.text for c in captions] == ["hello there", "a &lt;b&gt; &amp; c --&gt; d", "third turn"]
    assert [(c.start, c.end) for c in captions] == [
        ("00:00:00.000", "00:00:01.500"), ("00:00:02.000", "00:00:03.500"), ("00:00:04.000", "00:00:05.500"),
    ]


@sync_to_async
def two_tabs_and_a_reconnect() -> None:
    s = histories.session("tabs", created=timezone.now() - timedelta(minutes=10))
    a = histories.connection(s, opened=s.created_at, duration=60)
    b = histories.connection(s, opened=s.created_at + timedelta(seconds=10), duration=60)  # concurrent with a
    histories.turns(s, a, ["from tab a"], start_index=0)
    histories.turns(s, b, ["from tab b"], start_index=1)


async def test_concurrent_tabs_are_labelled_and_placed_on_the_session_timeline(async_client):
    await two_tabs_and_a_reconnect()
    _, body, _ = await fetch(async_client, "tabs", "txt")
    assert body.decode() == "Speaker 1: from tab a\nSpeaker 2: from tab b\n"
    _, body, _ = await fetch(async_client, "tabs", "srt")
    subs = list(srt.parse(body.decode()))
    assert subs[1].start.total_seconds() == 10.0 and subs[1].content == "Speaker 2: from tab b"
    _, body, _ = await fetch(async_client, "tabs", "vtt")
    captions = webvtt.from_buffer(io.StringIO(body.decode())).captions
    assert captions[1].voice == "Speaker 2" and captions[1].text == "from tab b"


@sync_to_async
def sequential_reconnects() -> None:
    s = histories.session("seq", created=timezone.now() - timedelta(minutes=10))
    a = histories.connection(s, opened=s.created_at, duration=20)
    b = histories.connection(s, opened=s.created_at + timedelta(seconds=21), duration=20, resumed=True, gap_seconds=1.0)
    histories.turns(s, a, ["before the drop"], start_index=0)
    histories.turns(s, b, ["after the drop"], start_index=1)


async def test_sequential_reconnects_read_as_one_voice(async_client):
    await sequential_reconnects()
    _, body, _ = await fetch(async_client, "seq", "txt")
    assert body.decode() == "before the drop\nafter the drop\n"
    _, body, _ = await fetch(async_client, "seq", "srt")
    assert [s.start.total_seconds() for s in srt.parse(body.decode())] == [0.0, 21.0]


async def test_long_histories_are_paged(async_client, settings):
    settings.RELAY_EXPORT_PAGE_SIZE = 7

    @sync_to_async
    def build():
        s = histories.session("long")
        histories.turns(s, histories.connection(s, opened=s.created_at, duration=1), [f"turn {i}" for i in range(50)])

    await build()
    _, body, _ = await fetch(async_client, "long", "json")
    assert [t["transcript"] for t in json.loads(body)["turns"]] == [f"turn {i}" for i in range(50)]
    _, body, _ = await fetch(async_client, "long", "srt")
    assert [s.index for s in srt.parse(body.decode())] == list(range(1, 51))


async def test_an_empty_session_exports_valid_empty_documents(async_client):
    await sync_to_async(histories.session)("empty")
    assert (await fetch(async_client, "empty", "txt"))[1] == b""
    assert json.loads((await fetch(async_client, "empty", "json"))[1])["turns"] == []
    assert list(srt.parse((await fetch(async_client, "empty", "srt"))[1].decode())) == []
    assert (await fetch(async_client, "empty", "vtt"))[1] == b"WEBVTT\n\n"


async def test_unknown_session_or_format_is_404(async_client):
    assert (await async_client.get("/sessions/nope/transcript.txt")).status_code == 404
    await one_speaker()
    assert (await async_client.get("/sessions/exp-1/transcript.docx")).status_code == 404
    assert (await async_client.post("/sessions/exp-1/transcript.txt")).status_code == 405


@sync_to_async
def owned() -> tuple[User, User, User]:
    owner = User.objects.create_user("owner", password="pw")
    other = User.objects.create_user("other", password="pw")
    staff = User.objects.create_user("staff", password="pw", is_staff=True)
    s = histories.session("mine", owner=owner)
    histories.turns(s, histories.connection(s, opened=s.created_at, duration=1), ["private words"])
    return owner, other, staff


async def test_owned_sessions_follow_the_join_rules(async_client):
    owner, other, staff = await owned()
    status, body, _ = await fetch(async_client, "mine", "txt")
    assert status == 403 and b"belongs to another user" in body
    await async_client.aforce_login(other)
    assert (await fetch(async_client, "mine", "txt"))[0] == 403
    await async_client.aforce_login(owner)
    assert (await fetch(async_client, "mine", "txt"))[1] == b"private words\n"
    await async_client.aforce_login(staff)
    assert (await fetch(async_client, "mine", "txt"))[1] == b"private words\n"


async def test_ended_sessions_stay_exportable(async_client):
    @sync_to_async
    def build():
        s = histories.session("done", ended=True)
        histories.turns(s, histories.connection(s, opened=s.created_at, duration=1), ["the end"])

    await build()
    assert (await fetch(async_client, "done", "txt"))[1] == b"the end\n"


def test_sync_export_matches_for_admin_actions(db):
    s = histories.session("sync")
    histories.turns(s, histories.connection(s, opened=s.created_at, duration=1), TEXTS)
    assert exports.export_text(session=s, fmt="txt") == "".join(t + "\n" for t in TEXTS)
    assert [x.content for x in srt.parse(exports.export_text(session=s, fmt="srt"))] == TEXTS


async def test_json_carries_detected_languages(async_client):
    @sync_to_async
    def build():
        s = histories.session("langs")
        made = histories.turns(s, histories.connection(s, opened=s.created_at, duration=1), ["hola", "hello"])
        Turn.objects.filter(pk=made[0].pk).update(languages=["es"])

    await build()
    turns = json.loads((await fetch(async_client, "langs", "json"))[1])["turns"]
    assert [t["languages"] for t in turns] == [["es"], []]


@pytest.mark.parametrize("count,page_size", [(0, 3), (5, 3), (6, 3), (6, 10)])
def test_turn_pages_read_every_turn_once_in_pages(db, count, page_size):
    s = histories.session(f"pages-{count}-{page_size}")
    histories.turns(s, histories.connection(s, opened=s.created_at, duration=1), [f"t{i}" for i in range(count)])
    pages = list(selectors.turn_pages(session_id=s.pk, page_size=page_size))
    assert all(pages) and all(len(p) <= page_size for p in pages)
    assert [r["index"] for p in pages for r in p] == list(range(count))
    after = [r["index"] for p in selectors.turn_pages(session_id=s.pk, after_index=1, page_size=page_size) for r in p]
    assert after == list(range(2, count))


async def test_aturn_pages_matches_turn_pages(db):
    @sync_to_async
    def build():
        s = histories.session("apages")
        histories.turns(s, histories.connection(s, opened=s.created_at, duration=1), [f"t{i}" for i in range(7)])

    await build()
    pages = [[r["index"] for r in p] async for p in selectors.aturn_pages(session_id="apages", after_index=0, page_size=3)]
    assert pages == [[1, 2, 3], [4, 5, 6]]
