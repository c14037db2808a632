"""relay.flux.protocol: parsing and building Flux v2 messages, no sockets."""
from __future__ import annotations

import json

import pytest

from relay.flux import protocol
from relay.flux.constants import LANGUAGE_CODES
from relay.engines.base import TurnEvent, Word
from relay.exceptions import (
    ConfigureRejected,
    InvalidParameter,
    InvalidSession,
    UnsupportedEncoding,
    UnsupportedSampleRate,
)


def test_defaults_when_query_is_empty():
    params = protocol.parse_connect_params(b"")
    assert params.session_id is None and params.since is None
    assert params.options.encoding == "linear16" and params.options.sample_rate == 16000
    assert params.notices == []


def test_all_flux_parameters_are_parsed():
    qs = (
        b"model=flux-general-en&encoding=linear16&sample_rate=8000&eot_threshold=0.8"
        b"&eager_eot_threshold=0.5&eot_timeout_ms=3000&keyterm=Relay&keyterm=Django&session=abc-1.2:3&since=4"
    )
    params = protocol.parse_connect_params(qs)
    o = params.options
    assert (o.sample_rate, o.eot_threshold, o.eager_eot_threshold, o.eot_timeout_ms) == (8000, 0.8, 0.5, 3000)
    assert o.keyterms == ["Relay", "Django"]
    assert params.session_id == "abc-1.2:3" and params.since == 4
    assert {"eot_threshold", "keyterms", "sample_rate"} <= o.explicit


@pytest.mark.parametrize(
    "qs,exc",
    [
        (b"encoding=speex", UnsupportedEncoding),
        (b"encoding=flac", UnsupportedEncoding),
        (b"sample_rate=96000", UnsupportedSampleRate),
        (b"sample_rate=abc", UnsupportedSampleRate),
        (b"sample_rate=4000", UnsupportedSampleRate),
        (b"eot_threshold=2", InvalidParameter),
        (b"eot_threshold=nan", InvalidParameter),
        (b"eot_timeout_ms=10", InvalidParameter),
        (b"eot_timeout_ms=1000.5", InvalidParameter),
        (b"eot_threshold=0.6&eager_eot_threshold=0.8", InvalidParameter),
        (b"session=" + b"a" * 129, InvalidSession),
        (b"session=", InvalidSession),
        (b"session=%2F..%2Fetc", InvalidSession),
        (b"session=a%00b", InvalidSession),
        (b"session=a&session=b", InvalidParameter),
        (b"since=x", InvalidParameter),
        (b"keyterm=", InvalidParameter),
        (b"x=" + b"y" * 9000, InvalidParameter),
        (b"\xff\xfe", InvalidParameter),
    ],
)
def test_bad_parameters_raise_stable_errors(qs, exc):
    with pytest.raises(exc) as info:
        protocol.parse_connect_params(qs)
    assert info.value.code and 4000 <= info.value.close_code <= 4999


def test_unknown_parameters_become_notices():
    params = protocol.parse_connect_params(b"colour=blue&tag=a&mip_opt_out=true")
    assert [n.code for n in params.notices] == ["UNKNOWN_PARAMETER"]


@pytest.mark.parametrize(
    "text,code",
    [("not json", "INVALID_JSON"), ("[1,2]", "INVALID_MESSAGE"), ('{"type":"Nope"}', "UNKNOWN_MESSAGE_TYPE"), ('{"x":1}', "UNKNOWN_MESSAGE_TYPE"), ("[" * 100000, "INVALID_JSON")],
)
def test_bad_client_text(text, code):
    with pytest.raises(protocol.BadClientMessage) as info:
        protocol.parse_client_text(text)
    assert info.value.code == code


def test_client_types_and_finalize_alias():
    assert protocol.parse_client_text('{"type":"CloseStream"}').type == "CloseStream"
    assert protocol.parse_client_text('{"type":"Finalize"}').type == "ForceEndTurn"


def test_configure_validation():
    opts = protocol.parse_connect_params(b"").options
    thresholds, keyterms = protocol.parse_configure({"thresholds": {"eot_threshold": 0.8}, "keyterms": ["x"]}, opts)
    assert thresholds == {"eot_threshold": 0.8} and keyterms == ["x"]
    for bad in ({"thresholds": {"eot_threshold": 5}}, {"thresholds": {"bogus": 1}}, {"thresholds": []}, {}, {"keyterms": "x"}):
        with pytest.raises(ConfigureRejected):
            protocol.parse_configure(bad, opts)


def test_language_hints_need_the_multilingual_model_and_a_language_code():
    params = protocol.parse_connect_params(b"model=flux-general-multi&language_hint=de&language_hint=pt-BR&language=de")
    assert params.options.language_hints == ["de", "pt-BR"] and "language_hints" in params.options.explicit
    assert not params.notices
    assert protocol.parse_connect_params(b"model=flux-general-multi&language=es").options.language_hints == ["es"]
    assert protocol.parse_connect_params(b"model=flux-general-multi").options.language_hints == []
    for bad in (b"language=de", b"model=flux-general-en&language_hint=de", b"model=flux-general-multi&language=xx",
                b"model=flux-general-multi&language=german", b"model=flux-general-multi&language=",
                b"model=flux-general-multi&" + b"&".join(b"language_hint=%s" % c for c in b"de en es fr it nl pt ru ja hi zh".split())):
        with pytest.raises(InvalidParameter):
            protocol.parse_connect_params(bad)
    multi = protocol.parse_connect_params(b"model=flux-general-multi").options
    assert protocol.parse_configure_request({"language_hints": ["de"]}, multi) == ({}, None, ["de"])
    for bad in ({"language_hints": "de"}, {"language_hints": ["klingon"]}, {"language_hints": [1]}):
        with pytest.raises(ConfigureRejected):
            protocol.parse_configure_request(bad, multi)
    with pytest.raises(ConfigureRejected):
        protocol.parse_configure_request({"language_hints": ["de"]}, protocol.parse_connect_params(b"").options)


def test_language_codes_are_whispers():
    tokenizer = pytest.importorskip("faster_whisper.tokenizer")
    assert LANGUAGE_CODES == set(tokenizer._LANGUAGE_CODES)


def test_stamp_adds_sequence_and_request_id():
    body = protocol.warning_body("X", "y")
    msg = json.loads(protocol.stamp(body, sequence_id=7, request_id="r1"))
    assert msg == {"sequence_id": 7, "request_id": "r1", "type": "Warning", "code": "X", "description": "y"}


def test_turn_info_shape():
    ev = TurnEvent("EndOfTurn", 0, "hello world", [Word("hello", 0.9, 0.0, 0.4), Word("world", 0.8)], 0.0, 1.0, 0.9, "manual")
    msg = json.loads(protocol.turn_info_body(ev, turn_index=3, speaker="c1"))
    assert msg["type"] == "TurnInfo" and msg["event"] == "EndOfTurn" and msg["turn_index"] == 3
    assert msg["trigger"] == "manual" and msg["speaker"] == "c1"
    assert msg["words"] == [{"word": "hello", "confidence": 0.9, "start": 0.0, "end": 0.4}, {"word": "world", "confidence": 0.8}]
    update = json.loads(protocol.turn_info_body(TurnEvent("Update", 0), turn_index=0, speaker="c"))
    assert "trigger" not in update


def test_replayed_turn_is_the_live_end_of_turn_plus_replay_fields():
    from datetime import datetime, timezone

    from relay.store.turns import turn_fields, turn_record

    ev = TurnEvent("EndOfTurn", 5, "hola amigo", [Word("hola", 0.91234, 0.1, 0.5), Word("amigo", 0.8)], 0.0, 1.2, 0.876543, None, ["es", "en"])
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    row = {"index": 7, "connection_id": "c1", "created_at": created, **turn_fields(ev)}
    replayed = json.loads(protocol.turn_info_from_record(turn_record(row)))
    live = json.loads(protocol.turn_info_body(ev, turn_index=7, speaker="c1"))
    assert replayed == {**live, "replayed": True, "created_at": "2026-01-02T03:04:05Z"}
    assert replayed["languages"] == ["es", "en"] and replayed["trigger"] == "model"
    row["languages"] = []  # a turn stored without languages replays without the field, like live
    assert "languages" not in json.loads(protocol.turn_info_from_record(turn_record(row)))


def test_flux_defaults_come_from_constants():
    from relay.flux import constants

    options = protocol.parse_connect_params(b"").options
    assert options.model == constants.DEFAULT_MODEL
    success = json.loads(protocol.configure_success_body(options))
    assert success["thresholds"] == {"eot_threshold": constants.DEFAULT_EOT_THRESHOLD, "eot_timeout_ms": constants.DEFAULT_EOT_TIMEOUT_MS}
    # an eager threshold above the default eot_threshold is refused when eot_threshold is unset
    with pytest.raises(InvalidParameter):
        protocol.parse_connect_params(f"eager_eot_threshold={constants.DEFAULT_EOT_THRESHOLD + 0.1:.2f}")
    for kind in constants.CLIENT_MESSAGE_TYPES:
        assert protocol.parse_client_text(json.dumps({"type": kind})).type in constants.CLIENT_MESSAGE_TYPES
