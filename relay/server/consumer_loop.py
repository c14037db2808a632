"""One task per connection for a Channels consumer, instead of two per message.

Touches: Channels' ``channels.consumer.AsyncConsumer``: ``__call__`` and ``dispatch`` are
replaced, so this loop must set what ``__call__`` sets (``scope``, ``base_send``,
``channel_layer``, ``channel_name``) and read ``channel_layer_alias``; it uses
``channels.layers.get_channel_layer`` and ``channels.exceptions.StopConsumer`` as
``AsyncConsumer.__call__`` does. It also relies on the server's ``receive`` being the bound
``get`` of an ``asyncio.Queue`` (daphne's ``Server.create_application``, Channels' test
communicator); when it is not, Channels' own loop runs.

Why: Channels' ``await_many_dispatch`` wraps every incoming message in a new task and an
``asyncio.wait`` over the socket and the channel layer, and ``dispatch`` awaits
``aclose_old_connections()`` (a thread hop) before every handler. Here one forwarder task moves
channel-layer messages into the socket's queue and the consumer just awaits ``receive()``: same
handlers, still one at a time, about 8% less CPU per audio frame (docs/benchmarks.md); and
``dispatch`` skips the hop.
"""
from __future__ import annotations

import asyncio
from typing import Any

from channels.exceptions import StopConsumer
from channels.layers import get_channel_layer

from relay.server.patches import Patch, Target, require

PATCH = Patch(
    name="consumer_loop",
    purpose="serve each connection from one task (SingleTaskLoop)",
    framework="channels",
    targets=(
        Target("channels", "channels.consumer", "AsyncConsumer.__call__", params=("self", "scope", "receive", "send"),
               uses=("scope", "base_send", "channel_layer", "channel_name", "channel_layer_alias", "get_channel_layer", "StopConsumer")),
        Target("channels", "channels.consumer", "AsyncConsumer.dispatch", params=("self", "message")),
        Target("channels", "channels.consumer", "AsyncConsumer.channel_layer_alias", kind="value"),
        Target("channels", "channels.layers", "get_channel_layer", params=("alias",)),
        Target("channels", "channels.exceptions", "StopConsumer", kind="class"),
    ),
)

#: Type of the message the forwarder queues when the channel layer fails.
_LAYER_FAILED = "relay.layer_failed"


def install() -> None:
    """Check the Channels internals SingleTaskLoop stands in for; there is nothing to patch."""
    require(PATCH)


class SingleTaskLoop:
    """Mixin for an ``AsyncConsumer`` subclass, listed before it: the single-task loop."""

    async def __call__(self, scope, receive, send):
        queue = getattr(receive, "__self__", None)
        if not isinstance(queue, asyncio.Queue):
            return await super().__call__(scope, receive, send)
        self.scope = scope
        self.base_send = send
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        forwarder = None
        if self.channel_layer is not None:
            self.channel_name = await self.channel_layer.new_channel()
            forwarder = asyncio.get_running_loop().create_task(self._forward_layer(queue))
        try:
            while True:
                message = await receive()
                if message["type"] == _LAYER_FAILED:
                    raise message["exc"]
                await self.dispatch(message)
        except StopConsumer:
            pass
        finally:
            if forwarder is not None:
                forwarder.cancel()  # the pub/sub layer unsubscribes the channel on cancel
                try:
                    await forwarder
                except BaseException:
                    pass

    async def _forward_layer(self, queue: asyncio.Queue) -> None:
        try:
            while True:
                queue.put_nowait(await self.channel_layer.receive(self.channel_name))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # fail the consumer with it, as Channels' loop would
            queue.put_nowait({"type": _LAYER_FAILED, "exc": exc})

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels awaits aclose_old_connections() (a thread hop) before every handler. Audio
        # frames and layer events never touch the ORM, and every ORM call of the relay goes
        # through database_sync_to_async, which closes stale connections itself: skip the hop.
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)
