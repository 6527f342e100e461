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

from coordinator.gateway import Gateway, close_channel

PREFETCH = 500
# Reading until the stream goes quiet (`items_from` without `stop_at`): waiting
# FIRST_SECONDS for a first item and CHUNK_IDLE_SECONDS of quiet after the last errs,
# under heavy load, towards too little — never too much. `head` needs neither wait
# when the stream has items (see there).
FIRST_SECONDS = 0.25
CHUNK_IDLE_SECONDS = 0.03
RANGE_SECONDS = 5.0  # reading a known range: a generous wait for each next item
SETTLE_ROUNDS = 4  # event-loop rounds without a new delivery: see `_settle`


@dataclass(frozen=True, slots=True)
class Item:
    """One message read from a stream, not yet parsed."""

    offset: int
    body: bytes
    message: AbstractIncomingMessage


async def head(gateway: Gateway, stream: str) -> int | None:
    """The offset of the newest item, or None when the stream is empty.

    Attached at `last`, the consumer's channel is told by the stream that there is
    something to read, and then reads every chunk from the newest on and sends it all
    in one go (rabbit_stream_queue in 3.10: `osiris_offset`, then `stream_entries` up to
    the credit). The channel answers a `basic.qos` sent after that only once it has sent
    all of it: the answer is a barrier, and the head is known without waiting out a
    quiet spell. When the answer comes before any item (the stream's notice had not yet
    reached the channel, or the stream is empty), the first item is waited for, for up
    to FIRST_SECONDS, and the barrier is sent once more. A full window (PREFETCH items,
    so more may follow) is read on to the end of the burst, as `items_from` does."""
    deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    channel = (await gateway.consume_stream(stream, "last", deliveries.put, PREFETCH)).channel
    newest: int | None = None
    taken = 0

    async def take(message: AbstractIncomingMessage) -> None:
        nonlocal newest, taken
        await message.ack()
        offset = int(message.headers["x-stream-offset"])  # type: ignore[arg-type]
        newest = offset if newest is None else max(newest, offset)
        taken += 1

    try:
        for _ in range(2):
            await channel.set_qos(prefetch_count=PREFETCH)  # the barrier
            await _settle(deliveries)
            while not deliveries.empty():
                await take(deliveries.get_nowait())
            if newest is not None:
                break
            try:
                async with asyncio.timeout(FIRST_SECONDS):
                    await take(await deliveries.get())
            except TimeoutError:
                return None  # empty: nothing came even after the barrier
        while taken >= PREFETCH:  # a full window: more may be on its way
            try:
                async with asyncio.timeout(CHUNK_IDLE_SECONDS):
                    await take(await deliveries.get())
            except TimeoutError:
                break
        return newest
    finally:
        await close_channel(channel)


async def _settle(deliveries: asyncio.Queue[AbstractIncomingMessage]) -> None:
    """Let the deliveries that reached the client before the barrier's answer reach the
    queue: the client hands each to its callback through tasks (aiormq one, aio-pika
    another), so a few rounds of the event loop with nothing new are enough."""
    quiet, size = 0, deliveries.qsize()
    while quiet < SETTLE_ROUNDS:
        await asyncio.sleep(0)
        quiet = quiet + 1 if deliveries.qsize() == size else 0
        size = deliveries.qsize()


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
        await close_channel(channel)
