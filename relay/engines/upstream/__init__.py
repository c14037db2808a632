"""Engines that relay each stream to a hosted Flux service (docs/upstream.md).

* :mod:`.flux_client`: the sans-I/O Flux client: query parameters, client messages, server
  message parsing, the replay log and turn renumbering (no sockets, no event loop);
* :mod:`.connection`: one WebSocket to the upstream and the loops that run it;
* :mod:`.stream`: :class:`~.stream.UpstreamStream`, reconnects, replay and the handover to a
  fallback engine (:mod:`.fallback`);
* :mod:`.engine`: :class:`~.engine.UpstreamEngine`, its settings (:class:`~.engine.UpstreamConfig`)
  and credential (:class:`~.engine.Secret`);
* :mod:`.deepgram` and :mod:`.cloudflare`: where to connect and how to sign in.
"""
