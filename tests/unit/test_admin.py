"""The admin with real data: pages render, filters and search find the right rows, actions act."""
from __future__ import annotations

import io
import re
import zipfile
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from relay.models import Connection, Session, Turn
from tests.support import histories

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client):
    user = User.objects.create_superuser("ops", "ops@example.com", "pw")
    client.force_login(user)
    return client


@pytest.fixture
def history():
    now = timezone.now()
    live_proc = histories.process("h:live")
    dead_proc = histories.process("h:dead", heartbeat_age=3600)
    live = histories.session("sess-live", created=now - timedelta(minutes=20), engine="fake", audio_seconds=600.0)
    c1 = histories.connection(live, opened=now - timedelta(minutes=20), duration=None, proc=live_proc, client_addr="10.0.0.9", user_agent="Mozilla/5.0 Firefox")
    histories.connection(live, opened=now - timedelta(minutes=19), duration=None, proc=live_proc)
    histories.turns(live, c1, ["the quick brown fox", "jumps over"])
    idle = histories.session("sess-idle", created=now - timedelta(hours=2), engine="whisper", error_count=2)
    first = histories.connection(idle, opened=now - timedelta(hours=2), duration=30, code=1006)
    histories.connection(idle, opened=first.closed_at + timedelta(seconds=1.2), duration=40, resumed=True, gap_seconds=1.2, code=4011, error_count=2)
    histories.turns(idle, first, ["lazy dog"])
    ended = histories.session("sess-ended", created=now - timedelta(days=1), ended=True, end_reason="Ended by an operator")
    histories.turns(ended, None, ["final words"])
    orphan = histories.session("sess-orphan", created=now - timedelta(hours=3))
    histories.connection(orphan, opened=now - timedelta(hours=3), duration=None, proc=dead_proc)
    return {"live": live, "idle": idle, "ended": ended, "orphan": orphan}


def ids_in(html: str, prefix: str = "sess-") -> set[str]:
    return set(re.findall(r'<th class="field-id"><a href="[^"]+">(' + prefix + r'[\w-]+)</a>', html))


def test_session_list_shows_status_counts_and_columns(staff, history):
    response = staff.get(reverse("admin:relay_session_changelist"))
    assert response.status_code == 200
    html = response.content.decode()
    assert ids_in(html) == {"sess-live", "sess-idle", "sess-ended", "sess-orphan"}
    row = re.search(r'<tr>.*?sess-live.*?</tr>', html, re.S).group(0)
    assert ">live<" in row and '<td class="field-live_connections">2</td>' in row
    assert '<td class="field-turn_count">2</td>' in row and "10 min 00 s" in row  # audio
    orphan_row = re.search(r'<tr>.*?sess-orphan.*?</tr>', html, re.S).group(0)
    assert ">idle<" in orphan_row and '<td class="field-live_connections">0</td>' in orphan_row
    assert "Dashboard" in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status": "live"}, {"sess-live"}),
        ({"status": "idle"}, {"sess-idle", "sess-orphan"}),
        ({"status": "ended"}, {"sess-ended"}),
        ({"engine": "whisper"}, {"sess-idle"}),
        ({"errors": "yes"}, {"sess-idle"}),
        ({"q": "sess-end"}, {"sess-ended"}),
        ({"q": "brown fox"}, {"sess-live"}),
        ({"q": "words"}, {"sess-ended"}),
    ],
)
def test_session_filters_and_search(staff, history, query, expected):
    response = staff.get(reverse("admin:relay_session_changelist"), query)
    assert response.status_code == 200
    assert ids_in(response.content.decode()) == expected


def test_session_page_shows_read_only_turns_and_export_links(staff, history):
    response = staff.get(reverse("admin:relay_session_change", args=["sess-live"]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "the quick brown fox" in html and "jumps over" in html
    assert "/sessions/sess-live/transcript.srt" in html and "/sessions/sess-live/transcript.vtt" in html
    assert 'name="_save"' not in html  # read-only


def test_connection_list_columns_filters_and_search(staff, history):
    url = reverse("admin:relay_connection_changelist")
    html = staff.get(url).content.decode()
    assert "10.0.0.9" in html and "Mozilla/5.0 Firefox" in html and "1.2 s" in html  # gap
    assert ">orphaned<" in html and ">live<" in html

    def sessions(query):
        page = staff.get(url, query).content.decode()
        return sorted(re.findall(r'<td class="field-session_link"><a [^>]+>([\w-]+)</a>', page))

    assert sessions({"outcome": "live"}) == ["sess-live", "sess-live"]
    assert sessions({"outcome": "unclean"}) == ["sess-idle", "sess-idle"]
    assert sessions({"outcome": "orphaned"}) == ["sess-orphan"]
    assert sessions({"resumed": "yes"}) == ["sess-idle"]
    assert sessions({"q": "10.0.0.9"}) == ["sess-live"]
    conn = Connection.objects.filter(session_id="sess-orphan").get()
    assert sessions({"q": str(conn.pk)}) == ["sess-orphan"]
    detail = staff.get(reverse("admin:relay_connection_change", args=[conn.pk]))
    assert detail.status_code == 200


def test_end_session_action_ends_and_notifies_every_process(staff, history, monkeypatch):
    from relay.store import services

    calls = []
    monkeypatch.setattr(services, "session_end", lambda **kw: calls.append(kw) or Session.objects.filter(pk=kw["session_id"]).update(ended_at=timezone.now()))
    response = staff.post(
        reverse("admin:relay_session_changelist"),
        {"action": "end_sessions", "_selected_action": ["sess-live", "sess-ended"]},
        follow=True,
    )
    assert response.status_code == 200
    assert [c["session_id"] for c in calls] == ["sess-live"]
    assert calls[0]["reason"] == "Ended by an operator (ops)"
    assert "Ended 1 session(s). 1 were already ended." in response.content.decode()


def test_end_session_action_uses_the_real_service(staff, history):
    staff.post(reverse("admin:relay_session_changelist"), {"action": "end_sessions", "_selected_action": ["sess-idle"]})
    s = Session.objects.get(pk="sess-idle")
    assert s.ended_at is not None and s.end_reason == "Ended by an operator (ops)"


def test_export_action_zips_four_formats_per_session(staff, history):
    response = staff.post(
        reverse("admin:relay_session_changelist"),
        {"action": "export_transcripts", "_selected_action": ["sess-live", "sess-idle"]},
    )
    assert response["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == sorted(f"transcript-{s}.{f}" for s in ("sess-live", "sess-idle") for f in ("txt", "json", "srt", "vtt"))
    assert archive.read("transcript-sess-live.txt").decode() == "the quick brown fox\njumps over\n"


def test_delete_with_history_summarises_then_deletes_everything(staff, history, monkeypatch):
    from relay.store import services

    ended = []
    real_end = services.session_end
    monkeypatch.setattr(services, "session_end", lambda **kw: ended.append(kw["session_id"]) or real_end(**kw))
    url = reverse("admin:relay_session_changelist")
    confirm = staff.post(url, {"action": "delete_selected", "_selected_action": ["sess-live", "sess-idle"]})
    html = confirm.content.decode()
    assert confirm.status_code == 200 and "2 connection(s)" in html
    assert "<li>Sessions: 2</li>" in html and "<li>Connections: 4</li>" in html and "<li>Turns: 3</li>" in html
    staff.post(url, {"action": "delete_selected", "_selected_action": ["sess-live", "sess-idle"], "post": "yes"})
    assert not Session.objects.filter(pk__in=["sess-live", "sess-idle"]).exists()
    assert not Connection.objects.filter(session_id__in=["sess-live", "sess-idle"]).exists()
    assert not Turn.objects.filter(session_id__in=["sess-live", "sess-idle"]).exists()
    assert Session.objects.filter(pk="sess-ended").exists()
    assert ended == ["sess-live"]  # its live connections were told to close first, once


def test_process_list_renders(staff, history):
    html = staff.get(reverse("admin:relay_relayprocess_changelist")).content.decode()
    assert "h:live" in html and "h:dead" in html and ">orphaned<" in html


def test_dashboard_is_staff_only(client, history):
    url = reverse("admin:relay_dashboard")
    assert client.get(url).status_code == 302  # to the admin login
    User.objects.create_user("plain", password="pw")
    client.login(username="plain", password="pw")
    assert client.get(url).status_code == 302


def test_dashboard_renders_metrics_live_counts_and_chart(staff):
    counts = histories.busy_day()
    response = staff.get(reverse("admin:relay_dashboard"), {"window": "24h"})
    assert response.status_code == 200
    html = response.content.decode()
    levels = dict(re.findall(r'data-metric="(\w+)" data-level="(\w+)"', html))
    assert set(levels) == {"connection_duration", "disconnection_rate", "error_rate", "reconnection_time"}
    assert set(levels.values()) <= {"good", "warn", "bad"}
    assert re.search(r'id="live-sessions">3<', html) and re.search(r'id="live-connections">3<', html)
    data = response.context["data"]
    assert data.turns == counts["turns"]
    assert data.connection_attempts >= counts["connections"] - 1  # the orphan opened 2 h ago, in the window too
    assert "<svg" in html and html.count("<rect") > 24
    assert "Recent unclean closes" in html
    assert data.storage["database_bytes"] > 0 and data.storage["turns"] == counts["turns"]
    if connection.vendor == "postgresql":
        assert data.storage["relay_bytes"] > 0
    for key in ("1h", "6h", "7d", "30d"):
        assert staff.get(reverse("admin:relay_dashboard"), {"window": key}).status_code == 200


def test_app_index_links_to_the_dashboard(staff):
    html = staff.get(reverse("admin:app_list", args=["relay"])).content.decode()
    assert reverse("admin:relay_dashboard") in html
