"""Every shell command the docs mark as runnable runs, against a live server, and succeeds.

The marker: an HTML comment ``<!-- runnable -->`` on the line before a fenced block in README.md
or docs/*.md (invisible when rendered). Each non-empty line of the block is one command (a
trailing ``# comment`` is the reader's, and is run too: bash ignores it). Commands are written
for ``make run``'s address; here ``127.0.0.1:8000`` becomes a fresh daphne (fake engine, its own
SQLite database, which the commands share through DATABASE_URL), with ``.venv/bin`` first on
PATH so ``python`` is the project's. Blocks that need root, systemd, nginx, a TLS host or files
a reader brings (deploy steps, cron lines, ``transcribe meeting.wav``) stay unmarked.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.live import ROOT, LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"


def runnable_commands() -> list[tuple[str, str]]:
    """[(file:line, command)] of every line of every marked block."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARKER:
                continue
            if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
                raise AssertionError(f"{path.name}:{i + 1}: {MARKER} must stand right before a ``` fence")
            for j in range(i + 2, len(lines)):
                if lines[j].startswith("```"):
                    break
                if lines[j].strip():
                    found.append((f"{path.relative_to(ROOT)}:{j + 1}", lines[j].strip()))
    return found


COMMANDS = runnable_commands()


def test_the_docs_mark_commands_to_run():
    assert any("curl" in c for _, c in COMMANDS) and any("transcribe" in c for _, c in COMMANDS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(sqlite_env(tmp_path_factory.mktemp("docs"))) as live:
        yield live


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs(server, where, command):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update({"DATABASE_URL": server.env["DATABASE_URL"], "DJANGO_DEBUG": "1", "RELAY_ENGINE": "fake",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    line = command.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{where}: {command}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-2000:]}"


def test_the_426_status_line_has_its_reason_phrase(server):
    """What README's `curl -i .../v2/listen` shows first: not `426 Unknown Status`."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/v2/listen")
    response = conn.getresponse()
    assert (response.status, response.reason) == (426, "Upgrade Required")
    conn.close()
