"""The Flux drop-in promise, checked with Deepgram's own SDKs (pinned dev dependencies).

``tests/sdk/flux_script.py`` (``deepgram-sdk``, sync and async clients) and
``tests/sdk/js/flux_script.mjs`` (``@deepgram/sdk`` under Node) run one Flux program each; the only
thing they are given is a base URL and a made-up key. They run against:

- "Deepgram's URL": ``tests/support/fakeflux.py``, the local fake that speaks Deepgram's protocol
  (the stream half only: sessions and replay are the relay's own);
- the relay: a real daphne process on the fake engine (stream, then reconnect with
  ``?session=<id>`` and read the replayed turns), and once on the real whisper engine;
- the relay with ``RELAY_REQUIRE_AUTH=1``: the made-up key is refused at the handshake with HTTP 401,
  and each SDK surfaces it exactly as it surfaces Deepgram's 401 (the fake, refusing the key).

Every message an SDK hands over must be a Flux type (no ``None``, nothing the SDK skipped as
unknown). The JS SDK is installed by ``make install-dev`` (``make sdk-js``); without Node its cases
skip.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from tests.support.fakeflux import FakeFlux
from tests.support.live import ROOT, LiveServer, sqlite_env
from tests.support.speech import SPEECH, manifest, wer

pytestmark = [pytest.mark.slow, pytest.mark.live]

KEY = "dg-0123456789abcdef0123456789abcdef01234567"  # made up: not a Deepgram key, not a relay token
PY_SCRIPT = ROOT / "tests" / "sdk" / "flux_script.py"
JS_DIR = ROOT / "tests" / "sdk" / "js"
JS_SCRIPT = JS_DIR / "flux_script.mjs"
CLIP_A, CLIP_B = SPEECH / "s01.wav", SPEECH / "s03.wav"  # "The quick brown fox ...", "Our meeting ..."
SPEECH_ARGS = ("--audio", str(CLIP_A), str(CLIP_B))
CLIENTS = ["python-sync", "python-async", "js"]
FLUX_CLASSES = {
    "ListenV2Connected", "ListenV2TurnInfo", "ListenV2ConfigureSuccess", "ListenV2ConfigureFailure",
    "ListenV2Warning", "ListenV2FatalError",
}


# -- running the scripts -------------------------------------------------------------------------------
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed: the JS SDK case needs Node 20 (make sdk-js)")
    if not (JS_DIR / "node_modules" / "@deepgram" / "sdk" / "package.json").exists():
        pytest.fail("tests/sdk/js/node_modules is missing: run `make install-dev` (it runs `make sdk-js`)")
    return exe


def run_client(client: str, base_url: str, *args: str, timeout: float = 240, env: dict | None = None) -> dict:
    if client == "js":
        cmd = [node(), str(JS_SCRIPT), base_url, KEY, *args]
    else:
        cmd = [sys.executable, str(PY_SCRIPT), base_url, KEY, "--mode", client.removeprefix("python-"), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{client} printed no summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    summary = json.loads(lines[-1])
    summary["_stderr"] = done.stderr[-4000:]
    assert summary["failure"] is None, f"{client}: {summary['failure']}\n{summary.get('traceback', '')}\n{done.stderr[-4000:]}"
    return summary


def check_flux_only(summary: dict) -> None:
    """Every message the SDK handed over is a Flux message it knows."""
    for conn in summary["connections"]:
        assert conn["none"] == 0, conn  # the Python SDK's union yields None for a type it cannot build
        assert conn["non_flux"] == [], conn["non_flux"]
        assert conn["types"] and conn["types"][0] in {"Connected", "Error"}, conn["types"]
        if conn.get("opens", 1) <= 1:
            assert conn["sequence_ids"] == list(range(len(conn["types"]))), conn["sequence_ids"]
        else:  # the JS SDK reconnected on its own: each socket got only its Error (sequence_id 0)
            assert conn["sequence_ids"] == [0] * conn["opens"], conn["sequence_ids"]
        if "classes" in conn:
            assert set(conn["classes"]) <= FLUX_CLASSES, conn["classes"]
    assert summary.get("unknown_logged", 0) == 0, summary["_stderr"]


def check_stream(conn: dict) -> None:
    """The stream half: turns, Configure, ForceEndTurn, CloseStream, a clean close."""
    assert conn["types"][0] == "Connected" and conn["request_id"]
    assert {"StartOfTurn", "Update", "EndOfTurn"} <= set(conn["events"]), conn["events"]
    assert not conn["error_messages"] and not conn["exceptions"], conn
    (answer,) = conn["configure"]
    assert answer["type"] == "ConfigureSuccess", answer
    assert answer["thresholds"]["eot_threshold"] == 0.8 and answer["keyterms"] == ["relay"], answer
    triggers = [e["trigger"] for e in conn["ends"]]
    assert triggers[0] == "model" and "manual" in triggers, triggers
    for end in conn["ends"]:
        assert end["transcript"] and end["words"], end
        assert all({"word", "confidence"} <= set(w) for w in end["words"]), end["words"]
    assert conn["close_code"] == 1000, conn


# -- servers -------------------------------------------------------------------------------------------
class FakeDeepgram:
    """tests/support/fakeflux.py on a loop of its own thread, accepting only ``Token <api_key>``."""

    def __init__(self, api_key: str = KEY) -> None:
        self.api_key = api_key
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeFlux:
        self.thread.start()
        self.fake = asyncio.run_coroutine_threadsafe(self._enter(), self.loop).result(10)
        return self.fake

    async def _enter(self) -> FakeFlux:
        return await FakeFlux(api_key=self.api_key).__aenter__()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.__aexit__(None, None, None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def fake_deepgram():
    with FakeDeepgram() as fake:
        yield fake


@pytest.fixture(scope="module")
def deepgram_refusing():
    """Deepgram for a program whose key is wrong: every handshake gets 401."""
    with FakeDeepgram(api_key="the-real-key") as fake:
        yield fake


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    with LiveServer({**sqlite_env(tmp_path_factory.mktemp("sdk-relay")), "RELAY_ENGINE": "fake"}, log_name="daphne-sdk") as server:
        yield server


@pytest.fixture(scope="module")
def relay_auth(tmp_path_factory):
    env = {**sqlite_env(tmp_path_factory.mktemp("sdk-auth")), "RELAY_ENGINE": "fake", "RELAY_REQUIRE_AUTH": "1"}
    with LiveServer(env, log_name="daphne-sdk-auth") as server:
        yield server


# -- (a) Deepgram's URL: the fake Flux server ----------------------------------------------------------
@pytest.mark.parametrize("client", CLIENTS)
def test_sdk_streams_against_fake_deepgram(client, fake_deepgram):
    before = len(fake_deepgram.connections)
    summary = run_client(client, f"ws://127.0.0.1:{fake_deepgram.port}", *SPEECH_ARGS, "--speed", "4")
    check_flux_only(summary)
    (conn,) = summary["connections"]
    check_stream(conn)
    # Upstream Flux sends no EndOfTurn for the turn open at CloseStream.
    assert "end_of_stream" not in [e["trigger"] for e in conn["ends"]]
    # What the SDK put on the wire (the fake accepted only "Authorization: Token <KEY>").
    (seen,) = fake_deepgram.connections[before:]
    assert seen.path == "/v2/listen"
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["authorization"] == f"Token {KEY}"
    assert seen.query == {"model": ["flux-general-en"], "encoding": ["linear16"], "sample_rate": ["16000"]}
    assert [t["type"] for t in seen.texts] == ["Configure", "KeepAlive", "ForceEndTurn", "CloseStream"]
    assert seen.texts[0] == {"type": "Configure", "thresholds": {"eot_threshold": 0.8}, "keyterms": ["relay"]}
    assert seen.close_code == 1000


# -- (b) the relay, base URL changed and nothing else --------------------------------------------------
@pytest.mark.parametrize("client", CLIENTS)
def test_sdk_streams_and_resumes_against_the_relay(client, relay):
    summary = run_client(client, relay.ws_url, *SPEECH_ARGS, "--speed", "4", "--resume")
    check_flux_only(summary)
    stream, resume = summary["connections"]
    check_stream(stream)
    assert stream["url"].endswith("/v2/listen?model=flux-general-en&encoding=linear16&sample_rate=16000"), stream["url"]
    # The made-up key is served as anonymous, with a Flux Warning right after Connected.
    assert stream["types"][:2] == ["Connected", "Warning"] and stream["warnings"][0] == "UNKNOWN_CREDENTIALS_IGNORED"
    assert set(stream["warnings"]) <= {"UNKNOWN_CREDENTIALS_IGNORED", "KEYTERMS_IGNORED"}, stream["warnings"]
    # The relay finishes the turn that was open at CloseStream.
    assert stream["ends"][-1]["trigger"] == "end_of_stream"
    # Reconnecting with ?session=<id> (the SDK's extra-query-parameter option) replays every turn.
    assert resume["session_id"] == stream["session_id"] and "session=" in resume["url"]
    assert resume["events"] == ["EndOfTurn"] * len(stream["ends"])
    assert [(e["turn_index"], e["transcript"], e["trigger"]) for e in resume["ends"]] == [
        (e["turn_index"], e["transcript"], e["trigger"]) for e in stream["ends"]
    ]
    assert all(e["replayed"] is True for e in resume["ends"])
    assert set(resume["warnings"]) == {"UNKNOWN_CREDENTIALS_IGNORED"} and not resume["error_messages"]
    assert resume["close_code"] == 1000


def test_python_sdk_transcribes_speech_on_the_whisper_relay(tmp_path):
    env = {**sqlite_env(tmp_path), "RELAY_ENGINE": "whisper"}
    server = LiveServer(env, log_name="daphne-sdk-whisper").start(timeout=180)  # loads the model first
    try:
        summary = run_client("python-sync", server.ws_url, *SPEECH_ARGS, "--speed", "1.5", "--resume", timeout=280)
    finally:
        server.stop()
    check_flux_only(summary)
    stream, resume = summary["connections"]
    check_stream(stream)
    # Whisper base hears this espeak-ng clip as "A quick round fox jump over the lazy dog near the
    # riverbank." (25 % WER) after 400 ms of silence, which a stream's first turn gets too (its
    # lead is whole, docs/engines.md); the point here is the SDK getting what the engine said.
    first = stream["ends"][0]["transcript"]
    assert wer([manifest()["clips"][0]["text"]], [first]) <= 0.3 and "lazy dog" in first.lower(), first
    said = " ".join(e["transcript"] for e in stream["ends"][1:]).lower()
    assert "meeting" in said or "conference" in said, said
    assert [e["transcript"] for e in resume["ends"]] == [e["transcript"] for e in stream["ends"]]


# -- the relay with RELAY_REQUIRE_AUTH=1 ---------------------------------------------------------------
def refusal(summary: dict) -> dict:
    """What one refused connection surfaced, without what differs per run (the SDK's session id header)."""
    (conn,) = summary["connections"]
    assert not conn["types"] and conn["none"] == 0 and not conn.get("non_flux"), conn  # no message at all
    exceptions = [re.sub(r"headers: \{.*?\}, ", "", e) for e in conn["exceptions"]]
    return {"exceptions": exceptions, "opens": conn.get("opens", 0), "closes": [c["code"] for c in conn.get("closes", [])],
            "close": (conn["close_code"], conn["close_reason"])}


@pytest.mark.parametrize("client", CLIENTS)
def test_made_up_key_is_refused_as_deepgram_refuses_it(client, relay_auth, deepgram_refusing):
    """The SDK sends the key in the Authorization header: the relay answers HTTP 401 at the handshake
    (relay/server/denial_response.py), and the SDK surfaces exactly what it surfaces for Deepgram's."""
    env = {**os.environ, "SDK_REFUSAL_WATCH_SECONDS": "3"}
    at_relay = refusal(run_client(client, relay_auth.ws_url, "--expect-refusal", env=env))
    at_deepgram = refusal(run_client(client, deepgram_refusing.url(""), "--expect-refusal", env=env))
    assert at_relay == at_deepgram, (at_relay, at_deepgram)
    assert deepgram_refusing.rejected[-1] == 401
    if client == "python-async":
        assert at_relay["exceptions"] == [
            "deepgram.core.api_error.ApiError: status_code: 401, body: Websocket initialized with invalid credentials."]
    elif client == "python-sync":
        # deepgram-sdk 7.17.0's sync client catches websockets' legacy InvalidStatusCode, so the sync
        # client's InvalidStatus (status 401) reaches the program as it is, from Deepgram too.
        assert at_relay["exceptions"] == ["websockets.exceptions.InvalidStatus: server rejected WebSocket connection: HTTP 401"]
    else:
        # JS: waitForOpen rejects with ws's "Unexpected server response: 401"; the SDK does not retry.
        assert "waitForOpen: Unexpected server response: 401" in at_relay["exceptions"] and at_relay["opens"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_refusal_surfaces_like_deepgrams_401(mode, relay_auth):
    """A Deepgram program's handling of a bad key (status 401 out of connect()) runs against the relay."""
    from deepgram import AsyncDeepgramClient, DeepgramClient
    from deepgram.core.api_error import ApiError
    from websockets.exceptions import InvalidStatus

    from tests.sdk.flux_script import CONNECT, environment

    if mode == "async":
        async def connect() -> None:
            client = AsyncDeepgramClient(api_key=KEY, environment=environment(relay_auth.ws_url))
            async with client.listen.v2.connect(**CONNECT) as socket:
                async for _ in socket:
                    pass

        with pytest.raises(ApiError) as info:
            asyncio.run(connect())
        assert info.value.status_code == 401
    else:
        client = DeepgramClient(api_key=KEY, environment=environment(relay_auth.ws_url))
        with pytest.raises(InvalidStatus) as raised:  # see test_made_up_key_is_refused_as_deepgram_refuses_it
            with client.listen.v2.connect(**CONNECT) as socket:
                for _ in socket:
                    pass
        response = raised.value.response
        assert response.status_code == 401
        body = json.loads(bytes(response.body))
        assert (body["err_code"], body["err_msg"]) == ("INVALID_AUTH", "The API token is not valid.") and body["request_id"]


def test_the_baseline_fake_deepgram_refuses_at_the_handshake():
    """What a Deepgram program sees for a bad key (the behaviour the tests above compare with)."""
    from deepgram import AsyncDeepgramClient
    from deepgram.core.api_error import ApiError

    from tests.sdk.flux_script import environment

    async def scenario() -> None:
        async with FakeFlux(api_key="the-real-key") as fake:
            client = AsyncDeepgramClient(api_key=KEY, environment=environment(fake.url("")))
            with pytest.raises(ApiError) as info:
                async with client.listen.v2.connect(model="flux-general-en", encoding="linear16", sample_rate=16000):
                    pass
            assert info.value.status_code == 401
            assert fake.rejected == [401]

    asyncio.run(scenario())
