"""Unmask client frames with websockets' C ``apply_mask`` instead of autobahn's CFFI masker.

Every frame a client sends is XOR-masked (RFC 6455 5.3), and daphne's WebSocket library makes a
new masker object for each one. autobahn's native masker (``autobahn.nvx``) does the XOR itself
in C, but each frame also pays for its Python wrapper: an import statement, two CFFI
allocations, a finaliser, a call to pick the implementation, and a copy into and out of a CFFI
buffer. For an 80 ms frame of 16 kHz PCM (2,560 bytes) that is about 7 µs, where websockets'
``apply_mask`` (a C extension of a package the relay already depends on) takes about 0.6 µs.
Here autobahn's protocol module gets a masker with the same interface (``process``,
``pointer``, ``reset``) that calls ``apply_mask``. Without websockets' C speedups (a platform
with no wheel), autobahn's own masker stays.

Touches: ``create_xor_masker`` as ``autobahn.websocket.protocol`` imported it, which
``WebSocketProtocol.processData`` calls once per received frame.
"""
from __future__ import annotations

from relay.server.patches import Patch, Target, require

PATCH = Patch(
    name="unmask",
    purpose="unmask client frames with websockets' C apply_mask",
    framework="autobahn",
    targets=(
        Target("autobahn", "autobahn.websocket.protocol", "create_xor_masker", params=("mask", "length")),
        Target("autobahn", "autobahn.websocket.protocol", "WebSocketProtocol.processData", params=("self",),
               uses=("create_xor_masker",)),
    ),
)


def _speedups():
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # websockets built without its C extension
        return None
    return apply_mask


class Masker:
    """One frame's unmasking, fed the payload in pieces as they arrive."""

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask: bytes) -> None:
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self) -> int:
        """How many payload bytes have been processed."""
        return self._ptr

    def reset(self) -> None:
        self._ptr = 0

    def process(self, data: bytes) -> bytes:
        shift = self._ptr & 3
        mask = self._mask if not shift else self._mask[shift:] + self._mask[:shift]
        self._ptr += len(data)
        return _apply_mask(data, mask)


def create_masker(mask: bytes, length: int | None = None) -> Masker:
    return Masker(mask)


_apply_mask = _speedups()


def install() -> bool:
    """Patch autobahn's protocol module; False when autobahn or websockets' speedups are absent."""
    if _apply_mask is None or not require(PATCH):
        return False
    import autobahn.websocket.protocol as websocket_protocol

    websocket_protocol.create_xor_masker = create_masker
    return True
