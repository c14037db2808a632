"""relay/server/: every framework patch checks what it patches and refuses to start when it moved."""
from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import autobahn.websocket.protocol as websocket_protocol
import daphne.server
import pytest
from channels.consumer import AsyncConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.testing import WebsocketCommunicator
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import abstract, tcp

from relay import server
from relay.server import PatchTargetMissing, autobahn_logs, close_reason, consumer_loop, denial_response, direct_write, inbound_flow, patches, send_limit, shutdown, unmask

ROOT = Path(__file__).resolve().parents[2]


class FakeReactor:
    """Stands in for daphne's reactor: records the system event triggers it is given."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, Callable[[], Any]]] = []

    def addSystemEventTrigger(self, phase: str, event: str, callable: Callable[[], Any]) -> None:
        self.triggers.append((phase, event, callable))


@pytest.fixture
def reactor(monkeypatch) -> FakeReactor:
    fake = FakeReactor()
    monkeypatch.setitem(sys.modules, "twisted.internet.reactor", fake)
    return fake


@pytest.fixture(autouse=True)
def _restore_limits(monkeypatch):
    """Installs in these tests change class-wide limits; put the process's back afterwards."""
    for name in ("relay_send_limit", "relay_inbound_limit"):
        monkeypatch.setattr(WebSocketProtocol, name, getattr(WebSocketProtocol, name, None), raising=False)


def _install_send_limit() -> None:
    send_limit.install(limit_bytes=1024)


def _install_inbound_flow() -> None:
    inbound_flow.install(limit=10)


def _install_shutdown() -> None:
    shutdown.install(timeout=1.0)


# (what to break, the installer that must refuse, package named, attribute named)
BROKEN = [
    (WebSocketProtocol, "serverSend", _install_send_limit, "daphne", "WebSocketProtocol.serverSend"),
    # autobahn's WebSocketProtocol still has an onMessage: an inherited one does not count.
    (WebSocketProtocol, "onMessage", _install_inbound_flow, "daphne", "WebSocketProtocol.onMessage"),
    (abstract.FileDescriptor, "dataBuffer", _install_send_limit, "Twisted", "FileDescriptor.dataBuffer"),
    (websocket_protocol, "hltype", autobahn_logs.install, "autobahn", "autobahn.websocket.protocol.hltype"),
    (websocket_protocol.Timings, "__str__", autobahn_logs.install, "autobahn", "Timings.__str__"),
    (daphne.server.Server, "kill_all_applications", _install_shutdown, "daphne", "Server.kill_all_applications"),
    (AsyncConsumer, "channel_layer_alias", consumer_loop.install, "channels", "AsyncConsumer.channel_layer_alias"),
    (AsyncConsumer, "dispatch", consumer_loop.install, "channels", "AsyncConsumer.dispatch"),
    (WebSocketProtocol, "handle_reply", close_reason.install, "daphne", "WebSocketProtocol.handle_reply"),
    (websocket_protocol.WebSocketProtocol, "sendClose", close_reason.install, "autobahn", "WebSocketProtocol.sendClose"),
    (WebSocketProtocol, "serverReject", denial_response.install, "daphne", "WebSocketProtocol.serverReject"),
    (daphne.server.Server, "create_application", denial_response.install, "daphne", "Server.create_application"),
    (websocket_protocol.WebSocketServerProtocol, "sendHttpErrorResponse", denial_response.install, "autobahn",
     "WebSocketServerProtocol.sendHttpErrorResponse"),
    (websocket_protocol.WebSocketServerProtocol, "failHandshake", denial_response.install, "autobahn", "WebSocketServerProtocol.failHandshake"),
    (tcp.Connection, "writeSomeData", direct_write.install, "Twisted", "Connection.writeSomeData"),
    (abstract.FileDescriptor, "_writeDisconnecting", direct_write.install, "Twisted", "FileDescriptor._writeDisconnecting"),
    (websocket_protocol, "create_xor_masker", unmask.install, "autobahn", "autobahn.websocket.protocol.create_xor_masker"),
]


@pytest.mark.parametrize(("owner", "name", "install", "package", "attribute"), BROKEN, ids=[b[4] for b in BROKEN])
def test_install_refuses_when_a_target_is_gone(monkeypatch, reactor, owner, name, install, package, attribute):
    monkeypatch.delattr(owner, name)
    with pytest.raises(PatchTargetMissing) as refused:
        install()
    message = str(refused.value)
    assert f"{package} {importlib.metadata.version(package)}" in message
    assert attribute in message and "refuses to start" in message


def test_install_refuses_when_a_target_changed_its_signature(monkeypatch):
    monkeypatch.setattr(WebSocketProtocol, "serverSend", lambda self, payload, is_binary=False: None)
    with pytest.raises(PatchTargetMissing, match=r"parameters \(self, payload, is_binary\), expected \(self, content, binary"):
        send_limit.install(limit_bytes=1024)


def test_close_reason_refuses_when_daphne_closes_some_other_way(monkeypatch):
    def serverClose(self, code=None):
        self.sendCloseFrame(code=code or 1000)

    monkeypatch.setattr(WebSocketProtocol, "serverClose", serverClose)
    with pytest.raises(PatchTargetMissing, match="serverClose but its code no longer uses sendClose"):
        close_reason.install()


class _Closing:
    """Just enough of daphne's protocol for handle_reply: a state and a recorded close."""

    STATE_CONNECTING, STATE_OPEN = 0, 1

    def __init__(self, state: int = 1) -> None:
        self.state = state
        self.closed: list[tuple[int | None, str | None]] = []

    def sendClose(self, code=None, reason=None):
        self.closed.append((code, reason))

    def serverClose(self, code=None):
        self.sendClose(code=1000 if code is None else code)

    def serverReject(self):
        self.closed.append(("rejected", None))


def test_close_reason_sends_the_reason_truncated_and_leaves_other_replies_to_daphne(monkeypatch):
    monkeypatch.setattr(WebSocketProtocol, "handle_reply", WebSocketProtocol.handle_reply)
    close_reason.install()
    handle_reply = WebSocketProtocol.handle_reply
    assert handle_reply.relay_patched
    close_reason.install()
    assert WebSocketProtocol.handle_reply is handle_reply  # not wrapped twice

    proto = _Closing()
    handle_reply(proto, {"type": "websocket.close", "code": 4029, "reason": "RATE_LIMITED"})
    handle_reply(proto, {"type": "websocket.close", "code": 4008, "reason": "é" * 100})
    handle_reply(proto, {"type": "websocket.close", "code": 4012})
    assert proto.closed[0] == (4029, "RATE_LIMITED")
    assert proto.closed[1] == (4008, "é" * 61) and len(proto.closed[1][1].encode()) <= 123
    assert proto.closed[2] == (4012, None)  # no reason: daphne's own serverClose

    refused = _Closing(state=_Closing.STATE_CONNECTING)
    handle_reply(refused, {"type": "websocket.close", "code": 4003, "reason": "FORBIDDEN"})
    assert refused.closed == [("rejected", None)]  # before accept: an HTTP 403, as daphne does


def test_install_refuses_when_daphne_stores_its_queue_elsewhere(monkeypatch):
    def applicationCreateWorked(self, application_queue):
        self.input_queue = application_queue

    monkeypatch.setattr(WebSocketProtocol, "applicationCreateWorked", applicationCreateWorked)
    with pytest.raises(PatchTargetMissing, match="no longer uses application_queue"):
        inbound_flow.install(limit=10)


def test_a_framework_that_is_not_installed_leaves_its_patch_a_no_op(monkeypatch):
    find_spec = patches.importlib.util.find_spec
    monkeypatch.setattr(patches.importlib.util, "find_spec", lambda name: None if name == "daphne" else find_spec(name))
    monkeypatch.delattr(WebSocketProtocol, "serverSend")  # would refuse if daphne counted as installed
    send_limit.install(limit_bytes=1024)
    assert patches.require(patches.Patch(name="x", purpose="x", framework="daphne", targets=())) is False


def test_install_all_succeeds_and_a_second_call_only_updates_the_limits(settings, reactor):
    settings.RELAY_MAX_SEND_BUFFER_BYTES, settings.RELAY_MAX_INBOUND_MESSAGES = 1000, 20
    server.install(settings)
    wrapped = WebSocketProtocol.serverSend, WebSocketProtocol.onMessage, websocket_protocol.hltype
    assert WebSocketProtocol.serverSend.relay_patched and WebSocketProtocol.onMessage.relay_patched
    assert isinstance(websocket_protocol.hltype(int), autobahn_logs._Deferred)
    assert [(phase, event) for phase, event, _ in reactor.triggers] == [("before", "shutdown")]

    settings.RELAY_MAX_SEND_BUFFER_BYTES, settings.RELAY_MAX_INBOUND_MESSAGES = 2000, 40
    server.install(settings)
    assert (WebSocketProtocol.serverSend, WebSocketProtocol.onMessage, websocket_protocol.hltype) == wrapped  # not wrapped twice
    assert (WebSocketProtocol.relay_send_limit, WebSocketProtocol.relay_inbound_limit) == (2000, 40)
    assert len(reactor.triggers) == 1


async def test_shutdown_hook_ends_streams_through_the_registry(monkeypatch, reactor):
    from relay.live import registry

    ended: list[float] = []

    async def end_all_streams(timeout: float) -> None:
        ended.append(timeout)

    monkeypatch.setattr(registry, "end_all_streams", end_all_streams)
    shutdown.install(timeout=3.5)
    [(_, _, before_shutdown)] = reactor.triggers
    await before_shutdown().asFuture(asyncio.get_running_loop())
    assert ended == [3.5]


class Echo(consumer_loop.SingleTaskLoop, AsyncWebsocketConsumer):
    groups = ["echo"]

    async def receive(self, text_data=None, bytes_data=None):
        await self.channel_layer.group_send("echo", {"type": "echo.event", "text": text_data})

    async def echo_event(self, event):
        await self.send(text_data="layer: " + event["text"])


# Channels' websocket_disconnect closes stale database connections (aclose_old_connections): after
# a database test in the same process, that touches the connection, so this test needs the mark.
@pytest.mark.django_db
async def test_single_task_loop_serves_socket_and_layer_messages(monkeypatch):
    async def channels_loop(self, scope, receive, send):
        raise AssertionError("Channels' own loop ran")

    monkeypatch.setattr(AsyncConsumer, "__call__", channels_loop)
    communicator = WebsocketCommunicator(Echo.as_asgi(), "/echo")
    connected, _ = await communicator.connect()
    assert connected
    await communicator.send_to(text_data="hello")
    assert await communicator.receive_from() == "layer: hello"  # socket -> handler -> layer -> forwarder -> handler
    await communicator.disconnect()


def test_asgi_application_refuses_to_start_when_a_target_moved():
    code = "import daphne.ws_protocol as w; del w.WebSocketProtocol.serverSend; import transcription_site.asgi"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "transcription_site.settings", "RELAY_PRELOAD_ENGINE": "0"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "PatchTargetMissing" in result.stderr
    assert f"daphne {importlib.metadata.version('daphne')} has no daphne.ws_protocol.WebSocketProtocol.serverSend" in result.stderr


def test_asgi_application_starts_when_every_target_is_there():
    """The check above can fail: the same import with nothing removed succeeds."""
    code = "import daphne.ws_protocol; import transcription_site.asgi"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "transcription_site.settings", "RELAY_PRELOAD_ENGINE": "0"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


class _Transport:
    def __init__(self) -> None:
        self.reading = False  # paused
        self.disconnected = self.disconnecting = False

    def resumeProducing(self) -> None:
        self.reading = True


class _Protocol:
    STATE_OPEN, STATE_CLOSING = 3, 2

    def __init__(self, state: int) -> None:
        self.state = state
        self.transport = _Transport()


def test_inbound_flow_never_holds_back_reading_on_a_closing_connection():
    """A refused or ended connection must read what is left, so its close handshake ends with close
    frames instead of a socket closed with unread data (a reset)."""
    open_, closing = _Protocol(_Protocol.STATE_OPEN), _Protocol(_Protocol.STATE_CLOSING)
    assert inbound_flow.hold_reading(open_, 50, 50) and not inbound_flow.hold_reading(open_, 49, 50)
    assert not inbound_flow.hold_reading(closing, 500, 50)
    assert not inbound_flow.resume_if_ready(open_, 40, 50) and not open_.transport.reading  # still behind
    open_.state = _Protocol.STATE_CLOSING  # the relay closed it while it was paused
    assert inbound_flow.resume_if_ready(open_, 40, 50) and open_.transport.reading
    caught_up = _Protocol(_Protocol.STATE_OPEN)
    assert inbound_flow.resume_if_ready(caught_up, 25, 50) and caught_up.transport.reading


def test_denial_response_refuses_when_autobahn_fails_a_handshake_some_other_way(monkeypatch):
    def failHandshake(self, reason, code=400, responseHeaders=None):
        self.transport.write(f"HTTP/1.1 {code} {reason}\r\n\r\n".encode())

    monkeypatch.setattr(websocket_protocol.WebSocketServerProtocol, "failHandshake", failHandshake)
    with pytest.raises(PatchTargetMissing, match="failHandshake but its code no longer uses sendHttpErrorResponse, dropConnection"):
        denial_response.install()


class _Handshaking:
    """Just enough of daphne's protocol during its handshake: the deferred, the server, sendData."""

    STATE_CONNECTING, STATE_OPEN = 0, 1

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.state = self.STATE_CONNECTING
        self.handshake_deferred = Deferred()
        self.refused: list[Any] = []
        self.handshake_deferred.addErrback(lambda failure: self.refused.append(failure.value))
        self.disconnected: list[Any] = []
        self.actions: list[tuple[str, str]] = []
        self.server = type("S", (), {"protocol_disconnected": lambda _, p: self.disconnected.append(p),
                                     "log_action": lambda _, kind, action, details: self.actions.append((kind, action))})()
        self.client_addr, self.request = ["127.0.0.1", 5000], type("R", (), {"path": "/v2/listen"})()
        self.sent: list[bytes] = []

    def sendData(self, data: bytes) -> None:
        self.sent.append(data)


def test_denial_response_answers_the_handshake_with_the_applications_status_and_body():
    from autobahn.websocket.types import ConnectionDeny

    denial_response.install()
    denial_response.install()
    handle_reply = WebSocketProtocol.handle_reply
    assert handle_reply.relay_denial_patched and inspect_unwrapped(handle_reply) is inspect_unwrapped(WebSocketProtocol.handle_reply)

    proto = _Handshaking()
    handle_reply(proto, {"type": "websocket.http.response.start", "status": 401,
                         "headers": [(b"content-type", b"application/json"), (b"content-length", b"999")]})
    handle_reply(proto, {"type": "websocket.http.response.body", "body": b'{"err_code": ', "more_body": True})
    assert not proto.refused  # nothing goes out before the last part
    handle_reply(proto, {"type": "websocket.http.response.body", "body": b'"INVALID_AUTH"}'})
    (deny,) = proto.refused
    assert isinstance(deny, ConnectionDeny) and (deny.code, deny.reason) == (401, "Unauthorized")
    assert not hasattr(proto, "handshake_deferred") and proto.disconnected == [proto] and proto.actions == [("websocket", "rejected")]

    # autobahn's failHandshake calls sendHttpErrorResponse(code, reason): the whole response goes out.
    WebSocketProtocol.sendHttpErrorResponse(proto, 401, "Unauthorized")
    assert proto.sent == [b'HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\nContent-Length: 28\r\n'
                          b'Connection: close\r\n\r\n{"err_code": "INVALID_AUTH"}']

    # Out of order, after accept, or a header that would split the response: the application's error.
    for message in ({"type": "websocket.http.response.body", "body": b"x"},
                    {"type": "websocket.http.response.start", "status": 401, "headers": [(b"x", b"a\r\nb")]},
                    {"type": "websocket.http.response.start", "status": 101}):
        with pytest.raises(ValueError):
            handle_reply(_Handshaking(), message)
    accepted = _Handshaking()
    accepted.state = accepted.STATE_OPEN
    with pytest.raises(ValueError, match="before websocket.accept"):
        handle_reply(accepted, {"type": "websocket.http.response.start", "status": 401})

    # A protocol with no denial keeps autobahn's own error responses (daphne's 403, a bad handshake).
    plain = _Handshaking()
    WebSocketProtocol.sendHttpErrorResponse(plain, 403, "Access denied")
    assert plain.sent == [b"HTTP/1.1 403 Access denied\r\n\r\n"]


def inspect_unwrapped(function: Any) -> Any:
    import inspect

    return inspect.unwrap(function)


async def test_denial_response_is_advertised_in_websocket_scopes_only():
    denial_response.install()
    scopes: list[dict] = []

    async def app(scope, receive, send):
        scopes.append(scope)

    server = type("S", (), {"application": staticmethod(app), "connections": {"ws": {}, "http": {}},
                            "handle_reply": lambda self, protocol, message: None})()
    daphne.server.Server.create_application(server, "ws", {"type": "websocket", "path": "/v2/listen"})
    daphne.server.Server.create_application(server, "http", {"type": "http", "path": "/"})
    await asyncio.sleep(0)
    assert scopes[0]["extensions"] == {"websocket.http.response": {}}
    assert "extensions" not in scopes[1]
