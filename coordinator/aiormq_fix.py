"""A correction to aiormq: a channel the broker closes is always answered `close-ok`.

When RabbitMQ closes a channel (a passive declare of a missing queue: NOT_FOUND; a
lock slot someone holds: RESOURCE_LOCKED — covey does both all the time), the client
must answer `channel.close-ok` before it may open a channel with that number again:
until then the broker keeps the channel, and a `channel.open` on it is a connection
error ("CHANNEL_ERROR - second 'channel.open' seen") that closes the whole connection.

aiormq (7.2.4) frees the number as soon as the broker's `channel.close` arrives, and
its channel then queues the `close-ok` with `put_nowait` on the connection's write
queue, which holds 10 frames, dropping the `close-ok` when that queue is full
(aiormq issue 170). A busy connection fills it: fifty readers of a stream each acking
their deliveries did, in `covey web`, and the next channel given that number took the
connection down with every reader on it (measured: 1 in about 10 runs of the web
benchmark under load, always with a full write queue when the close came).

The correction waits, on that channel's own reader task, until the write queue has
room, then lets aiormq answer as it does: the `close-ok` is never dropped, and it is
queued before anything else can be (nothing awaits between the room seen and the
`put_nowait`). A connection that dies meanwhile cancels that reader, so the wait
cannot outlive it. `apply` is idempotent; the gateway applies it on import.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiormq.channel import Channel

ROOM_POLL_SECONDS = 0.001  # the writer empties the queue as fast as the socket takes it

_OnClose = Callable[[Channel, Any], Awaitable[None]]


def apply() -> None:
    """Make aiormq's channels wait for room before answering the broker's close."""
    original: _OnClose = Channel._on_close_frame
    if getattr(original, "covey_waits_for_room", False):
        return

    async def on_close_frame(self: Channel, frame: Any) -> None:
        # asyncio.Queue tells no one when it has room, short of putting into it.
        while self.write_queue.full():  # noqa: ASYNC110
            await asyncio.sleep(ROOM_POLL_SECONDS)
        await original(self, frame)

    on_close_frame.covey_waits_for_room = True  # type: ignore[attr-defined]
    Channel._on_close_frame = on_close_frame  # type: ignore[method-assign]
