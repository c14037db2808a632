"""The consumer end to end in-process: WebsocketCommunicator + fake engine + in-memory layer."""
from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from relay.models import Connection, Session, Turn
from tests.support.audio import silence, tone
from tests.support.wsclient import Client

pytestmark = pytest.mark.django_db(transaction=True)

SPEECH = tone(1.0) + silence(0.8)  # one turn: 4 words, EndOfTurn after 500 ms silence


async def test_connected_is_first_and_sequence_ids_count_from_zero():
    c = Client()
    hello = await c.connect()
    assert hello["type"] == "Connected" and hello["sequence_id"] == 0
    assert hello["resumed"] is False and len(hello["session_id"]) == 36 and hello["request_id"]
    await c.send_audio(SPEECH)
    end = await c.recv_turn_end()
    assert [m["sequence_id"] for m in c.messages] == list(range(len(c.messages)))
    assert {m["request_id"] for m in c.messages} == {hello["request_id"]}
    events = [m["event"] for m in c.messages if m["type"] == "TurnInfo"]
    assert events[0] == "StartOfTurn" and events.count("Update") == 4 and events[-1] == "EndOfTurn"
    assert end["transcript"] == "one two three four" and end["trigger"] == "model" and end["turn_index"] == 0
    assert [w["word"] for w in end["words"]] == ["one", "two", "three", "four"]
    assert 0 <= end["audio_window_start"] < end["audio_window_end"]
    await c.disconnect()
    turn = await sync_to_async(Turn.objects.get)(session_id=hello["session_id"])
    assert turn.transcript == "one two three four" and turn.index == 0 and len(turn.words) == 4


async def test_both_paths_speak_the_protocol():
    for path in ("/demo/api/ai/transcription", "/v2/listen?session=both"):
        c = Client(path)
        assert (await c.connect())["type"] == "Connected"
        await c.disconnect()


async def test_force_end_turn_is_manual_and_turn_index_increments():
    c = Client("/v2/listen?session=force")
    await c.connect()
    await c.send_audio(tone(0.6))
    await c.recv_until(lambda m: m.get("event") == "Update")
    await c.send_json({"type": "ForceEndTurn"})
    end = await c.recv_turn_end()
    assert end["trigger"] == "manual" and end["turn_index"] == 0
    await c.send_audio(tone(0.3) + silence(0.7))
    assert (await c.recv_turn_end())["turn_index"] == 1
    await c.disconnect()


async def test_configure_success_and_failure():
    c = Client()
    await c.connect()
    await c.send_json({"type": "Configure", "thresholds": {"eot_threshold": 0.8, "eot_timeout_ms": 2000}})
    ok = await c.recv()
    assert ok["type"] == "ConfigureSuccess" and ok["thresholds"]["eot_threshold"] == 0.8 and ok["thresholds"]["eot_timeout_ms"] == 2000
    await c.send_json({"type": "Configure", "thresholds": {"eot_threshold": 3}})
    bad = await c.recv()
    assert bad["type"] == "ConfigureFailure" and bad["code"] == "INVALID_CONFIGURE" and bad["description"]
    await c.send_json({"type": "KeepAlive"})
    await c.send_json({"type": "Configure", "keyterms": ["Relay"]})
    ok2 = await c.recv()
    assert ok2["type"] == "ConfigureSuccess" and ok2["keyterms"] == ["Relay"]
    assert (await c.recv())["code"] == "KEYTERMS_IGNORED"  # the fake engine cannot honour keyterms: said so
    await c.disconnect()


async def test_close_stream_flushes_the_open_turn_then_closes_normally():
    c = Client("/v2/listen?session=flush")
    await c.connect()
    await c.send_audio(tone(0.6))
    await c.send_json({"type": "CloseStream"})
    code, seen = await c.expect_close()
    assert code == 1000
    end = [m for m in seen if m.get("event") == "EndOfTurn"]
    assert len(end) == 1 and end[0]["trigger"] == "end_of_stream" and end[0]["transcript"] == "one two"
    conn = await sync_to_async(Connection.objects.get)(session_id="flush")
    assert conn.closed_at is not None and conn.close_code == 1000 and conn.audio_bytes == len(tone(0.6))
    assert await sync_to_async(Turn.objects.filter(session_id="flush", trigger="end_of_stream").count)() == 1


async def test_abrupt_disconnect_persists_the_open_turn():
    c = Client("/v2/listen?session=abrupt")
    await c.connect()
    await c.send_audio(tone(0.8))
    await c.recv_until(lambda m: m.get("event") == "Update")
    await c.disconnect(code=1006)
    turn = await sync_to_async(Turn.objects.get)(session_id="abrupt")
    assert turn.trigger == "end_of_stream" and turn.transcript.startswith("one two")
    conn = await sync_to_async(Connection.objects.get)(session_id="abrupt")
    assert conn.close_code == 1006 and conn.closed_at is not None


async def test_reconnect_resumes_and_replays_history_since():
    a = Client("/v2/listen?session=resume")
    await a.connect()
    for _ in range(3):
        await a.send_audio(tone(0.3) + silence(0.6))
        await a.recv_turn_end()
    await a.disconnect()
    b = Client("/v2/listen?session=resume")
    hello = await b.connect()
    assert hello["resumed"] is True and hello["session_id"] == "resume"
    replay = [await b.recv() for _ in range(3)]
    assert [m["turn_index"] for m in replay] == [0, 1, 2] and all(m["replayed"] for m in replay)
    await b.disconnect()
    c = Client("/v2/listen?session=resume&since=1")
    await c.connect()
    replay = await c.recv_until(lambda m: m.get("type") == "TurnInfo")
    assert replay["turn_index"] == 2
    await c.send_audio(tone(0.3) + silence(0.6))
    assert (await c.recv_turn_end())["turn_index"] == 3
    await c.disconnect()


@pytest.mark.parametrize(
    "query,code,close",
    [
        ("session=bad%20id", "INVALID_SESSION", 4008),
        ("session=" + "x" * 200, "INVALID_SESSION", 4008),
        ("encoding=flac", "UNSUPPORTED_ENCODING", 4008),
        ("sample_rate=96000", "UNSUPPORTED_SAMPLE_RATE", 4008),
        ("eot_threshold=7", "INVALID_PARAMETER", 4008),
        ("model=flux-general-multi&language=xx", "INVALID_PARAMETER", 4008),
        ("language=de", "INVALID_PARAMETER", 4008),  # a hint needs flux-general-multi, as on Flux
    ],
)
async def test_bad_connect_parameters_get_error_then_close(query, code, close):
    c = Client("/v2/listen?" + query)
    connected, _ = await c.comm.connect()
    assert connected
    got, seen = await c.expect_close()
    assert got == close and [m["type"] for m in seen] == ["Error"] and seen[0]["code"] == code
    assert seen[0]["sequence_id"] == 0 and seen[0]["description"]


async def test_bad_text_frames_warn_and_keep_the_connection():
    c = Client()
    await c.connect()
    for text in ("hello", "[1]", '{"type":"Dance"}', "{" * 50000):
        await c.comm.send_to(text_data=text)
        warning = await c.recv()
        assert warning["type"] == "Warning" and warning["code"]
    await c.send_audio(SPEECH)
    assert (await c.recv_turn_end())["transcript"] == "one two three four"
    await c.disconnect()


async def test_odd_length_frames_are_reassembled_and_empty_frames_ignored():
    c = Client()
    await c.connect()
    data = tone(1.0) + silence(0.8)
    await c.comm.send_input({"type": "websocket.receive", "bytes": b""})
    await c.send_audio(data, chunk=1001)  # every frame splits a sample
    end = await c.recv_turn_end()
    assert end["transcript"] == "one two three four"
    await c.disconnect()


async def test_frame_over_the_limit_closes_with_4009(settings):
    settings.RELAY_MAX_FRAME_BYTES = 10_000
    c = Client("/v2/listen?session=big")
    await c.connect()
    await c.send_audio(tone(0.6))
    await c.comm.send_to(bytes_data=bytes(10_002))
    code, seen = await c.expect_close()
    assert code == 4009 and seen[-1]["type"] == "Error" and seen[-1]["code"] == "FRAME_TOO_LARGE"
    assert [m["trigger"] for m in seen if m.get("event") == "EndOfTurn"] == ["end_of_stream"]


async def test_unknown_parameter_and_model_get_warnings():
    c = Client("/v2/listen?colour=blue&model=flux-general-multi")
    await c.connect()
    codes = {(await c.recv())["code"], (await c.recv())["code"]}
    assert codes == {"UNKNOWN_PARAMETER", "MODEL_IGNORED"}
    await c.disconnect()


async def test_language_hints_on_the_fake_engine_get_warnings():
    c = Client("/v2/listen?model=flux-general-multi&language=de")
    await c.connect()
    assert {(await c.recv())["code"], (await c.recv())["code"]} == {"MODEL_IGNORED", "LANGUAGE_IGNORED"}
    await c.send_json({"type": "Configure", "language_hints": ["es", "fr"]})
    success = await c.recv()
    assert success["type"] == "ConfigureSuccess" and success["language_hints"] == ["es", "fr"]
    assert (await c.recv())["code"] == "LANGUAGE_IGNORED"
    await c.disconnect()


async def test_mulaw_at_8khz_is_accepted():
    from relay.flux.audio import from_int16

    c = Client("/v2/listen?encoding=mulaw&sample_rate=8000")
    await c.connect()
    pcm = tone(0.6, rate=8000) + silence(0.8, rate=8000)
    await c.send_audio(from_int16(pcm, "mulaw"), chunk=640)
    end = await c.recv_turn_end()
    assert end["transcript"] == "one two"
    await c.disconnect()


async def test_backlog_limit_closes_after_persisting(settings):
    settings.RELAY_ENGINES = {**settings.RELAY_ENGINES, "slow": {"BACKEND": "tests.support.engines.BacklogEngine", "OPTIONS": {}}}
    settings.RELAY_ENGINE = "slow"
    settings.RELAY_MAX_BACKLOG_SECONDS = 2.0
    c = Client("/v2/listen?session=backlog")
    await c.connect()
    await c.send_audio(silence(2.5))
    code, seen = await c.expect_close()
    assert code == 4008 and seen[-1]["code"] == "BACKLOG_EXCEEDED"
    conn = await sync_to_async(Connection.objects.get)(session_id="backlog")
    assert conn.close_code == 4008 and conn.last_error_code == "BACKLOG_EXCEEDED"


async def test_426_on_plain_http(client):
    for path in ("/v2/listen", "/demo/api/ai/transcription"):
        response = await sync_to_async(client.get)(path)
        assert response.status_code == 426 and response["Upgrade"] == "websocket"
        assert response.json()["url"].startswith("ws://")


async def test_cross_site_origin_is_refused():
    c = Client(headers=[(b"origin", b"http://evil.example")])
    connected, _ = await c.comm.connect()
    assert not connected
    ok = Client(headers=[(b"origin", b"http://127.0.0.1:8000")])
    assert (await ok.connect())["type"] == "Connected"
    await ok.disconnect()


async def test_session_row_counts_audio_and_messages():
    c = Client("/v2/listen?session=counters")
    await c.connect()
    await c.send_audio(SPEECH)
    await c.recv_turn_end()
    await c.disconnect()
    conn = await sync_to_async(Connection.objects.get)(session_id="counters")
    session = await sync_to_async(Session.objects.get)(pk="counters")
    assert conn.audio_bytes == len(SPEECH) and abs(session.audio_seconds - len(SPEECH) / 32000) < 1e-6
    assert conn.messages_sent == len(c.messages) and conn.messages_received == -(-len(SPEECH) // 2560)


async def test_engine_error_during_close_stream_reaches_the_client(settings):
    settings.RELAY_ENGINES = {**settings.RELAY_ENGINES, "ff": {"BACKEND": "tests.support.engines.FailOnFinishEngine", "OPTIONS": {}}}
    settings.RELAY_ENGINE = "ff"
    c = Client("/v2/listen?session=fail-finish")
    await c.connect()
    await c.send_json({"type": "CloseStream"})
    code, seen = await c.expect_close()
    assert code == 4011 and seen[-1]["type"] == "Error" and seen[-1]["code"] == "ENGINE_ERROR"
    conn = await sync_to_async(Connection.objects.get)(session_id="fail-finish")
    assert conn.close_code == 4011 and conn.last_error_code == "ENGINE_ERROR"


def slow_flush(settings, *, idle: float, limit: float = 30.0, **options) -> None:
    settings.RELAY_ENGINES = {**settings.RELAY_ENGINES, "sf": {"BACKEND": "tests.support.engines.SlowFlushEngine", "OPTIONS": options}}
    settings.RELAY_ENGINE = "sf"
    settings.RELAY_FLUSH_TIMEOUT_SECONDS = idle
    settings.RELAY_FLUSH_LIMIT_SECONDS = limit


async def test_a_flush_that_makes_progress_may_take_longer_than_the_idle_bound(settings):
    # 8 Updates 0.1 s apart: 0.8 s in all, an event every 0.1 s; the idle bound is 0.3 s.
    slow_flush(settings, idle=0.3, steps=8, step_s=0.1)
    c = Client("/v2/listen?session=slow-flush")
    await c.connect()
    await c.send_audio(tone(0.6))
    await c.send_json({"type": "CloseStream"})
    code, seen = await c.expect_close()
    assert code == 1000 and not [m for m in seen if m["type"] == "Error"]
    end = [m for m in seen if m.get("event") == "EndOfTurn"]
    assert len(end) == 1 and end[0]["trigger"] == "end_of_stream" and end[0]["transcript"] == "one two"
    assert await sync_to_async(Turn.objects.filter(session_id="slow-flush", trigger="end_of_stream").count)() == 1


async def test_a_flush_that_stops_making_progress_is_an_error_and_keeps_what_was_finished(settings):
    slow_flush(settings, idle=0.3, steps=2, step_s=0.1, hang=True)
    c = Client("/v2/listen?session=stuck-flush")
    await c.connect()
    await c.send_audio(SPEECH)
    assert (await c.recv_turn_end())["transcript"] == "one two three four"
    await c.send_audio(tone(0.6))
    await c.send_json({"type": "CloseStream"})
    code, seen = await c.expect_close()
    assert code == 4011 and seen[-1]["type"] == "Error" and seen[-1]["code"] == "FLUSH_INCOMPLETE"
    assert "RELAY_FLUSH_TIMEOUT_SECONDS" in seen[-1]["description"]
    # Two Updates from the 0.6 s tone, then the two the flush made before it stopped: delivered.
    assert [m.get("event") for m in seen].count("Update") == 4
    turns = await sync_to_async(list)(Turn.objects.filter(session_id="stuck-flush").values_list("index", "trigger"))
    assert turns == [(0, "model")]
    conn = await sync_to_async(Connection.objects.get)(session_id="stuck-flush")
    assert conn.close_code == 4011 and conn.last_error_code == "FLUSH_INCOMPLETE"


async def test_a_flush_is_cut_at_its_limit_however_busy_the_engine(settings):
    slow_flush(settings, idle=0.3, limit=0.6, steps=1000, step_s=0.05)
    c = Client("/v2/listen?session=endless-flush")
    await c.connect()
    await c.send_audio(tone(0.6))
    await c.send_json({"type": "CloseStream"})
    code, seen = await c.expect_close()
    assert code == 4011 and seen[-1]["code"] == "FLUSH_INCOMPLETE" and "RELAY_FLUSH_LIMIT_SECONDS" in seen[-1]["description"]
    assert 5 <= [m.get("event") for m in seen].count("Update") < 1000


async def test_a_disconnected_clients_cut_flush_is_recorded(settings):
    slow_flush(settings, idle=0.3, hang=True)
    c = Client("/v2/listen?session=gone-flush")
    await c.connect()
    await c.send_audio(tone(0.6))
    await c.recv_until(lambda m: m.get("event") == "Update")
    await c.disconnect(code=1006)
    conn = await sync_to_async(Connection.objects.get)(session_id="gone-flush")
    assert conn.closed_at is not None and conn.last_error_code == "FLUSH_INCOMPLETE" and conn.error_count == 1
    assert not await sync_to_async(Turn.objects.filter(session_id="gone-flush").exists)()


async def test_a_stopping_process_cuts_a_long_flush_in_time_to_store_and_record_it(settings):
    from relay.live import registry

    slow_flush(settings, idle=5.0, steps=1000, step_s=0.05)  # an engine with 50 s of work left, busy all along
    c = Client("/v2/listen?session=stop-flush")
    await c.connect()
    await c.send_audio(SPEECH)
    await c.recv_turn_end()
    await c.send_audio(tone(0.6))
    await c.recv_until(lambda m: m.get("event") == "Update")
    # SIGTERM's path with a 3 s shutdown timeout: the flush must end by 1.5 s (half of it, as
    # the 2 s margin would leave less), so that the close is recorded before daphne would cancel.
    await registry.end_all_streams(timeout=3.0)
    conn = await sync_to_async(Connection.objects.get)(session_id="stop-flush")
    assert conn.closed_at is not None and conn.close_code == 4012 and conn.last_error_code == "SERVER_RESTARTING"
    code, seen = await c.expect_close()
    assert code == 4012 and seen[-1]["code"] == "SERVER_RESTARTING"
    assert await sync_to_async(list)(Turn.objects.filter(session_id="stop-flush").values_list("index", flat=True)) == [0]
    assert registry.flush_deadline() is None
