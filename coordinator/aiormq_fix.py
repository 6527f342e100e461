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
connection down with every reader on it (2 of 36 runs of the web benchmark, partly
under load; in the one traced, the write queue was full when the close came).

The correction answers as aiormq does, but waits for room in the queue instead of
dropping the answer, and keeps the channel's number taken until the answer is queued:
no channel opened meanwhile can get that number. One given it in the moment between
the close's arrival and its reader's turn has not queued its `channel.open` yet (its
open takes a task of its own, a turn later), so the reader's put is ahead of it.

The operation the broker refused raises once the answer is queued: while the broker
reads nothing from the connection (a resource alarm blocks it), it waits, as every
other write on that connection does. A connection that dies meanwhile cancels that
reader, so the wait cannot outlive it.

It replaces aiormq's `Channel._on_close_frame`, a private method, with the same steps
(tests/test_channel_close.py fails if an aiormq changes what it corrects). `apply`
is idempotent; the gateway applies it on import.
"""

from __future__ import annotations

from aiormq.abc import ChannelFrame
from aiormq.channel import Channel, exception_by_code
from pamqp import commands as spec


def apply() -> None:
    """Make aiormq's channels answer the broker's close without ever dropping it."""
    if getattr(Channel._on_close_frame, "covey_answers_close", False):
        return
    on_close_frame.covey_answers_close = True  # type: ignore[attr-defined]
    Channel._on_close_frame = on_close_frame  # type: ignore[method-assign]


async def on_close_frame(self: Channel, frame: spec.Channel.Close) -> None:
    """aiormq's answer to the broker's `channel.close`, which never drops `close-ok`."""
    channels = self.connection.channels
    reserved = channels.setdefault(self.number, self) is self  # freed when the close came
    try:
        error = exception_by_code(frame)
        self._close_exception = error
        close_ok = spec.Channel.CloseOk()
        await self.write_queue.put(
            ChannelFrame.marshall(channel_number=self.number, frames=[close_ok])
        )
        self._Channel__close_event.set()  # type: ignore[attr-defined]  # aiormq's own step
        raise error
    finally:
        if reserved and channels.get(self.number) is self:
            del channels[self.number]
