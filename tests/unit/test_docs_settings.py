"""docs/settings.md documents every environment variable the relay reads, and only those.

Read: every ``os.environ.get("X")`` / ``os.environ["X"]`` / ``env_bool("X", ...)`` (and env_int,
env_float, env_list) in transcription_site/settings.py, every ``X=`` line of
deploy/relay.env.example, and the Makefile's HOST and PORT. Documented: the first column of the
tables in docs/settings.md. Gone: a documented name that no file of the relay mentions any more.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_DOC = ROOT / "docs" / "settings.md"
READS = re.compile(r"""(?:os\.environ\.get|env_bool|env_int|env_float|env_list)\(\s*["']([A-Z][A-Z0-9_]*)["']|os\.environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]""")
#: Where a variable may be read or set, for the "nothing documented is gone" direction.
CODE = [ROOT / "transcription_site", ROOT / "relay", ROOT / "deploy", ROOT / "Makefile"]


def settings_reads() -> set[str]:
    text = (ROOT / "transcription_site" / "settings.py").read_text()
    return {a or b for a, b in READS.findall(text)}


def env_example_names() -> set[str]:
    lines = (ROOT / "deploy" / "relay.env.example").read_text().splitlines()
    return {m.group(1) for line in lines if (m := re.match(r"([A-Z][A-Z0-9_]*)=", line))}


def documented() -> set[str]:
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", SETTINGS_DOC.read_text(), flags=re.M))


def code_text() -> str:
    parts = []
    for place in CODE:
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file() and p.suffix in {".py", ".service", ".target", ".conf", ".example", ""}]
        parts += [f.read_text(errors="replace") for f in files if "__pycache__" not in f.parts]
    return "\n".join(parts)


def test_the_parser_finds_reads_across_lines():
    reads = settings_reads()
    assert {"DJANGO_DEBUG", "DATABASE_URL", "RELAY_HSTS_SECONDS", "CLOUDFLARE_URL", "RELAY_CHANNEL_LAYER_BACKEND"} <= reads
    assert {"DAPHNE_FLAGS", "RELAY_MAX_STREAMS_PER_PROCESS"} <= env_example_names()


def test_every_variable_read_or_set_is_documented():
    missing = (settings_reads() | env_example_names() | {"HOST", "PORT"}) - documented()
    assert not missing, f"read by settings.py or set by deploy/relay.env.example but not in docs/settings.md: {sorted(missing)}"


def test_nothing_documented_is_gone():
    code = code_text()
    gone = sorted(name for name in documented() if not re.search(rf"\b{name}\b", code))
    assert not gone, f"docs/settings.md documents variables nothing reads any more: {gone}"
