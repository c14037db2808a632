"""Settings for daphne processes in the fault tests: the project's, plus the faulty engine.

Selected with DJANGO_SETTINGS_MODULE=tests.support.fault_settings and RELAY_ENGINE=faulty.
"""
from transcription_site.settings import *  # noqa: F401,F403
from transcription_site.settings import RELAY_ENGINES as _ENGINES

RELAY_ENGINES = {
    **_ENGINES,
    "faulty": {"BACKEND": "tests.support.fault_engines.FaultyEngine", "OPTIONS": dict(_ENGINES["fake"]["OPTIONS"])},
    "stalling-flush": {"BACKEND": "tests.support.fault_engines.StallingFlushEngine", "OPTIONS": dict(_ENGINES["fake"]["OPTIONS"])},
}
