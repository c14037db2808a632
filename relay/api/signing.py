"""Webhook signatures: ``X-Relay-Signature: sha256=<hex>`` over ``"<timestamp>." + body``.

The timestamp (``X-Relay-Timestamp``, Unix seconds) is inside what is signed, so a receiver that
refuses timestamps older than a few minutes also refuses replays of a captured request. This
module is what a receiver written in Python can copy (docs/api.md has the same in a few lines).
"""
from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Relay-Signature"
TIMESTAMP_HEADER = "X-Relay-Timestamp"
EVENT_HEADER = "X-Relay-Event"
DELIVERY_HEADER = "X-Relay-Delivery"
SCHEME = "sha256"


def signature(*, secret: str, timestamp: int, body: bytes) -> str:
    """The header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def verify(*, secret: str, header: str, timestamp: str, body: bytes, tolerance_seconds: float = 300.0, now: float | None = None) -> bool:
    """True when ``header`` signs ``body`` at ``timestamp`` with ``secret``, and it is recent."""
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - sent) > tolerance_seconds:
        return False
    return hmac.compare_digest(signature(secret=secret, timestamp=sent, body=body), header or "")
