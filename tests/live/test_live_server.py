"""A real daphne process and the `websockets` client library streaming a WAV (fake engine)."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from tests.support.audio import silence, tone
from tests.support.live import LiveServer, sqlite_env, stream_audio

pytestmark = [pytest.mark.slow, pytest.mark.live]



def test_daphne_streams_turns_and_persists_history(tmp_path):
    env = sqlite_env(tmp_path)
    audio = (tone(0.75) + silence(0.7)) * 3 + tone(0.5)
    with LiveServer(env) as server:
        first = asyncio.run(stream_audio(server.ws_url + "/v2/listen?session=live-1", audio))
        assert first[0]["type"] == "Connected" and first[0]["session_id"] == "live-1"
        ends = [m for m in first if m.get("event") == "EndOfTurn"]
        assert [e["transcript"] for e in ends] == ["one two three"] * 3 + ["one two"]
        assert [e["trigger"] for e in ends] == ["model"] * 3 + ["end_of_stream"]
        again = asyncio.run(stream_audio(server.ws_url + "/demo/api/ai/transcription?session=live-1&since=1", b""))
        assert again[0]["resumed"] is True
        assert [m["turn_index"] for m in again if m.get("type") == "TurnInfo"] == [2, 3]
    db = sqlite3.connect(env["DATABASE_URL"].removeprefix("sqlite:///"))
    rows = db.execute("select idx, transcript, trigger from relay_turn where session_id='live-1' order by idx".replace("idx", "\"index\"")).fetchall()
    assert rows == [(0, "one two three", "model"), (1, "one two three", "model"), (2, "one two three", "model"), (3, "one two", "end_of_stream")]
    closed = db.execute("select close_code from relay_connection where session_id='live-1' order by opened_at").fetchall()
    assert closed == [(1000,), (1000,)]
