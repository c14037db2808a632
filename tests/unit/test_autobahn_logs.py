"""relay/server/autobahn_logs.py: autobahn's debug-log helpers format lazily, and the same text."""
from __future__ import annotations

import pprint

import autobahn.twisted.websocket as twisted_websocket
import autobahn.util as util
import autobahn.websocket.protocol as websocket_protocol

from relay.server import autobahn_logs


def test_helpers_defer_their_work_and_render_the_same_text():
    autobahn_logs.install()  # transcription_site.asgi installs it too; a second call changes nothing
    autobahn_logs.install()
    class Probe:
        pass

    for module in (websocket_protocol, twisted_websocket):
        deferred = module.hltype(Probe)
        assert isinstance(deferred, autobahn_logs._Deferred)  # nothing formatted until a log line renders it
        assert "{}".format(deferred) == util.hltype(Probe)
        assert str(module.hlval(42)) == util.hlval(42)
    attrs = [("openHandshakeTimeout", 5, "factory")]
    assert f"{websocket_protocol.pformat(attrs)}" == pprint.pformat(attrs)
    timings = websocket_protocol.Timings()
    timings.track("onOpen")
    assert isinstance(str(timings), str) and "onOpen" in str(timings)
