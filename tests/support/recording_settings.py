"""Settings for a daphne whose engine records what it is fed: the project's, plus ``recording``.

Selected with DJANGO_SETTINGS_MODULE=tests.support.recording_settings and RELAY_ENGINE=recording;
RELAY_TEST_RECORDING_DIR says where the streams' audio goes, RELAY_TEST_RECORDED_ENGINE which
engine transcribes it (default ``fake``). Used by tests/browser/test_audio_path_browser.py.
"""
import os

from transcription_site.settings import *  # noqa: F401,F403
from transcription_site.settings import RELAY_ENGINES as _ENGINES

RELAY_ENGINES = {
    **_ENGINES,
    "recording": {
        "BACKEND": "tests.support.engines.RecordingEngine",
        "OPTIONS": {
            "engine": os.environ.get("RELAY_TEST_RECORDED_ENGINE", "fake"),
            "directory": os.environ["RELAY_TEST_RECORDING_DIR"],
        },
    },
}
