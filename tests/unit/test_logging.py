"""Structured logs: one line per event, with the event's key=value pairs as fields."""
from __future__ import annotations

import json
import logging

import pytest

from relay.ops.logs import EventFormatter, parse_pairs


def record(msg: str, *args, exc: bool = False, **extra) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            import sys

            exc_info = sys.exc_info()
    rec = logging.LogRecord("relay.consumer", logging.INFO, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


CLOSE = ("client_disconnected session=%s connection=%s code=%s reason=%r duration=%.1fs", "s-1", "c-1", 1006, "connection lost", 12.34)


def test_kv_lines_name_the_event_and_keep_its_pairs():
    line = EventFormatter("kv").format(record(*CLOSE))
    assert line.startswith("ts=") and "\n" not in line
    assert " level=info logger=relay.consumer event=client_disconnected session=s-1 connection=c-1 code=1006 reason='connection lost' duration=12.3s" in line


def test_json_lines_parse_pairs_into_fields():
    data = json.loads(EventFormatter("json").format(record(*CLOSE, worker=3)))
    assert data["event"] == "client_disconnected" and data["session"] == "s-1" and data["code"] == "1006"
    assert data["reason"] == "connection lost" and data["duration"] == "12.3s" and data["worker"] == 3


def test_tracebacks_and_plain_sentences_stay_on_one_line():
    line = EventFormatter("kv").format(record("engine_failed session=%s", "s-2", exc=True))
    assert "\n" not in line and "event=engine_failed session=s-2 exc=\"Traceback" in line and "boom\\nsecond line" in line
    line = EventFormatter("kv").format(record("Not Found: /x\nmore"))
    assert line.endswith('msg="Not Found: /x\\nmore"')
    data = json.loads(EventFormatter("json").format(record("engine_failed session=%s", "s-2", exc=True)))
    assert data["exc"].startswith("Traceback") and data["session"] == "s-2"


def test_plain_keeps_the_classic_layout_on_one_line():
    line = EventFormatter("plain").format(record("hello\nworld"))
    assert line.endswith("INFO relay.consumer hello\\nworld")


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        EventFormatter("xml")


def test_parse_pairs_handles_quotes():
    assert parse_pairs("a=1 b='x y' c=\"q\\\"z\" d=") == {"a": "1", "b": "x y", "c": 'q"z', "d": ""}
