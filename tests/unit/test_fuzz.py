"""Hypothesis-driven hostile input against the protocol parser and the consumer.

The relay must never crash, never return a traceback, never hang and never leak on malformed
frames, JSON, query strings or headers: every answer is a Flux message with a stable code.
"""
from __future__ import annotations

import asyncio
import json
import logging
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from relay.flux import protocol
from relay.exceptions import RelayError
from tests.support.wsclient import Client, ConnectionClosed

KNOWN_WARNINGS = {"INVALID_JSON", "INVALID_MESSAGE", "UNKNOWN_MESSAGE_TYPE"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
control_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["Configure", "ForceEndTurn", "CloseStream", "KeepAlive", "Finalize", "X", ""])},
    optional={"thresholds": json_values, "keyterms": json_values},
)


@given(st.binary(max_size=600))
@hsettings(max_examples=300)
def test_query_strings_raise_only_relay_errors(raw):
    try:
        protocol.parse_connect_params(raw)
    except RelayError as exc:
        assert exc.code and 4000 <= exc.close_code <= 4999


@given(st.text(max_size=300) | json_values.map(json.dumps) | control_like.map(json.dumps))
@hsettings(max_examples=300)
def test_text_frames_parse_or_warn(text):
    try:
        msg = protocol.parse_client_text(text)
    except protocol.BadClientMessage as exc:
        assert exc.code in KNOWN_WARNINGS
        return
    if msg.type == "Configure":
        opts = protocol.parse_connect_params(b"").options
        try:
            protocol.parse_configure(msg.data, opts)
        except RelayError as exc:
            assert exc.code == "INVALID_CONFIGURE"


frames = st.lists(
    st.one_of(
        st.binary(max_size=3000).map(lambda b: ("bytes", b)),
        st.text(max_size=200).map(lambda t: ("text", t)),
        control_like.map(lambda d: ("text", json.dumps(d))),
    ),
    max_size=12,
)
headers = st.lists(
    st.tuples(st.sampled_from([b"authorization", b"user-agent", b"cookie", b"x-forwarded-for", b"accept-language"]), st.binary(max_size=80)),
    max_size=3,
)


@pytest.mark.django_db(transaction=True)
@given(query=st.binary(max_size=200), sequence=frames, extra_headers=headers)
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_consumer_survives_any_frame_sequence(query, sequence, extra_headers):
    async def run():
        from urllib.parse import quote_from_bytes

        client = Client("/v2/listen?" + quote_from_bytes(query, safe="=&"), headers=extra_headers)
        connected, _ = await client.comm.connect(timeout=10)
        assert connected
        closed = False
        try:
            for kind, payload in sequence:
                if kind == "bytes":
                    await client.comm.send_input({"type": "websocket.receive", "bytes": payload})
                else:
                    await client.comm.send_input({"type": "websocket.receive", "text": payload})
            await client.comm.send_input({"type": "websocket.receive", "text": '{"type":"CloseStream"}'})
            while True:
                try:
                    msg = await client.recv(timeout=10, presence=True)
                except ConnectionClosed as exc:
                    closed = True
                    assert exc.code == 1000 or 4000 <= exc.code <= 4999
                    break
                assert "Traceback" not in json.dumps(msg)
                assert isinstance(msg["sequence_id"], int) and msg["type"] in {
                    "Connected", "Presence", "TurnInfo", "Warning", "Error", "ConfigureSuccess", "ConfigureFailure",
                }
        finally:
            await client.comm.disconnect(code=1000, timeout=10)

    asyncio.run(run())


@pytest.mark.django_db(transaction=True)
def test_repeated_hostile_connections_do_not_leak():
    """Many short connections with garbage: traced memory returns to its level (no growth per connection)."""
    import gc

    async def one(i: int):
        c = Client(f"/v2/listen?session=leak-{i % 3}&junk={'x' * 50}")
        await c.connect()
        await c.comm.send_to(text_data="{not json")
        await c.comm.send_to(bytes_data=b"\x01" * 3001)
        await c.comm.send_to(text_data='{"type":"CloseStream"}')
        while True:
            try:
                await c.recv(presence=True)
            except ConnectionClosed:
                break
        await c.comm.disconnect(code=1000, timeout=10)

    async def batch(n):
        for i in range(n):
            await one(i)

    # pytest keeps every captured log record in memory for its report; quiet the relay's INFO
    # lines so the measurement sees the server, not the test runner.
    relay_log = logging.getLogger("relay")
    old_level = relay_log.level
    relay_log.setLevel(logging.WARNING)
    asyncio.run(batch(20))  # warm caches
    gc.collect()
    tracemalloc.start()
    asyncio.run(batch(60))
    gc.collect()
    first, _ = tracemalloc.get_traced_memory()
    asyncio.run(batch(60))
    gc.collect()
    second, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    relay_log.setLevel(old_level)
    # 60 more connections must not keep more than ~1 KB each.
    assert second - first < 60 * 1024, (first, second)
