"""Make daphne's WebSocket library format its debug-log arguments only when they are logged.

autobahn builds the arguments of its debug lines eagerly, whether or not debug logging is on:
``hltype``/``hlval`` (terminal colouring through click) on every read and every message sent,
``pformat`` of the protocol's whole configuration on every connection. On the relay's audio
path that was 5-10% of the CPU per frame and about half the cost of a connect beyond the
database (docs/benchmarks.md). Here those helpers, as autobahn's protocol modules see them,
return a small object that does the same formatting when a log line actually renders it; what
a debug log shows is unchanged.

Touches: autobahn's module globals ``hltype``/``hlval`` (imported from ``autobahn.util``) in
``autobahn.websocket.protocol`` and ``autobahn.twisted.websocket``, ``pformat`` in
``autobahn.websocket.protocol``, and ``Timings.__str__`` there (which reads ``self._timings``).
"""
from __future__ import annotations

import pprint
from typing import Any, Callable

from relay.server.patches import Patch, Target, require

PATCH = Patch(
    name="autobahn_logs",
    purpose="format autobahn's debug-log arguments only when a line is logged",
    framework="autobahn",
    targets=(
        Target("autobahn", "autobahn.util", "hltype"),
        Target("autobahn", "autobahn.util", "hlval"),
        Target("autobahn", "autobahn.websocket.protocol", "hltype"),
        Target("autobahn", "autobahn.websocket.protocol", "hlval"),
        Target("autobahn", "autobahn.websocket.protocol", "pformat"),
        Target("autobahn", "autobahn.websocket.protocol", "Timings", kind="class"),
        Target("autobahn", "autobahn.websocket.protocol", "Timings.__str__", params=("self",)),
        Target("autobahn", "autobahn.websocket.protocol", "Timings.__init__", uses=("_timings",)),
        Target("autobahn", "autobahn.twisted.websocket", "hltype"),
        Target("autobahn", "autobahn.twisted.websocket", "hlval"),
    ),
)


class _Deferred:
    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __str__(self) -> str:
        return str(self.fn(*self.args, **self.kwargs))

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _deferring(fn: Callable[..., Any]) -> Callable[..., _Deferred]:
    def deferred(*args: Any, **kwargs: Any) -> _Deferred:
        return _Deferred(fn, args, kwargs)

    deferred.relay_deferred = fn  # type: ignore[attr-defined]
    return deferred


def install() -> None:
    if not require(PATCH):  # autobahn absent: not under daphne
        return
    import autobahn.twisted.websocket as twisted_websocket
    import autobahn.util as util
    import autobahn.websocket.protocol as websocket_protocol

    if hasattr(websocket_protocol.hltype, "relay_deferred"):
        return
    for module in (websocket_protocol, twisted_websocket):
        module.hltype = _deferring(util.hltype)
        module.hlval = _deferring(util.hlval)
    websocket_protocol.pformat = _deferring(pprint.pformat)
    # Timings.__str__ returns pformat(...) and must stay a real str.
    websocket_protocol.Timings.__str__ = lambda self: pprint.pformat(self._timings)
