"""Structured logs: one line per event, the event's keyword arguments as fields, in kv, json or plain."""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest

from relay.ops.logs import EventFormatter, get_logger

CLOSE = {"session": "s-1", "connection": "c-1", "code": 1006, "reason": "connection lost", "duration": "12.3s"}


@pytest.fixture
def lines() -> Iterator[Callable[[str], tuple[logging.Logger, io.StringIO]]]:
    """A stdlib logger of its own whose only handler writes with EventFormatter(output)."""
    made: list[logging.Logger] = []

    def make(output: str) -> tuple[logging.Logger, io.StringIO]:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(EventFormatter(output))
        logger = logging.getLogger(f"tests.logs.{output}.{len(made)}")
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        made.append(logger)
        return logger, out

    yield make
    for logger in made:
        logger.handlers.clear()


def boom() -> None:
    raise RuntimeError("boom\nsecond line")


def test_kv_lines_name_the_event_and_keep_its_fields(lines):
    logger, out = lines("kv")
    get_logger(logger.name).info("client_disconnected", **CLOSE)
    line = out.getvalue()
    assert line.startswith("ts=") and line.count("\n") == 1
    assert f" level=info logger={logger.name} event=client_disconnected session=s-1 connection=c-1 code=1006 reason=\"connection lost\" duration=12.3s\n" in line


def test_json_lines_carry_the_fields_with_their_types(lines):
    logger, out = lines("json")
    get_logger(logger.name).warning("client_disconnected", **CLOSE, healthy=False)
    data = json.loads(out.getvalue())
    assert data["event"] == "client_disconnected" and data["level"] == "warning" and data["logger"] == logger.name
    assert data["ts"].endswith("Z") and data["code"] == 1006 and data["healthy"] is False
    assert data["reason"] == "connection lost" and data["duration"] == "12.3s"


def test_plain_is_time_level_logger_then_the_event(lines):
    logger, out = lines("plain")
    get_logger(logger.name).info("client_disconnected", **CLOSE)
    line = out.getvalue()
    assert line.endswith(f" INFO {logger.name} client_disconnected session=s-1 connection=c-1 code=1006 reason=\"connection lost\" duration=12.3s\n")


def test_values_that_look_like_pairs_stay_whole(lines):
    tricky = "server rejected: status=server says \"no\""
    json_logger, json_out = lines("json")
    kv_logger, kv_out = lines("kv")
    for logger in (json_logger, kv_logger):
        get_logger(logger.name).warning("upstream_rejected", engine="deepgram", status=tricky)
    data = json.loads(json_out.getvalue())
    assert data["status"] == tricky and data["engine"] == "deepgram" and "says" not in data
    assert 'engine=deepgram status="server rejected: status=server says \\"no\\""\n' in kv_out.getvalue()


def test_foreign_percent_s_records_render_the_same_way(lines):
    kv_logger, kv_out = lines("kv")
    json_logger, json_out = lines("json")
    plain_logger, plain_out = lines("plain")
    for logger in (kv_logger, json_logger, plain_logger):
        logger.warning("Not Found: %s\nmore", "/x", extra={"status_code": 404})
    assert f"level=warning logger={kv_logger.name} event=\"Not Found: /x\\nmore\" status_code=404\n" in kv_out.getvalue()
    data = json.loads(json_out.getvalue())
    assert data["event"] == "Not Found: /x\nmore" and data["status_code"] == 404 and data["level"] == "warning"
    assert plain_out.getvalue().endswith(f" WARNING {plain_logger.name} Not Found: /x\\nmore status_code=404\n")


@pytest.mark.parametrize("output", ["kv", "json", "plain"])
def test_tracebacks_stay_on_the_event_line(lines, output):
    logger, out = lines(output)
    try:
        boom()
    except RuntimeError:
        get_logger(logger.name).exception("engine_failed", session="s-2")
        logger.error("Internal Server Error: %s", "/x", exc_info=True)
    relay_line, foreign_line = out.getvalue().splitlines()
    for line in (relay_line, foreign_line):
        if output == "json":
            data = json.loads(line)
            assert data["exc"].startswith("Traceback") and data["exc"].endswith("RuntimeError: boom\nsecond line")
        else:
            assert 'exc="Traceback (most recent call last):\\n' in line and line.endswith('RuntimeError: boom\\nsecond line"')
    assert "session" in relay_line and "engine_failed" in relay_line and "/x" in foreign_line


def test_an_exception_object_as_exc_info_is_rendered(lines):
    logger, out = lines("kv")
    try:
        boom()
    except RuntimeError as exc:
        failed = exc
    get_logger(logger.name).error("upstream_failed", engine="deepgram", exc_info=failed)
    assert "event=upstream_failed engine=deepgram exc=\"Traceback" in out.getvalue()


def test_events_below_the_level_are_dropped(lines):
    logger, out = lines("kv")
    get_logger(logger.name).debug("frame_received", size=3200)
    assert out.getvalue() == ""


def test_caplog_and_other_handlers_read_the_event_as_a_line(caplog):
    with caplog.at_level(logging.INFO, logger="relay.tests"):
        try:
            boom()
        except RuntimeError:
            get_logger("relay.tests").exception("engine_failed", session="s-2", reason="no luck")
    record = caplog.records[-1]
    assert record.name == "relay.tests" and record.levelno == logging.ERROR and record.exc_info[0] is RuntimeError
    assert record.getMessage() == 'engine_failed session=s-2 reason="no luck"'
    assert "engine_failed session=s-2" in caplog.text and "RuntimeError: boom" in caplog.text


def test_settings_logging_uses_the_event_formatter():
    assert any(isinstance(h.formatter, EventFormatter) for h in logging.getLogger().handlers)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        EventFormatter("xml")
