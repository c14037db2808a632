"""Static files in production: hashed and compressed once ``collectstatic`` ran, never a 500 before.

whitenoise's ``CompressedManifestStaticFilesStorage`` answers ``{% static %}`` from the manifest
``collectstatic`` writes (``STATIC_ROOT/staticfiles.json``); with no manifest, every page that
links a static file (the demo page, the admin) raises and serves 500, and
``WHITENOISE_MANIFEST_STRICT = False`` does not help: it then hashes the file found in
``STATIC_ROOT``, which is just as missing. So when the manifest is absent this storage links the
apps' files by their plain names, which whitenoise serves from the finders
(``WHITENOISE_USE_FINDERS``), and logs once that ``collectstatic`` has not run. The documented
starts (``make serve-prod``, ``relay-setup.service``) run it, so this is the safety net.
"""
from __future__ import annotations

from whitenoise.storage import CompressedManifestStaticFilesStorage

from relay.ops.logs import get_logger

log = get_logger("relay.static")


class RelayStaticFilesStorage(CompressedManifestStaticFilesStorage):
    """The manifest's hashed names when there is one, the plain names when collectstatic never ran."""

    _warned = False

    def stored_name(self, name: str) -> str:
        if not self.hashed_files:
            if not RelayStaticFilesStorage._warned:
                RelayStaticFilesStorage._warned = True
                log.warning("static_manifest_missing", manifest=str(self.path(self.manifest_name)), fix="manage.py collectstatic --noinput")
            return name
        return super().stored_name(name)
