"""relay/server/unmask.py: client frames unmasked by websockets' C apply_mask, byte for byte as
autobahn's own masker does, however the payload arrives in pieces."""
from __future__ import annotations

import random

import autobahn.websocket.protocol as websocket_protocol
import pytest
from autobahn.nvx._xormasker import create_xor_masker as autobahn_masker
from autobahn.websocket.protocol import WebSocketProtocol

from relay.server import unmask


def _in_pieces(masker, payload: bytes, cuts: list[int]) -> tuple[bytes, list[int]]:
    out, pointers, start = [], [], 0
    for end in [*cuts, len(payload)]:
        out.append(masker.process(payload[start:end]))
        pointers.append(masker.pointer())
        start = end
    return b"".join(out), pointers


@pytest.mark.parametrize("seed", range(40))
def test_same_bytes_and_pointers_as_autobahns_masker(seed: int) -> None:
    rng = random.Random(seed)
    mask = rng.randbytes(4)
    payload = rng.randbytes(rng.choice([1, 3, 4, 5, 125, 126, 2560, 65536, rng.randrange(1, 70000)]))
    cuts = sorted(rng.sample(range(len(payload)), min(len(payload) - 1, rng.randrange(0, 6)))) if len(payload) > 1 else []
    ours = _in_pieces(unmask.create_masker(mask, len(payload)), payload, cuts)
    assert ours == _in_pieces(autobahn_masker(mask, len(payload)), payload, cuts)
    assert ours[0] != payload or mask == bytes(4)
    masker = unmask.create_masker(mask, len(payload))
    masker.process(payload[:3])
    masker.reset()
    assert masker.pointer() == 0 and masker.process(payload) == ours[0]


def test_installed_for_autobahns_protocol() -> None:
    assert unmask.install()  # transcription_site.asgi installs it too; a second call changes nothing
    assert unmask.install()
    assert websocket_protocol.create_xor_masker is unmask.create_masker
    assert "create_xor_masker" in WebSocketProtocol.processData.__code__.co_names


def test_without_websockets_speedups_autobahns_masker_stays(monkeypatch) -> None:
    monkeypatch.setattr(unmask, "_apply_mask", None)
    monkeypatch.setattr(websocket_protocol, "create_xor_masker", autobahn_masker)
    assert unmask.install() is False
    assert websocket_protocol.create_xor_masker is autobahn_masker
