"""The demo page and its static files: rendered by Django, served by whitenoise (dev and production)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser

import pytest

from relay.web import demo
from tests.support.live import ROOT, LiveServer, sqlite_env

STATIC_DIR = ROOT / "relay" / "static" / "relay"


class AssetParser(HTMLParser):
    """Collects what the page loads: stylesheet, scripts, the import map and the config."""

    def __init__(self) -> None:
        super().__init__()
        self.assets: list[str] = []
        self.scripts: dict[str, str] = {}
        self._script: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and attrs.get("rel") in ("stylesheet", "icon"):
            self.assets.append(attrs["href"])
        if tag == "script":
            if attrs.get("src"):
                self.assets.append(attrs["src"])
            self._script = attrs.get("type") if attrs.get("type") == "importmap" else attrs.get("id")

    def handle_data(self, data):
        if self._script:
            self.scripts[self._script] = self.scripts.get(self._script, "") + data

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None


@pytest.fixture(autouse=True)
def _static_root(settings, tmp_path):
    """An existing STATIC_ROOT, so whitenoise does not warn about a missing one in development."""
    settings.STATIC_ROOT = tmp_path


def parse(html: str) -> AssetParser:
    parser = AssetParser()
    parser.feed(html)
    return parser


def page_assets(html: str) -> tuple[list[str], dict, dict]:
    parsed = parse(html)
    import_map = json.loads(parsed.scripts["importmap"])
    config = json.loads(parsed.scripts["relay-config"])
    urls = parsed.assets + list(import_map["imports"].values()) + [config["workletUrl"]]
    return urls, import_map, config


def test_page_renders_with_everything_a_person_uses(client):
    response = client.get("/demo/ai-voice/")
    assert response.status_code == 200
    html = response.content.decode()
    for needle in (
        'id="mic"',
        'role="meter"',
        'id="share-link"',
        'id="language"',
        'aria-live="polite"',
        'role="log"',
        'data-download="txt"',
        'data-download="srt"',
        'data-download="vtt"',
        'role="alert"',
        'name="viewport"',
    ):
        assert needle in html, needle
    assert "cdn" not in html.lower() and "https://" not in html  # everything is served from here
    _, import_map, config = page_assets(html)
    assert config["wsPath"] == "/v2/listen" and config["bufferSeconds"] == 30
    assert set(import_map["imports"]) == {f"/static/relay/{name}" for name in demo.MODULES}


def test_every_imported_module_is_in_the_import_map():
    """A module missing from demo.MODULES would load unhashed (stale cache) in production."""
    imported = set()
    for path in STATIC_DIR.glob("*.js"):
        imported.update(re.findall(r'from "\./([\w-]+\.js)"', path.read_text()))
    assert imported <= set(demo.MODULES)
    assert {p.name for p in STATIC_DIR.glob("*.js")} == set(demo.MODULES) | {"pcm-worklet.js"}


def test_root_and_slashless_path_redirect_to_the_page_keeping_the_session(client):
    response = client.get("/?session=abc")
    assert response.status_code == 302 and response["Location"] == "/demo/ai-voice/?session=abc"
    response = client.get("/demo/ai-voice?session=abc")
    assert response.status_code == 301 and response["Location"] == "/demo/ai-voice/?session=abc"


def test_static_files_are_served_in_development(client):
    html = client.get("/demo/ai-voice/").content.decode()
    urls, _, _ = page_assets(html)
    assert len(urls) >= 8
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, url
        body = b"".join(response.streaming_content) if response.streaming else response.content
        assert body, url
    js = client.get("/static/relay/app.js")
    assert js["Content-Type"].startswith("text/javascript")


@pytest.mark.slow
@pytest.mark.live
def test_collectstatic_then_debug_off_serves_hashed_assets(tmp_path):
    static_root = tmp_path / "static"
    prod = {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "static-test-only",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_STATIC_ROOT": str(static_root),
    }
    env = {**os.environ, **prod}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    manifest = json.loads((static_root / "staticfiles.json").read_text())["paths"]
    assert "relay/app.js" in manifest and "relay/pcm-worklet.js" in manifest

    with LiveServer({**sqlite_env(tmp_path), **prod}) as server:
        html = urllib.request.urlopen(server.http_url + "/demo/ai-voice/", timeout=10).read().decode()
        urls, import_map, _ = page_assets(html)
        for name in demo.MODULES:  # plain module URLs map to the hashed files
            assert import_map["imports"][f"/static/relay/{name}"] == "/static/" + manifest[f"relay/{name}"]
        for url in urls:
            assert re.search(r"\.[0-9a-f]{12}\.(js|css|svg)$", url), url
            request = urllib.request.Request(server.http_url + url, headers={"Accept-Encoding": "gzip"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200, url
                assert "immutable" in response.headers["Cache-Control"], url
                if url.endswith(".js"):
                    assert response.headers["Content-Type"].startswith("text/javascript"), url
                    assert response.headers.get("Content-Encoding") == "gzip", url
        missing = urllib.request.Request(server.http_url + "/static/relay/nope.js")
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(missing, timeout=10)
        assert exc.value.code == 404
