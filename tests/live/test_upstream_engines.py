"""The deepgram and cloudflare engines against a local fake Flux server, through the consumer.

The sans-I/O parts (relay.engines.upstream.flux_client) first (no sockets), then whole streams: a
WebsocketCommunicator client, the real consumer, the engine, and tests.support.fakeflux in the same loop.
"""
from __future__ import annotations

import json
import logging
import re

import pytest
from asgiref.sync import sync_to_async

from relay.engines import get_engine
from relay.engines.base import StreamOptions, TurnEvent, Word
from relay.engines.upstream.engine import Secret, UpstreamConfig
from relay.engines.upstream.flux_client import (
    BadUpstreamMessage,
    TurnMapper,
    configure_message,
    flux_query,
    loggable_url,
    parse_server_message,
    with_query,
)
from relay.models import Connection, Session, Turn
from tests.support.audio import silence, tone
from tests.support.fakeflux import FakeFlux, Plan
from tests.support.opus import ogg_opus, opus_packets
from tests.support.wsclient import Client

KEY = "dg-secret-key-0123456789"
CF_TOKEN = "cf-secret-token-9876543210"
SPEECH = tone(1.0) + silence(0.8)  # one turn: "one two three four"


# --- sans-I/O ---------------------------------------------------------------------------------------
def test_flux_query_passes_the_client_parameters_through():
    options = StreamOptions(eot_threshold=0.8, eot_timeout_ms=3000, keyterms=["Relay", "a b"], extra={"tag": ["t1"]})
    assert flux_query(options) == (
        "model=flux-general-en&encoding=linear16&sample_rate=16000&eot_threshold=0.8&eot_timeout_ms=3000"
        "&keyterm=Relay&keyterm=a+b&tag=t1"
    )
    assert flux_query(StreamOptions(), include_model=False) == "encoding=linear16&sample_rate=16000"
    multi = StreamOptions(model="flux-general-multi", language_hints=["de", "pt-BR"])
    assert flux_query(multi) == "model=flux-general-multi&encoding=linear16&sample_rate=16000&language_hint=de&language_hint=pt-BR"
    assert flux_query(multi, include_model=False) == "encoding=linear16&sample_rate=16000"  # Cloudflare: English only
    assert json.loads(configure_message(None, None, ["es"])) == {"type": "Configure", "language_hints": ["es"]}
    assert with_query("wss://gw.example/v2/listen?x=1", "a=2") == "wss://gw.example/v2/listen?x=1&a=2"
    assert loggable_url("wss://user:pw@gw.example:8443/v2/listen?keyterm=secret") == "wss://gw.example:8443/v2/listen"


def test_server_messages_parse_or_raise():
    msg = parse_server_message(
        json.dumps(
            {
                "type": "TurnInfo", "event": "EndOfTurn", "turn_index": 2, "audio_window_start": 1.0,
                "audio_window_end": 2.5, "transcript": "hi there", "words": [{"word": "hi", "confidence": 0.9}],
                "end_of_turn_confidence": 0.8, "trigger": "model", "sequence_id": 7,
            }
        )
    )
    assert msg.event == TurnEvent("EndOfTurn", 2, "hi there", [Word("hi", 0.9)], 1.0, 2.5, 0.8, "model")
    assert parse_server_message('{"type": "Connected", "request_id": "r"}').type == "Connected"
    for bad in ("{x", "[1]", '{"type": 3}', '{"type": "TurnInfo", "event": "Update"}',
                '{"type": "TurnInfo", "event": "Nope", "turn_index": 0}',
                '{"type": "TurnInfo", "event": "Update", "turn_index": 0, "audio_window_start": "x", "audio_window_end": 1}'):
        with pytest.raises(BadUpstreamMessage):
            parse_server_message(bad)


def test_turn_mapper_keeps_numbering_across_sources():
    m = TurnMapper()

    def ev(event, turn, words):
        return TurnEvent(event, turn, " ".join(words), [Word(w, 1.0) for w in words])

    out = m.map(ev("StartOfTurn", 0, [])) + m.map(ev("Update", 0, ["a"])) + m.map(ev("EndOfTurn", 0, ["a"]))
    assert [(e.event, e.turn) for e in out] == [("StartOfTurn", 0), ("Update", 0), ("EndOfTurn", 0)]
    m.map(ev("StartOfTurn", 1, []))
    m.map(ev("Update", 1, ["b", "c"]))
    m.new_source()  # reconnected mid-turn: the new source numbers from 0 and replays the turn
    out = [e for w in (["b"], ["b", "c"], ["b", "c", "d"]) for e in m.map(ev("Update", 0, w))]
    assert [(e.event, e.turn, e.transcript) for e in out] == [("Update", 1, "b c d")]
    assert [(e.event, e.turn) for e in m.map(ev("EndOfTurn", 0, ["b", "c", "d"]))] == [("EndOfTurn", 1)]
    m.map(ev("Update", 1, ["e"]))
    skipped = m.map(ev("Update", 2, ["f"]))  # the source moved on without an EndOfTurn we could read
    assert [(e.event, e.turn, e.transcript) for e in skipped] == [("EndOfTurn", 2, "e"), ("Update", 3, "f")]
    assert [(e.event, e.trigger, e.transcript) for e in m.close("end_of_stream")] == [("EndOfTurn", "end_of_stream", "f")]
    assert m.close("end_of_stream") == []


def test_config_comes_from_options_then_settings(settings):
    settings.RELAY_UPSTREAM_STALL_SECONDS = 2.5
    config = UpstreamConfig.resolve({"fallback_engine": "fake"})
    assert config.stall_seconds == 2.5 and config.fallback_engine == "fake"
    assert config.backoff(0) == 0 and 0 < config.backoff(3) <= config.backoff_initial * 4
    assert "k3y" not in repr(Secret("k3y")) and "k3y" not in str(Secret("k3y")) and Secret("k3y").reveal() == "k3y"


# --- whole streams ----------------------------------------------------------------------------------
pytestmark_db = pytest.mark.django_db(transaction=True)


@pytest.fixture
def upstream(settings):
    """Point the deepgram/cloudflare engines at a fake server, with test-sized timeouts."""

    def configure(fake: FakeFlux | None, *, alias: str = "deepgram", port: int | None = None, **overrides):
        base = fake.url() if fake else f"ws://127.0.0.1:{port}/v2/listen"
        settings.DEEPGRAM_URL = base
        settings.DEEPGRAM_API_KEY = KEY
        settings.CLOUDFLARE_URL = base.replace("/v2/listen", "/client/v4/accounts/{account_id}/ai/run/@cf/deepgram/flux")
        settings.CLOUDFLARE_ACCOUNT_ID = "acct-123"
        settings.CLOUDFLARE_API_TOKEN = CF_TOKEN
        values = {
            "CONNECT_TIMEOUT_SECONDS": 5.0,
            "STALL_SECONDS": 1.0,
            "KEEPALIVE_SECONDS": 1.0,
            "BACKOFF_INITIAL_SECONDS": 0.02,
            "BACKOFF_MAX_SECONDS": 0.1,
            "FALLBACK_AFTER_SECONDS": 0.5,
            "FALLBACK_ENGINE": "fake",
            "CLOSE_TIMEOUT_SECONDS": 3.0,
            "REPLAY_SECONDS": 30.0,
            **overrides,
        }
        for name, value in values.items():
            setattr(settings, f"RELAY_UPSTREAM_{name}", value)
        settings.RELAY_ENGINES = {**settings.RELAY_ENGINES}  # rebuild engines
        settings.RELAY_ENGINE = alias

    return configure


def turn_infos(messages, event=None):
    return [m for m in messages if m.get("type") == "TurnInfo" and (event is None or m["event"] == event)]


def warnings(messages):
    return [m["code"] for m in messages if m.get("type") == "Warning"]


async def turns_of(session):
    return await sync_to_async(lambda: list(Turn.objects.filter(session_id=session).order_by("index").values_list("index", "transcript", "trigger")))()


@pytestmark_db
async def test_deepgram_relays_turns_with_header_parameters_and_controls(upstream):
    async with FakeFlux(api_key=KEY) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=dg-happy&eot_threshold=0.8&keyterm=Relay&keyterm=Flux")
        hello = await c.connect()
        assert hello["engine"] == "deepgram"
        conn = fake.connections[0]
        assert conn.headers["Authorization"] == f"Token {KEY}" and conn.path == "/v2/listen"
        assert conn.query == {
            "model": ["flux-general-en"], "encoding": ["linear16"], "sample_rate": ["16000"],
            "eot_threshold": ["0.8"], "keyterm": ["Relay", "Flux"],
        }
        await c.send_audio(SPEECH)
        first = await c.recv_turn_end()
        assert (first["turn_index"], first["transcript"], first["trigger"]) == (0, "one two three four", "model")
        assert [w["word"] for w in first["words"]] == ["one", "two", "three", "four"]

        await c.send_json({"type": "Configure", "thresholds": {"eot_timeout_ms": 2000}, "keyterms": ["Django"]})
        ok = await c.recv_until(lambda m: m.get("type", "").startswith("Configure"))
        assert ok["type"] == "ConfigureSuccess" and ok["thresholds"]["eot_timeout_ms"] == 2000 and ok["keyterms"] == ["Django"]
        assert conn.received("Configure")[-1] == {"type": "Configure", "thresholds": {"eot_timeout_ms": 2000}, "keyterms": ["Django"]}

        await c.send_audio(tone(0.6))
        await c.recv_until(lambda m: m.get("event") == "Update" and m["turn_index"] == 1)
        await c.send_json({"type": "ForceEndTurn"})
        forced = await c.recv_turn_end()
        assert (forced["turn_index"], forced["trigger"]) == (1, "manual")

        await c.send_audio(tone(0.6))
        await c.recv_until(lambda m: m.get("event") == "Update" and m["turn_index"] == 2 and m["transcript"] == "one two")
        await c.send_json({"type": "CloseStream"})
        code, seen = await c.expect_close()
        assert code == 1000
        # Flux sends no EndOfTurn on CloseStream: the relay ends the open turn from its last Update.
        assert [(m["turn_index"], m["transcript"], m["trigger"]) for m in turn_infos(seen, "EndOfTurn")] == [(2, "one two", "end_of_stream")]
        assert conn.received("CloseStream") and conn.close_code == 1000
        assert len(fake.connections) == 1 and not warnings(c.messages)
        assert [m["sequence_id"] for m in c.messages] == list(range(len(c.messages)))
    assert await turns_of("dg-happy") == [(0, "one two three four", "model"), (1, "one two", "manual"), (2, "one two", "end_of_stream")]


@pytestmark_db
async def test_configure_refused_upstream_is_a_configure_failure_and_changes_nothing(upstream):
    async with FakeFlux(api_key=KEY, plans={0: Plan(refuse_configure=True)}) as fake:
        upstream(fake)
        c = Client("/v2/listen?eot_threshold=0.6")
        await c.connect()
        await c.send_json({"type": "Configure", "thresholds": {"eot_threshold": 0.9}})
        refused = await c.recv()
        assert refused["type"] == "ConfigureFailure" and refused["description"] == "The fake refuses this configuration."
        assert fake.connections[0].received("Configure") == [{"type": "Configure", "thresholds": {"eot_threshold": 0.9}}]
        fake.plans.clear()
        await c.disconnect()


@pytestmark_db
async def test_cloudflare_uses_bearer_token_account_url_and_no_model(upstream):
    async with FakeFlux(api_key=CF_TOKEN, scheme="Bearer") as fake:
        upstream(fake, alias="cloudflare")
        c = Client("/v2/listen?session=cf&model=flux-general-multi")
        hello = await c.connect()
        assert hello["engine"] == "cloudflare"
        assert (await c.recv())["code"] == "MODEL_IGNORED"
        conn = fake.connections[0]
        assert conn.path == "/client/v4/accounts/acct-123/ai/run/@cf/deepgram/flux"
        assert conn.headers["Authorization"] == f"Bearer {CF_TOKEN}"
        assert conn.query == {"encoding": ["linear16"], "sample_rate": ["16000"]}
        await c.send_audio(SPEECH)
        assert (await c.recv_turn_end())["transcript"] == "one two three four"
        await c.disconnect()
        refused = Client("/v2/listen?encoding=mulaw&sample_rate=8000")
        await refused.comm.connect()
        code, seen = await refused.expect_close()
        assert seen[0]["code"] == "UNSUPPORTED_ENCODING"


@pytestmark_db
@pytest.mark.parametrize("status", [401, 403])
async def test_auth_rejection_is_an_error_and_close_without_retry(upstream, status):
    async with FakeFlux(api_key=KEY, reject_status=status) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=auth")
        connected, _ = await c.comm.connect()
        assert connected
        code, seen = await c.expect_close()
        assert code == 4011 and [m["type"] for m in seen] == ["Error"]
        assert seen[0]["code"] == "UPSTREAM_AUTH_FAILED" and str(status) in seen[0]["description"]
        assert fake.attempts == 1 and fake.rejected == [status]


@pytestmark_db
async def test_wrong_key_gets_401_and_a_key_revoked_mid_stream_ends_the_stream(upstream):
    async with FakeFlux(api_key="not-the-relays-key") as fake:
        upstream(fake)
        c = Client()
        await c.comm.connect()
        code, seen = await c.expect_close()
        assert code == 4011 and seen[0]["code"] == "UPSTREAM_AUTH_FAILED" and fake.rejected == [401]

    async with FakeFlux(api_key=KEY, plans={0: Plan(drop_after_turninfo=7)}) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=revoked")
        await c.connect()
        await c.send_audio(SPEECH)
        await c.recv_turn_end()
        fake.api_key = "rotated"
        await c.send_audio(tone(0.6))  # the drop comes in this turn; the reconnect meets a 401
        code, seen = await c.expect_close()
        assert code == 4011 and seen[-1]["type"] == "Error" and seen[-1]["code"] == "UPSTREAM_AUTH_FAILED"
        assert fake.rejected == [401] and len(fake.connections) == 1
    assert (await turns_of("revoked"))[0] == (0, "one two three four", "model")


@pytestmark_db
@pytest.mark.parametrize("refusal", [("UNAUTHORIZED", 4001), ("FORBIDDEN", 4003)])
async def test_refusal_after_the_handshake_is_an_error_instead_of_connected(upstream, refusal):
    # A relay upstream accepts the socket and then refuses the token: Error, close 4001. start()
    # waits for the upstream's first word, so the client never sees Connected. A keepalive longer
    # than the read timeout: the clean-up of the refused link must not wait for it.
    async with FakeFlux(api_key=KEY, plans={0: Plan(refuse_in_band=refusal)}) as fake:
        upstream(fake, KEEPALIVE_SECONDS=60.0)
        c = Client("/v2/listen?session=refused-in-band")
        connected, _ = await c.comm.connect()
        assert connected
        code, seen = await c.expect_close(timeout=5)
        assert code == 4011 and [m["type"] for m in seen] == ["Error"] and seen[0]["code"] == "UPSTREAM_AUTH_FAILED"
        assert len(fake.connections) == 1 and fake.attempts == 1  # never retried


@pytestmark_db
async def test_drop_mid_turn_reconnects_resends_and_keeps_numbering(upstream):
    # Turn 0: StartOfTurn, 3 Updates, EndOfTurn (5 TurnInfos); turn 1 drops after StartOfTurn + 2 Updates.
    async with FakeFlux(api_key=KEY, plans={0: Plan(drop_after_turninfo=8)}) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=drop")
        await c.connect()
        await c.send_audio(tone(0.75) + silence(0.7) + tone(1.0) + silence(0.8))
        first = await c.recv_turn_end()
        second = await c.recv_turn_end()
        assert (first["turn_index"], first["transcript"]) == (0, "one two three")
        assert (second["turn_index"], second["transcript"], second["trigger"]) == (1, "one two three four", "model")
        codes = warnings(c.messages)
        assert codes[:2] == ["UPSTREAM_RECONNECTING", "UPSTREAM_RECONNECTED"]
        infos = turn_infos(c.messages)
        # The client sees turn 1 go on across the reconnect: one StartOfTurn, growing Updates.
        turn1 = [(m["event"], len(m["words"])) for m in infos if m["turn_index"] == 1]
        assert turn1 == [("StartOfTurn", 0), ("Update", 1), ("Update", 2), ("Update", 3), ("Update", 4), ("EndOfTurn", 4)]
        assert [m["turn_index"] for m in infos] == sorted(m["turn_index"] for m in infos)
        # Times are on the stream's clock, not the new connection's.
        start1 = next(m for m in infos if m["turn_index"] == 1)["audio_window_start"]
        assert second["audio_window_start"] == start1 == pytest.approx(1.45, abs=0.011)
        assert second["words"][0]["start"] == pytest.approx(1.45, abs=0.011)
        # Only the unanswered audio went again: from turn 0's end, minus the lead-in kept before turn 1.
        assert len(fake.connections) == 2
        assert fake.connections[1].audio_bytes < len(tone(1.0) + silence(0.8) + silence(0.7))
        await c.send_audio(tone(0.3) + silence(0.6))
        assert (await c.recv_turn_end())["turn_index"] == 2
        await c.disconnect()
    assert [t[:2] for t in await turns_of("drop")] == [(0, "one two three"), (1, "one two three four"), (2, "one")]


@pytestmark_db
async def test_stall_inside_a_turn_reconnects(upstream):
    # Connected, StartOfTurn, Update: then silence from the upstream, connection still up.
    async with FakeFlux(api_key=KEY, plans={0: Plan(stall_after_messages=3)}) as fake:
        upstream(fake, STALL_SECONDS=0.5)
        c = Client("/v2/listen?session=stall")
        await c.connect()
        await c.send_audio(SPEECH)
        end = await c.recv_turn_end()
        assert (end["turn_index"], end["transcript"]) == (0, "one two three four")
        assert "UPSTREAM_RECONNECTING" in warnings(c.messages) and len(fake.connections) == 2
        await c.disconnect()


@pytestmark_db
async def test_stall_before_any_turn_is_probed_then_reconnected(upstream):
    # Only Connected, then nothing: loud audio goes unanswered, the liveness probe too.
    async with FakeFlux(api_key=KEY, plans={0: Plan(stall_after_messages=1)}) as fake:
        upstream(fake, STALL_SECONDS=0.5)
        c = Client()
        await c.connect()
        await c.send_audio(SPEECH)
        end = await c.recv_turn_end()
        assert end["transcript"] == "one two three four" and end["turn_index"] == 0
        assert fake.connections[0].received("Configure")  # the probe, unanswered
        assert len(fake.connections) == 2
        await c.disconnect()


@pytestmark_db
async def test_loud_noise_without_turns_is_probed_not_reconnected(upstream):
    async with FakeFlux(api_key=KEY, plans={0: Plan(deaf=True)}) as fake:
        upstream(fake, STALL_SECONDS=0.5)
        c = Client()
        await c.connect()
        await c.send_audio(tone(2.0))
        await fake.wait_for(lambda: any(m["type"] == "ConfigureSuccess" for m in fake.connections[0].sent))
        await c.send_json({"type": "CloseStream"})
        code, seen = await c.expect_close()
        assert code == 1000 and not warnings(c.messages) and len(fake.connections) == 1


@pytestmark_db
async def test_malformed_upstream_frames_are_skipped(upstream, caplog):
    async with FakeFlux(api_key=KEY, plans={0: Plan(junk_before_turninfo=3)}) as fake:
        upstream(fake)
        c = Client()
        await c.connect()
        await c.send_audio(SPEECH)
        end = await c.recv_turn_end()
        assert end["transcript"] == "one two three four"
        assert [m["event"] for m in turn_infos(c.messages)] == ["StartOfTurn"] + ["Update"] * 4 + ["EndOfTurn"]
        assert not warnings(c.messages) and len(fake.connections) == 1
        await c.disconnect()
    assert caplog.text.count("upstream_bad_message") == 3


@pytestmark_db
async def test_upstream_error_message_reconnects(upstream):
    async with FakeFlux(api_key=KEY, plans={0: Plan(error_after_connect=("INTERNAL_SERVER_ERROR", 1011))}) as fake:
        upstream(fake)
        c = Client()
        await c.connect()
        await c.send_audio(SPEECH)
        assert (await c.recv_turn_end())["transcript"] == "one two three four"
        assert len(fake.connections) == 2
        await c.disconnect()


@pytestmark_db
async def test_fallback_after_the_upstream_stays_unreachable(upstream):
    async with FakeFlux(api_key=KEY, refuse_after=1, plans={0: Plan(drop_after_turninfo=3)}) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=fallback")
        await c.connect()
        await c.send_audio(SPEECH)
        end = await c.recv_turn_end()
        assert (end["turn_index"], end["transcript"]) == (0, "one two three four")
        codes = warnings(c.messages)
        assert codes[0] == "UPSTREAM_RECONNECTING" and "UPSTREAM_FALLBACK" in codes
        fallback = next(m for m in c.messages if m.get("code") == "UPSTREAM_FALLBACK")
        assert "'fake'" in fallback["description"]
        assert fake.rejected and set(fake.rejected) == {503}
        await c.send_audio(tone(0.5) + silence(0.7))  # now served by the fake engine in-process
        assert (await c.recv_turn_end())["turn_index"] == 1
        await c.send_json({"type": "CloseStream"})
        assert (await c.expect_close())[0] == 1000
    assert [t[:2] for t in await turns_of("fallback")] == [(0, "one two three four"), (1, "one two")]


@pytestmark_db
async def test_unreachable_from_the_start_falls_back(upstream):
    from tests.support.live import free_port

    upstream(None, port=free_port())
    c = Client()
    hello = await c.connect()
    assert hello["type"] == "Connected"
    await c.send_audio(SPEECH)
    end = await c.recv_turn_end()
    assert end["transcript"] == "one two three four"
    assert warnings(c.messages)[0] == "UPSTREAM_RECONNECTING" and "UPSTREAM_FALLBACK" in warnings(c.messages)
    await c.disconnect()


@pytestmark_db
async def test_no_fallback_engine_is_an_error(upstream):
    from tests.support.live import free_port

    upstream(None, port=free_port(), FALLBACK_ENGINE="")
    c = Client()
    await c.comm.connect()
    code, seen = await c.expect_close()
    assert code == 4013 and [m["type"] for m in seen] == ["Error"] and seen[0]["code"] == "ENGINE_UNAVAILABLE"
    assert "cannot be reached" in seen[0]["description"]

    # Reachable, but the connection fails before the upstream says a word: the same.
    async with FakeFlux(api_key=KEY, plans={0: Plan(refuse_in_band=("INTERNAL_SERVER_ERROR", 1011))}) as fake:
        upstream(fake, FALLBACK_ENGINE="")
        c = Client()
        await c.comm.connect()
        code, seen = await c.expect_close()
        assert code == 4013 and [m["type"] for m in seen] == ["Error"] and seen[0]["code"] == "ENGINE_UNAVAILABLE"
        assert len(fake.connections) == 1


@pytestmark_db
async def test_keepalive_holds_the_upstream_while_the_client_is_silent(upstream):
    async with FakeFlux(api_key=KEY, idle_timeout=0.4) as fake:
        upstream(fake, KEEPALIVE_SECONDS=0.05)
        c = Client()
        await c.connect()

        def outlived_idle_timeout() -> bool:
            times = fake.connections[0].keepalive_times
            return len(times) >= 2 and times[-1] - times[0] > 1.0

        await fake.wait_for(outlived_idle_timeout)
        assert fake.connections[0].audio_bytes == 0  # KeepAlive messages, not silence audio
        await c.send_audio(SPEECH)
        assert (await c.recv_turn_end())["transcript"] == "one two three four"
        assert len(fake.connections) == 1 and not fake.connections[0].closed
        await c.disconnect()


@pytestmark_db
async def test_secrets_reach_no_client_log_or_record(upstream, caplog):
    caplog.set_level(logging.DEBUG)
    seen: list[dict] = []
    async with FakeFlux(api_key=KEY, plans={0: Plan(drop_after_turninfo=3)}) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=secret&keyterm=private-word")
        await c.connect()
        await c.send_audio(SPEECH)
        await c.recv_turn_end()
        await c.disconnect()
        seen += c.messages
        fake.reject_status = 401
        bad = Client("/v2/listen?session=secret-401")
        await bad.comm.connect()
        seen += (await bad.expect_close())[1]
    engine = get_engine("deepgram")
    assert engine.readiness()[0] and KEY not in engine.readiness()[1] and KEY not in repr(engine.options)
    rows = await sync_to_async(lambda: [list(Connection.objects.values()), list(Session.objects.values())])()
    assert "upstream_connected" in caplog.text and "upstream_lost" in caplog.text and "upstream_auth_failed" in caplog.text
    for text in (json.dumps(seen), caplog.text, repr(rows)):
        assert KEY not in text
    assert "private-word" not in caplog.text  # URLs are logged without their query


@pytestmark_db
async def test_missing_key_makes_the_engine_unavailable(upstream, settings):
    upstream(None, port=1)
    settings.DEEPGRAM_API_KEY = ""
    assert get_engine("deepgram").readiness() == (False, "The deepgram engine has no API key; set DEEPGRAM_API_KEY.")
    c = Client()
    await c.comm.connect()
    code, seen = await c.expect_close()
    assert code == 4013 and seen[0]["code"] == "ENGINE_UNAVAILABLE"


@pytestmark_db
async def test_scripted_upstream_events_pass_through_and_a_skipped_end_of_turn_is_closed(upstream):
    def info(event, turn, words, start, end, **extra):
        return {
            "type": "TurnInfo", "event": event, "turn_index": turn, "audio_window_start": start, "audio_window_end": end,
            "transcript": " ".join(words), "words": [{"word": w, "confidence": 0.9} for w in words],
            "end_of_turn_confidence": 0.5, **extra,
        }

    script = [
        (0.1, info("StartOfTurn", 0, [], 0.0, 0.1)),
        (0.3, info("Update", 0, ["hola"], 0.0, 0.3, languages=["es"])),
        (0.5, info("EagerEndOfTurn", 0, ["hola"], 0.0, 0.5)),
        (0.6, info("TurnResumed", 0, ["hola"], 0.0, 0.6)),
        (0.8, info("Update", 0, ["hola", "amigo"], 0.0, 0.8)),
        # Turn 0's EndOfTurn never comes: turn 1 starts.
        (1.2, info("StartOfTurn", 1, [], 1.0, 1.2)),
        (1.4, info("EndOfTurn", 1, ["adios"], 1.0, 1.4, trigger="timeout")),
    ]
    async with FakeFlux(api_key=KEY, plans={0: Plan(script=script)}) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=scripted&eager_eot_threshold=0.4")
        await c.connect()
        await c.send_audio(silence(1.5))
        await c.recv_until(lambda m: m.get("event") == "EndOfTurn" and m["turn_index"] == 1)
        got = [(m["event"], m["turn_index"], m["transcript"], m.get("trigger")) for m in turn_infos(c.messages)]
        assert got == [
            ("StartOfTurn", 0, "", None),
            ("Update", 0, "hola", None),
            ("EagerEndOfTurn", 0, "hola", None),
            ("TurnResumed", 0, "hola", None),
            ("Update", 0, "hola amigo", None),
            ("EndOfTurn", 0, "hola amigo", "model"),  # closed from its last Update
            ("StartOfTurn", 1, "", None),
            ("EndOfTurn", 1, "adios", "timeout"),
        ]
        assert turn_infos(c.messages)[1]["languages"] == ["es"]
        assert fake.connections[0].query["eager_eot_threshold"] == ["0.4"]
        await c.disconnect()
    assert [t[1:] for t in await turns_of("scripted")] == [("hola amigo", "model"), ("adios", "timeout")]


@pytestmark_db
async def test_force_end_turn_lost_with_the_connection_is_still_honoured(upstream):
    async with FakeFlux(api_key=KEY, plans={0: Plan(drop_on=frozenset({"ForceEndTurn"}))}) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=force-drop")
        await c.connect()
        await c.send_audio(tone(0.6))
        await c.recv_until(lambda m: m.get("event") == "Update" and m["transcript"] == "one two")
        await c.send_json({"type": "ForceEndTurn"})
        forced = await c.recv_turn_end()
        assert (forced["turn_index"], forced["transcript"], forced["trigger"]) == (0, "one two", "manual")
        await c.send_audio(tone(0.3) + silence(0.7))
        after = await c.recv_turn_end()
        assert (after["turn_index"], after["transcript"]) == (1, "one")  # the forced turn's audio was not resent
        assert len(fake.connections) == 2
        await c.disconnect()


@pytestmark_db
async def test_drop_during_the_final_flush_reconnects_and_flushes_again(upstream):
    async with FakeFlux(api_key=KEY, plans={0: Plan(drop_on=frozenset({"CloseStream"}))}) as fake:
        upstream(fake)
        c = Client("/v2/listen?session=flush-drop")
        await c.connect()
        await c.send_audio(tone(1.0))
        await c.recv_until(lambda m: m.get("event") == "Update" and m["transcript"] == "one two three four")
        await c.send_json({"type": "CloseStream"})
        code, seen = await c.expect_close()
        assert code == 1000
        ends = turn_infos(c.messages, "EndOfTurn")
        assert [(e["turn_index"], e["transcript"], e["trigger"]) for e in ends] == [(0, "one two three four", "end_of_stream")]
        assert len(fake.connections) == 2 and fake.connections[1].received("CloseStream")


@pytestmark_db
async def test_outage_longer_than_the_replay_buffer_says_what_was_lost(upstream):
    async with FakeFlux(api_key=KEY, plans={0: Plan(drop_after_turninfo=2)}) as fake:
        upstream(fake, REPLAY_SECONDS=1.0, FALLBACK_AFTER_SECONDS=60.0)
        c = Client()
        await c.connect()
        fake.reject_status = 503  # new handshakes fail until the test lets them through
        await c.send_audio(tone(3.0))
        await fake.wait_for(lambda: len(fake.rejected) >= 3)
        fake.reject_status = None
        await c.send_audio(silence(0.8))
        end = await c.recv_turn_end()
        assert end["turn_index"] == 0
        codes = warnings(c.messages)
        assert codes[:3] == ["UPSTREAM_RECONNECTING", "UPSTREAM_RECONNECTED", "UPSTREAM_AUDIO_LOST"]
        lost = next(m for m in c.messages if m.get("code") == "UPSTREAM_AUDIO_LOST")
        assert "s of audio" in lost["description"]
        assert fake.connections[1].audio_bytes <= 32000 + len(silence(0.8)) + 2560  # at most the 1 s buffer (plus a frame) came again
        await c.disconnect()


# --- compressed audio across a reconnect and a fallback -------------------------------------------------
def compressed_frames(encoding: str, pcm: bytes) -> list[bytes]:
    """What a client sends: one Opus packet per frame, or an Ogg Opus stream in 1000-byte frames
    (which split its pages anywhere)."""
    return opus_packets(pcm) if encoding == "opus" else compressed_frames_of(ogg_opus(pcm))


def compressed_frames_of(data: bytes) -> list[bytes]:
    return [data[i : i + 1000] for i in range(0, len(data), 1000)]


async def send_frames(c: Client, frames: list[bytes]) -> None:
    for frame in frames:
        await c.comm.send_to(bytes_data=frame)


@pytestmark_db
@pytest.mark.parametrize("encoding", ["opus", "ogg-opus"])
async def test_compressed_audio_is_resent_whole_after_a_drop_mid_turn(upstream, encoding):
    # As the linear16 test above: turn 1 drops after StartOfTurn + 2 Updates. The new connection
    # must get audio it can decode from its first byte (whole packets; Ogg: the header pages,
    # then whole pages), starting at a time the old one answered for.
    async with FakeFlux(api_key=KEY, plans={0: Plan(drop_after_turninfo=8)}) as fake:
        upstream(fake)
        c = Client(f"/v2/listen?session=drop-{encoding}&encoding={encoding}&sample_rate=48000")
        await c.connect()
        await send_frames(c, compressed_frames(encoding, tone(0.75) + silence(0.7) + tone(1.0) + silence(0.8)))
        first = await c.recv_turn_end()
        second = await c.recv_turn_end()
        assert (first["turn_index"], first["transcript"]) == (0, "one two three")
        assert (second["turn_index"], second["transcript"], second["trigger"]) == (1, "one two three four", "model")
        assert warnings(c.messages)[:2] == ["UPSTREAM_RECONNECTING", "UPSTREAM_RECONNECTED"]
        assert len(fake.connections) == 2
        again = fake.connections[1]
        await fake.wait_for(lambda: again.decoded_seconds >= 1.5)  # turn 1 and the silence after it
        assert again.audio_problems == []  # every byte resent decoded
        assert again.decoded_seconds < 3.25 - 0.5  # not all of it again: from turn 0's answer on
        infos = turn_infos(c.messages)
        turn1 = [(m["event"], len(m["words"])) for m in infos if m["turn_index"] == 1]
        assert turn1 == [("StartOfTurn", 0), ("Update", 1), ("Update", 2), ("Update", 3), ("Update", 4), ("EndOfTurn", 4)]
        # Times on the stream's clock: the tone starts at 1.45 s (Opus adds its pre-skip, 6.5 ms).
        assert second["audio_window_start"] == pytest.approx(1.45, abs=0.02)
        await c.send_json({"type": "CloseStream"})
        assert (await c.expect_close())[0] == 1000
    assert [t[:2] for t in await turns_of(f"drop-{encoding}")] == [(0, "one two three"), (1, "one two three four")]


@pytestmark_db
@pytest.mark.parametrize("encoding", ["opus", "ogg-opus"])
async def test_compressed_audio_goes_on_decoding_on_the_fallback_engine(upstream, encoding):
    # Turn 0 ends upstream; turn 1 drops after StartOfTurn + 2 Updates and every reconnect is
    # refused, so the fake engine takes over in-process. It must get what the upstream had not
    # answered for as audio it can decode (the Ogg header first, whole packets/pages from turn
    # 0's end), then the client's later frames, although the cut below falls inside an Ogg page.
    async with FakeFlux(api_key=KEY, refuse_after=1, plans={0: Plan(drop_after_turninfo=8)}) as fake:
        upstream(fake)
        c = Client(f"/v2/listen?session=fallback-{encoding}&encoding={encoding}&sample_rate=48000")
        await c.connect()
        pcm = tone(0.75) + silence(0.7) + tone(1.0) + silence(0.8) + tone(0.5) + silence(1.0)
        if encoding == "opus":
            frames = opus_packets(pcm)
            cut = 175  # 3.5 s of 20 ms packets
        else:  # 3.5 s: half-way through the fourth 1 s audio page (two header pages first)
            ogg = ogg_opus(pcm)
            pages = [m.start() for m in re.finditer(b"OggS", ogg)]
            half = (pages[5] + pages[6]) // 2
            frames = compressed_frames_of(ogg[:half]) + compressed_frames_of(ogg[half:])
            cut = len(compressed_frames_of(ogg[:half]))
        await send_frames(c, frames[:cut])
        first = await c.recv_turn_end()
        second = await c.recv_turn_end()
        assert (first["turn_index"], first["transcript"]) == (0, "one two three")
        assert (second["turn_index"], second["transcript"]) == (1, "one two three four")
        assert "UPSTREAM_FALLBACK" in warnings(c.messages)
        await send_frames(c, frames[cut:])
        third = await c.recv_turn_end()
        assert (third["turn_index"], third["transcript"]) == (2, "one two")
        assert third["audio_window_start"] == pytest.approx(3.25, abs=0.02)
        await c.send_json({"type": "CloseStream"})
        assert (await c.expect_close())[0] == 1000
        assert "INVALID_AUDIO_PACKET" not in warnings(c.messages) and fake.connections[0].audio_problems == []
    assert [t[:2] for t in await turns_of(f"fallback-{encoding}")] == [(0, "one two three"), (1, "one two three four"), (2, "one two")]


@pytestmark_db
async def test_bad_ogg_is_judged_by_the_relay_before_the_upstream(upstream):
    # The relay cuts Ogg pages for the upstream, so it applies its own rules (docs/protocol.md):
    # garbage between pages is skipped with a warning and never sent; garbage where the stream
    # must start is INVALID_AUDIO.
    async with FakeFlux(api_key=KEY) as fake:
        upstream(fake)
        ogg = ogg_opus(tone(1.0) + silence(0.8))
        third_page = [m.start() for m in re.finditer(b"OggS", ogg)][3]
        c = Client("/v2/listen?encoding=ogg-opus&sample_rate=48000")
        await c.connect()
        await send_frames(c, compressed_frames_of(ogg[:third_page]) + [b"garbage" * 40] + compressed_frames_of(ogg[third_page:]))
        end = await c.recv_turn_end()
        assert end["transcript"] == "one two three four"
        assert warnings(c.messages) == ["INVALID_AUDIO_PACKET"]
        assert fake.connections[0].audio_bytes == len(ogg) and fake.connections[0].audio_problems == []
        await c.disconnect()

        c = Client("/v2/listen?encoding=ogg-opus&sample_rate=48000")
        await c.connect()
        await c.comm.send_to(bytes_data=tone(0.1))  # PCM where Ogg pages must be
        code, seen = await c.expect_close()
        assert code == 4007 and seen[-1]["type"] == "Error" and seen[-1]["code"] == "INVALID_AUDIO"
        assert fake.connections[1].audio_bytes == 0
