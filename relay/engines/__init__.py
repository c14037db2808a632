"""Engine registry: aliases in ``settings.RELAY_ENGINES`` -> one process-wide instance each.

Like ``CHANNEL_LAYERS``, each alias names a backend by dotted path plus its options, so a
deployment swaps engines without code changes. An engine's optional dependencies are imported
only when that engine is built, and a missing one becomes ``EngineUnavailable``.
"""
from __future__ import annotations

import threading

from django.conf import settings
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from relay.exceptions import EngineUnavailable

from .base import Engine, EngineStream, EngineWarning, StreamOptions, TurnEvent, Word

__all__ = [
    "Engine",
    "EngineStream",
    "EngineWarning",
    "StreamOptions",
    "TurnEvent",
    "Word",
    "get_engine",
    "reset_engines",
]

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def get_engine(alias: str | None = None) -> Engine:
    """The process-wide engine for ``alias`` (default ``settings.RELAY_ENGINE``)."""
    alias = alias or settings.RELAY_ENGINE
    engine = _engines.get(alias)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(alias)
        if engine is None:
            try:
                config = settings.RELAY_ENGINES[alias]
            except KeyError:
                raise EngineUnavailable(f"No engine is configured under the name {alias!r}.") from None
            try:
                backend = import_string(config["BACKEND"])
            except ImportError as exc:
                raise EngineUnavailable(f"Engine {alias!r} cannot be imported: {exc}") from exc
            engine = backend(alias, config.get("OPTIONS", {}))
            _engines[alias] = engine
    return engine


def reset_engines() -> None:
    """Forget built engines (tests that change RELAY_ENGINES call this via setting_changed)."""
    with _lock:
        for engine in _engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        _engines.clear()


def _on_setting_changed(*, setting: str, **kwargs: object) -> None:
    if setting in {"RELAY_ENGINES", "RELAY_ENGINE"}:
        reset_engines()


setting_changed.connect(_on_setting_changed)
