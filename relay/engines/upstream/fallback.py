"""The engine a stream moves to when its upstream stays unreachable (RELAY_UPSTREAM_FALLBACK_ENGINE).

The upstream stream feeds it the audio the upstream never answered for, then every later frame;
its turns are renumbered onto the stream's own (see
:class:`~relay.engines.upstream.flux_client.TurnMapper`).
"""
from __future__ import annotations

import dataclasses

from relay.exceptions import EngineUnavailable

from relay.engines.base import EngineStream, EngineWarning, StreamOptions


async def fallback_stream_open(alias: str, options: StreamOptions, *, upstream_alias: str) -> tuple[EngineStream, list[EngineWarning]]:
    """A started stream on engine ``alias`` with a copy of ``options``, and its warnings.

    Raises :class:`~relay.exceptions.RelayError` (EngineUnavailable, Capacity...) when that
    engine cannot take the stream over.
    """
    from relay.engines import get_engine

    if not alias or alias == upstream_alias:
        raise EngineUnavailable("no fallback engine is configured")
    engine = get_engine(alias)
    if options.encoding not in engine.supported_encodings():
        raise EngineUnavailable(f"{alias} does not accept {options.encoding}")
    options = dataclasses.replace(options, keyterms=list(options.keyterms), extra=dict(options.extra), explicit=set(options.explicit))
    stream = engine.open_stream(options)
    try:
        warnings = await stream.start()
    except BaseException:
        await stream.abort()
        raise
    return stream, warnings
