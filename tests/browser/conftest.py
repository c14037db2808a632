"""Browser tests: Playwright for Python driving Debian's Chromium against a real daphne.

The server runs as in production (DJANGO_DEBUG=0, assets from ``collectstatic`` served by
whitenoise), so these tests also prove the page's hashed static files load. A WAV file is the
microphone (``--use-file-for-fake-audio-capture``); the flag is per browser launch, so each test
launches its own Chromium with its own WAV. Screenshots go to test-artifacts/browser/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from tests.support.live import ROOT, LiveServer, sqlite_env

CHROMIUM = os.environ.get("RELAY_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]
DESKTOP = {"width": 1180, "height": 860}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 30_000  # the longest any single wait for the page may take
expect.set_options(timeout=WAIT_MS)


def production_env(static_root: Path) -> dict[str, str]:
    return {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": "browser-tests-only",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_STATIC_ROOT": str(static_root),
    }


def collectstatic(static_root: Path) -> None:
    env = {**os.environ, **production_env(static_root)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)


@pytest.fixture(scope="package")
def static_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("staticfiles")
    collectstatic(root)
    return root


def start_server(tmp_path_factory, static_root: Path, engine: str, **extra: str) -> LiveServer:
    env = sqlite_env(tmp_path_factory.mktemp(f"db-{engine}"))
    return LiveServer({**env, **production_env(static_root), "RELAY_ENGINE": engine, **extra}, log_name=f"daphne-{engine}").start()


@pytest.fixture(scope="package")
def fake_server(tmp_path_factory, static_root) -> Iterator[LiveServer]:
    """daphne with the fake engine: tone bursts become "one two three ..." turns."""
    server = start_server(tmp_path_factory, static_root, "fake")
    yield server
    server.stop()


def wait_until_ready(server: LiveServer, timeout: float = 120) -> None:
    """Until /healthz answers 200: the whisper model has loaded (503 until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(server.http_url + "/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"whisper never became ready: {exc.read()[:500]!r}\n{server.output()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="package")
def whisper_server(tmp_path_factory, static_root) -> Iterator[LiveServer]:
    """daphne with the default engine (whisper), once its model is loaded (/healthz says ready)."""
    server = start_server(tmp_path_factory, static_root, "whisper")
    wait_until_ready(server)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def playwright_instance() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture
def launch(playwright_instance) -> Iterator[Callable[..., Browser]]:
    """``launch(wav)`` starts Chromium with ``wav`` as its microphone (played once, then silence)."""
    browsers: list[Browser] = []

    def _launch(wav: Path | None = None, *, fake_ui: bool = True) -> Browser:
        flags = [f for f in CHROMIUM_FLAGS if fake_ui or f != "--use-fake-ui-for-media-stream"]
        if wav is not None:
            flags.append(f"--use-file-for-fake-audio-capture={wav}%noloop")
        browser = playwright_instance.chromium.launch(executable_path=CHROMIUM, args=flags, timeout=WAIT_MS)
        browsers.append(browser)
        return browser

    yield _launch
    for browser in browsers:
        browser.close()


def resume_worklets(page: Page) -> None:
    """Work around microsoft/playwright#37592: with Playwright 1.55 an AudioWorklet's target
    stays paused waiting for a debugger, so ``audioWorklet.addModule()`` never settles. A second
    CDP session attaches to worklet targets as they appear and lets them run."""
    cdp = page.context.new_cdp_session(page)

    def attached(event: dict) -> None:
        if event["targetInfo"]["type"] == "worklet":
            message = json.dumps({"id": 1, "method": "Runtime.runIfWaitingForDebugger"})
            cdp.send("Target.sendMessageToTarget", {"sessionId": event["sessionId"], "message": message})

    cdp.on("Target.attachedToTarget", attached)
    cdp.send("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": False, "flatten": False})


def new_page(browser: Browser, viewport: dict[str, int] = DESKTOP, color_scheme: str = "light") -> Page:
    context = browser.new_context(
        viewport=viewport, device_scale_factor=1, accept_downloads=True, color_scheme=color_scheme
    )
    page = context.new_page()
    resume_worklets(page)
    page.set_default_timeout(WAIT_MS)
    messages = []
    page.on("console", lambda msg: messages.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: messages.append(f"pageerror: {exc}"))
    page.console_messages = messages  # type: ignore[attr-defined]
    return page


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, animations="disabled")
    return path


def page_errors(page: Page) -> list[str]:
    """Uncaught exceptions (console errors are expected: a cut WebSocket logs one)."""
    return [m for m in page.console_messages if m.startswith("pageerror")]  # type: ignore[attr-defined]
