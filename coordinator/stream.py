"""Reading RabbitMQ streams over AMQP 0-9-1: a range of offsets, or just the newest entries.

A stream consumer names where to start (`x-stream-offset`) and the broker
delivers from there, each message carrying its offset. AMQP cannot ask a
stream for its length, so the head is found by attaching at `last` (the start
of the newest chunk) and reading that chunk to its end. Reading the newest N
entries therefore costs one chunk plus N, however long the stream is.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

PREFETCH = 500
CHUNK_IDLE_SECONDS = 0.15  # a chunk arrives in one burst; this much quiet means it ended


@dataclass(frozen=True, slots=True)
class Entry:
    offset: int
    body: bytes
    message: AbstractIncomingMessage


async def head(connection: AbstractConnection, stream: str) -> int | None:
    """The offset of the newest entry, or None when the stream is empty."""
    newest: int | None = None
    async for entry in _read(connection, stream, "last", stop_at=None):
        newest = entry.offset if newest is None else max(newest, entry.offset)
    return newest


async def read_range(
    connection: AbstractConnection, stream: str, first: int, last: int
) -> list[Entry]:
    """Entries with offsets in [first, last], oldest first (fewer if retention removed some)."""
    return [e async for e in _read(connection, stream, first, stop_at=last) if e.offset >= first]


async def newest(connection: AbstractConnection, stream: str, count: int) -> list[Entry]:
    """The newest `count` entries, oldest first."""
    top = await head(connection, stream)
    if top is None or count <= 0:
        return []
    return await read_range(connection, stream, max(0, top - count + 1), top)


async def _read(
    connection: AbstractConnection, stream: str, start: int | str, stop_at: int | None
) -> AsyncIterator[Entry]:
    """Yield entries from `start` until offset `stop_at` (inclusive), or until the
    stream goes quiet when `stop_at` is None."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    try:
        queue = await channel.declare_queue(stream, passive=True)
        deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(deliveries.put, arguments={"x-stream-offset": start})
        while True:
            try:
                # With a known end, wait for it (generously); else a quiet spell ends the read.
                timeout = CHUNK_IDLE_SECONDS if stop_at is None else 5.0
                message = await asyncio.wait_for(deliveries.get(), timeout)
            except TimeoutError:
                return
            await message.ack()
            offset = int(message.headers["x-stream-offset"])  # type: ignore[arg-type]
            yield Entry(offset, message.body, message)
            if stop_at is not None and offset >= stop_at:
                return
    finally:
        await channel.close()
