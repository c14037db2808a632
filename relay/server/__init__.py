"""Every patch of daphne's, autobahn's, Twisted's and Channels' internals, one module each.

Each module names the private attributes it relies on and checks them before it patches
(relay.server.patches): a framework that is not installed leaves its patch a no-op, an upgrade
that moved one of them stops the process with PatchTargetMissing. ``transcription_site.asgi``
calls :func:`install` once, before the application serves anything.
"""
from __future__ import annotations

from typing import Any

from relay.server.patches import PatchTargetMissing

__all__ = ["PatchTargetMissing", "install"]


def install(settings: Any) -> None:
    """Install every patch with its limits from ``settings``; calling it again only updates them."""
    from relay.server import autobahn_logs, clean_close, close_reason, consumer_loop, denial_response, direct_write, inbound_flow, send_limit, shutdown, unmask

    consumer_loop.install()
    autobahn_logs.install()
    unmask.install()
    direct_write.install()
    close_reason.install()
    denial_response.install()
    clean_close.install()
    send_limit.install(limit_bytes=settings.RELAY_MAX_SEND_BUFFER_BYTES)
    inbound_flow.install(limit=settings.RELAY_MAX_INBOUND_MESSAGES)
    shutdown.install(timeout=settings.RELAY_SHUTDOWN_TIMEOUT_SECONDS)
