"""Log lines for machines and people: one line per event, whatever the message holds.

The relay logs events as ``"event_name key=value key=value"`` (``client_connected session=...
connection=... code=... duration=...``). :class:`EventFormatter` keeps each record on one line
(tracebacks and newlines are escaped), prefixes time, level and logger, and in ``json`` mode
parses the pairs into fields so a log shipper can index session and connection ids, durations
and close codes without regexes. Chosen by ``RELAY_LOG_FORMAT`` (kv, json or plain).
"""
from __future__ import annotations

import ast
import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

EVENT_RE = re.compile(r"^([a-z][a-z0-9_]*)(?: (.*))?$", re.DOTALL)
PAIR_RE = re.compile(r"""([A-Za-z_][\w.]*)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S*)""")
SAFE_VALUE_RE = re.compile(r"^[^\s\"'=]+$")

#: LogRecord attributes that are not ``extra=`` fields.
RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def parse_pairs(text: str) -> dict[str, str]:
    """``a=1 b='x y'`` -> {"a": "1", "b": "x y"} (quoted values as written by %r)."""
    pairs = {}
    for key, raw in PAIR_RE.findall(text):
        if raw[:1] in {"'", '"'}:
            try:
                raw = str(ast.literal_eval(raw))
            except (ValueError, SyntaxError):
                raw = raw[1:-1]
        pairs[key] = raw
    return pairs


def kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and SAFE_VALUE_RE.match(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class EventFormatter(logging.Formatter):
    def __init__(self, output: str = "kv", **kwargs: Any) -> None:
        super().__init__(kwargs.get("format") or "%(asctime)s %(levelname)s %(name)s %(message)s")
        if output not in {"kv", "json", "plain"}:
            raise ValueError(f"RELAY_LOG_FORMAT must be kv, json or plain, not {output!r}")
        self.output = output

    def format(self, record: logging.LogRecord) -> str:
        if self.output == "plain":
            return super().format(record).replace("\n", "\\n")
        message = record.getMessage()
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        match = EVENT_RE.match(message)
        rest = ""
        if match and (match.group(2) is None or "=" in match.group(2)):
            fields["event"] = match.group(1)
            rest = match.group(2) or ""
        else:
            fields["msg"] = message
        extras = {k: v for k, v in vars(record).items() if k not in RESERVED and not k.startswith("_")}
        exc = ""
        if record.exc_info:
            exc = self.formatException(record.exc_info)
        elif record.exc_text:
            exc = record.exc_text
        if self.output == "json":
            fields.update(parse_pairs(rest))
            fields.update({k: v if isinstance(v, (int, float, bool)) or v is None else str(v) for k, v in extras.items()})
            if exc:
                fields["exc"] = exc
            return json.dumps(fields, ensure_ascii=False)
        parts = [f"{k}={kv_value(v)}" for k, v in fields.items()]
        if rest:
            parts.append(rest.replace("\n", "\\n"))
        parts.extend(f"{k}={kv_value(v)}" for k, v in extras.items())
        if exc:
            parts.append(f"exc={kv_value(exc)}")
        return " ".join(parts)
