"""DJANGO_DEBUG=0 under a real daphne: the demo page, the admin and their static files answer 200,
before `collectstatic` ever ran (plain names, from the finders) and after (hashed names)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pytest

from tests.support.live import ROOT, LiveServer, sqlite_env

pytestmark = [pytest.mark.slow, pytest.mark.live]

PAGES = ("/demo/ai-voice/", "/admin/login/")


def _production_env(tmp_path) -> dict[str, str]:
    return {
        **sqlite_env(tmp_path), "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "x" * 50,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1", "DJANGO_STATIC_ROOT": str(tmp_path / "static"),
    }


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode(errors="replace")


def _static_links(server: LiveServer) -> list[str]:
    links = []
    for page in PAGES:
        status, body = _get(server.http_url + page)
        assert status == 200, page
        links += re.findall(r'(?:href|src)="(/static/[^"]+)"', body)
    assert links
    for link in links:
        assert _get(server.http_url + link)[0] == 200, link
    return links


def test_production_without_collectstatic_serves_pages_and_static_files(tmp_path):
    with LiveServer(_production_env(tmp_path)) as server:
        links = _static_links(server)
    assert "/static/relay/demo.css" in links  # plain names: there is no manifest to hash them with
    assert "static_manifest_missing" in server.output()


def test_production_after_collectstatic_links_hashed_files(tmp_path):
    env = _production_env(tmp_path)
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"], cwd=ROOT, env={**os.environ, **env}, check=True)
    with LiveServer(env) as server:
        links = _static_links(server)
    assert any(re.fullmatch(r"/static/relay/demo\.[0-9a-f]{12}\.css", link) for link in links)
