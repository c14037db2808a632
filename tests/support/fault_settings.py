"""Settings for daphne processes in the fault tests: the project's, plus the faulty engines.

Selected with DJANGO_SETTINGS_MODULE=tests.support.fault_settings and RELAY_ENGINE=faulty.
"""
from transcription_site.settings import *  # noqa: F401,F403
from transcription_site.settings import RELAY_ENGINES as _ENGINES

RELAY_ENGINES = {
    **_ENGINES,
    "faulty": {"BACKEND": "tests.support.fault_engines.FaultyEngine", "OPTIONS": dict(_ENGINES["fake"]["OPTIONS"])},
    # The first stream that closes inside a turn never gets that turn finished (FLUSH_INCOMPLETE).
    "stalling-flush": {"BACKEND": "tests.support.engines.SlowFlushEngine", "OPTIONS": {**_ENGINES["fake"]["OPTIONS"], "hang": "first"}},
}
