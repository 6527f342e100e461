"""Reading RabbitMQ streams over AMQP 0-9-1: a range of offsets, or just the newest items.

A stream consumer names where to start (`x-stream-offset`) and the broker
delivers from there, each message carrying its offset. AMQP cannot ask a
stream for its length, so the head is found by attaching at `last` (the start
of the newest chunk) and reading that chunk to its end. Reading the newest N
items therefore costs one chunk plus N, however long the stream is.

An `Item` is a raw stream message (an offset and a body); what it means is its
reader's business: changelog.py makes its items into judged entries, records.py
into run events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage

from coordinator.gateway import Gateway

PREFETCH = 500
# Finding the head: attached at `last`, the broker sends the newest chunk in one
# burst. Waiting FIRST_SECONDS for it to start and CHUNK_IDLE_SECONDS of quiet for
# it to end errs, under heavy load, towards a head slightly too old — never too
# new — so a digest may show a little less, and its cursor moves only as far as
# what it showed: the rest comes next time, nothing is skipped.
FIRST_SECONDS = 0.25
CHUNK_IDLE_SECONDS = 0.03
RANGE_SECONDS = 5.0  # reading a known range: a generous wait for each next item


@dataclass(frozen=True, slots=True)
class Item:
    """One message read from a stream, not yet parsed."""

    offset: int
    body: bytes
    message: AbstractIncomingMessage


async def head(gateway: Gateway, stream: str) -> int | None:
    """The offset of the newest item, or None when the stream is empty."""
    newest: int | None = None
    async for item in items_from(gateway, stream, "last", stop_at=None):
        newest = item.offset if newest is None else max(newest, item.offset)
    return newest


async def items_between(gateway: Gateway, stream: str, first: int, last: int) -> list[Item]:
    """Items with offsets in [first, last], oldest first (fewer if retention removed some)."""
    return [i async for i in items_from(gateway, stream, first, stop_at=last) if i.offset >= first]


async def newest_items(gateway: Gateway, stream: str, count: int) -> list[Item]:
    """The newest `count` items, oldest first."""
    top = await head(gateway, stream)
    if top is None or count <= 0:
        return []
    return await items_between(gateway, stream, max(0, top - count + 1), top)


async def items_from(
    gateway: Gateway,
    stream: str,
    start: int | str | datetime,
    stop_at: int | None,
    prefetch: int = PREFETCH,
) -> AsyncGenerator[Item, None]:
    """Yield items from `start` (an offset, `first`, `last`, or a time) until offset
    `stop_at` (inclusive), or until the stream goes quiet when `stop_at` is None.
    `prefetch` items may be on their way at once (fewer for a stream of large items:
    what is on its way when the reader stops still holds up its connection).

    The broker starts at the chunk that holds `start`, so a caller that wants an
    exact start filters what comes before it."""
    deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    # Waits out a stream whose node is still starting (right after a restart), and reads
    # through another node when this one has no replica of the stream.
    channel = (await gateway.consume_stream(stream, start, deliveries.put, prefetch)).channel
    try:
        timeout = FIRST_SECONDS if stop_at is None else RANGE_SECONDS
        while True:
            try:
                async with asyncio.timeout(timeout):
                    message = await deliveries.get()
            except TimeoutError:
                return
            await message.ack()
            offset = int(message.headers["x-stream-offset"])  # type: ignore[arg-type]
            yield Item(offset, message.body, message)
            if stop_at is None:
                timeout = CHUNK_IDLE_SECONDS
            if stop_at is not None and offset >= stop_at:
                return
    finally:
        if not channel.is_closed:
            await channel.close()
