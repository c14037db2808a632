"""Log lines for machines and people: one line per event, its fields kept as fields.

Relay code logs events, not sentences: ``log.info("client_connected", session=sid, code=code)``
through :func:`get_logger`, a structlog logger bound to the stdlib logger of that name, so
levels, handlers, Django's ``LOGGING`` and pytest's caplog work as they always did. Values are
never parsed back out of a message, so a value may hold spaces, quotes or ``status=server``.

:class:`EventFormatter` (a structlog ``ProcessorFormatter``) is the handler's formatter. It
renders relay events and records from other libraries (Django, daphne, channels_redis log
``%s`` messages; the message becomes ``event``) alike, one line each, tracebacks included
(``exc``), as ``RELAY_LOG_FORMAT`` chooses: ``kv`` (logfmt), ``json`` or ``plain``
(``time level logger message``).
"""
from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

OUTPUTS = ("kv", "json", "plain")

logfmt = structlog.processors.LogfmtRenderer(key_order=["ts", "level", "logger", "event"], drop_missing=True, bool_as_flag=False)


def render_message(fields: dict[str, Any]) -> str:
    """``event key=value ...``: the message of a relay record, and the ``plain`` line after its prefix."""
    fields = dict(fields)
    text = str(fields.pop("event", "")).replace("\r", "\\r").replace("\n", "\\n")
    rest = logfmt(None, "", fields)
    return f"{text} {rest}" if rest else text


class Event(dict):
    """A relay event on a stdlib record; handlers other than EventFormatter (caplog) read it as a line."""

    def __str__(self) -> str:
        return render_message(self)


def to_stdlib(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> tuple[tuple[Event], dict[str, Any]]:
    """Last structlog processor: the event rides on the record as its message, the exception as exc_info.

    Like ``ProcessorFormatter.wrap_for_formatter``, but the record carries its traceback like any
    stdlib record (caplog, other handlers) and its message reads as ``event key=value``.
    """
    kwargs = {"extra": {"_logger": logger, "_name": method_name}}
    for key in ("exc_info", "stack_info"):
        if key in event_dict:
            kwargs[key] = event_dict.pop(key)
    return (Event(event_dict),), kwargs


def configure() -> None:
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            to_stdlib,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


if not structlog.is_configured():
    configure()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """The logger for relay code: ``get_logger("relay.consumer").info("event_name", key=value)``."""
    return structlog.stdlib.get_logger(name)


class EventFormatter(structlog.stdlib.ProcessorFormatter):
    def __init__(self, output: str = "kv", **kwargs: Any) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"RELAY_LOG_FORMAT must be kv, json or plain, not {output!r}")
        if output == "plain":
            kwargs.setdefault("fmt", "%(asctime)s %(levelname)s %(name)s %(message)s")
            renderer = self.render_plain
        elif output == "json":
            renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
        else:
            renderer = logfmt
        super().__init__(
            processors=[self.fields, renderer],
            foreign_pre_chain=[structlog.stdlib.ExtraAdder()],
            # fields() takes the traceback off the record copy itself, so it is rendered once, inline.
            keep_exc_info=True,
            keep_stack_info=True,
            **kwargs,
        )
        self.output = output

    def fields(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        """Time, level and logger from the record, then the event and its fields, then ``exc``."""
        record: logging.LogRecord = event_dict.pop("_record")
        event_dict.pop("_from_structlog", None)
        exc_info = event_dict.pop("exc_info", None) or record.exc_info
        stack = event_dict.pop("stack_info", None) or record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        fields = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event_dict.pop("event", ""),
        }
        fields.update(event_dict)
        if exc_info:
            if exc_info is True:
                exc_info = sys.exc_info()
            elif isinstance(exc_info, BaseException):
                exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
            if exc_info[0] is not None:
                fields["exc"] = self.formatException(exc_info)
        if stack:
            fields["stack"] = stack
        return fields

    @staticmethod
    def render_plain(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
        return render_message({k: v for k, v in event_dict.items() if k not in {"ts", "level", "logger"}})
