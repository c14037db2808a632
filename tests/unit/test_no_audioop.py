"""Nothing in relay/ needs ``audioop`` (removed from the standard library in Python 3.13).

Every module is imported in a fresh interpreter where ``import audioop`` raises ImportError, as
it does on 3.13, so a stray import anywhere fails here while 3.11 still ships the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib, json, pkgutil, sys, traceback
sys.modules["audioop"] = None  # "import audioop" now raises ImportError, as on Python 3.13

import django
django.setup()

import relay

failures = {}
names = ["relay"]
names += [m.name for m in pkgutil.walk_packages(relay.__path__, "relay.", onerror=lambda name: failures.setdefault(name, "walk failed"))]
for name in names:
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps({"imported": len(names), "failures": failures}))
"""


def test_every_relay_module_imports_without_audioop():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "transcription_site.settings", "RELAY_PRELOAD_ENGINE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] > 20
    assert result["failures"] == {}, "\n".join(f"{name}:\n{tb}" for name, tb in result["failures"].items())
