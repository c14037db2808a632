"""relay.server.clean_close: only a server's finished closing handshake is closed in order; every
other drop autobahn asks to abort (a handshake timeout, a ping timeout, a slow reader) still aborts."""
from __future__ import annotations

from types import SimpleNamespace

from relay.server.clean_close import should_abort


def protocol(*, clean: bool, server: bool = True) -> SimpleNamespace:
    return SimpleNamespace(wasClean=clean, factory=SimpleNamespace(isServer=server))


def test_a_clean_server_close_is_not_aborted():
    assert not should_abort(protocol(clean=True), True)


def test_unclean_drops_and_clients_still_abort_when_asked():
    assert should_abort(protocol(clean=False), True)
    assert should_abort(protocol(clean=True, server=False), True)
    assert not should_abort(protocol(clean=False), False)
