"""Figures 1-3: sending, draining into the mailbox, and an agent-to-agent round trip,
through covey's Python API and through plain aio-pika on quorum queues."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from benchlib import (
    BODY_512,
    Bench,
    Figure,
    bulk_publish,
    covey_side,
    interleaved,
    percentile,
    write_home,
)
from yarl import URL

from coordinator.client import Covey
from coordinator.envelope import MESSAGE_TYPE, Envelope

BATCH = 100  # sends in flight at once, on both sides
RAW_EXCHANGE = "raw"


class Raw:
    """The plain aio-pika side: a topic exchange and quorum queues of its own (named
    `raw.NAME`, bound to `agent.NAME`), persistent messages, publisher confirms."""

    channel: aio_pika.abc.AbstractChannel
    exchange: aio_pika.abc.AbstractExchange

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.connection = connection

    @classmethod
    async def open(cls, url: str, names: list[str]) -> Raw:
        raw = cls(await aio_pika.connect(url))
        raw.channel = await raw.connection.channel(publisher_confirms=True)
        raw.exchange = await raw.channel.declare_exchange(RAW_EXCHANGE, "topic", durable=True)
        for name in names:
            queue = await raw.channel.declare_queue(
                f"raw.{name}", durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(raw.exchange, f"agent.{name}")
        return raw

    async def publish(self, body: bytes, to: str) -> None:
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self.exchange.publish(message, f"agent.{to}", mandatory=True)

    async def purge(self, queue: str) -> None:
        await (await self.channel.get_queue(queue, ensure=False)).purge()

    async def close(self) -> None:
        await self.connection.close()


async def _open(bench: Bench, folder: str, agents: list[str]) -> tuple[str, list[Covey]]:
    url = await bench.vhost()
    home = write_home(bench.folder(folder), {name: [] for name in agents})
    handles = [
        Covey.open(identity=f"agent:{name}", home=home, amqp_url=url, state_dir=home / "state")
        for name in agents
    ]
    return url, handles


async def _in_batches(count: int, send: Callable[[], Awaitable[object]]) -> None:
    for start in range(0, count, BATCH):
        await asyncio.gather(*(send() for _ in range(min(BATCH, count - start))))


# -- 1: send throughput ---------------------------------------------------------------------


async def bench_send(bench: Bench) -> list[Figure]:
    count, repeats = (200, 2) if bench.quick else (1000, 5)
    url, (sender, _) = await _open(bench, "send", ["sender", "sink"])
    runs: dict[str, object] = {}
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(sender)
        await sender.namespace.apply_topology()
        # A fresh handle's first batch: every send in it declares the recipient's queue.
        first_batch = time.perf_counter()
        first = 1 if bench.quick else BATCH  # (a second or two: not in a quick run)
        await _in_batches(first, lambda: sender.send("agent:sink", "first", BODY_512))
        first_batch = time.perf_counter() - first_batch
        raw = await Raw.open(url, ["sink"])
        stack.push_async_callback(raw.close)
        await raw.publish(BODY_512.encode(), "sink")
        await raw.purge("agent.sink")

        async def covey() -> float:
            started = time.perf_counter()
            await _in_batches(count, lambda: sender.send("agent:sink", "bench", BODY_512))
            took = time.perf_counter() - started
            await raw.purge("agent.sink")
            return count / took

        async def plain() -> float:
            started = time.perf_counter()
            await _in_batches(count, lambda: raw.publish(BODY_512.encode(), "sink"))
            took = time.perf_counter() - started
            await raw.purge("raw.sink")
            return count / took

        covey_rate, raw_rate = await interleaved(covey, plain, repeats, runs)
    wire = len(
        Envelope.new(sender="agent:a", recipient="agent:b", subject="b", body=BODY_512).to_json()
    )
    return [
        Figure(
            "1",
            f"send, persistent, confirmed, {count} x 512 B",
            "msg/s",
            covey_rate,
            raw_rate,
            "≥ 0.9 × raw",
            min_ratio=0.9,
            note=f"gather of {BATCH} at a time, both sides; covey's wire body is the "
            f"{wire} B JSON envelope, raw's the bare 512 B"
            + (
                ""
                if bench.quick
                else f". A fresh handle's first {BATCH} at once: {first_batch:.2f} s"
            ),
            extra={**runs, **({} if bench.quick else {"fresh_handle_first_batch_s": first_batch})},
        )
    ]


# -- 2: drain throughput -----------------------------------------------------------------------


async def bench_drain(bench: Bench) -> list[Figure]:
    count, repeats = (100, 2) if bench.quick else (1000, 5)
    url, (sender, sink) = await _open(bench, "drain", ["sender", "sink"])
    runs: dict[str, object] = {}

    def mail() -> list[tuple[bytes, dict[str, Any]]]:
        """`count` envelopes as covey's send makes them (a fresh id each)."""
        envelopes = [
            Envelope.new(sender="agent:sender", recipient="agent:sink", subject="b", body=BODY_512)
            for _ in range(count)
        ]
        properties = {
            "type": MESSAGE_TYPE,
            "content_type": "application/json",
            "user_id": URL(url).user or "guest",  # signed, as covey's send signs
        }
        return [(e.to_json(), {**properties, "message_id": e.id}) for e in envelopes]

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(sender)
        await stack.enter_async_context(sink)
        await sender.namespace.apply_topology()
        await sender.send("agent:sink", "warm-up", BODY_512)  # one first: see figure 1's note
        await sink.drain()  # connection and mailbox open
        raw = await Raw.open(url, ["sink"])
        stack.push_async_callback(raw.close)
        consumer = await raw.connection.channel()
        await consumer.set_qos(prefetch_count=100)
        raw_queue = await consumer.get_queue("raw.sink", ensure=False)

        async def covey() -> float:
            await bulk_publish(url, "agent.sink", mail())  # set-up: fast, and not timed
            started = time.perf_counter()
            new = await sink.drain()
            took = time.perf_counter() - started
            assert len(new) == count, (len(new), count)
            return count / took

        async def plain() -> float:
            await bulk_publish(url, "raw.sink", mail())
            done = asyncio.Event()
            acked = 0

            async def on_message(message: AbstractIncomingMessage) -> None:
                nonlocal acked
                await message.ack()
                acked += 1
                if acked == count:
                    done.set()

            started = time.perf_counter()
            tag = await raw_queue.consume(on_message)
            await done.wait()
            took = time.perf_counter() - started
            await raw_queue.cancel(tag)
            return count / took

        covey_rate, raw_rate = await interleaved(covey, plain, repeats, runs)
    return [
        Figure(
            "2",
            f"drain {count} into the mailbox",
            "msg/s",
            covey_rate,
            raw_rate,
            "≥ 0.9 × raw",
            min_ratio=0.9,
            note="covey: Covey.drain (parse, SQLite commit, then ack); raw: consume + ack each, "
            "prefetch 100",
            extra=runs,
        )
    ]


# -- 3: agent -> agent -> agent round trip ---------------------------------------------------


async def bench_round_trip(bench: Bench) -> list[Figure]:
    trips, warm = (20, 2) if bench.quick else (150, 10)
    url, (ping, pong) = await _open(bench, "round-trip", ["ping", "pong"])
    covey_ms: list[float] = []
    raw_ms: list[float] = []
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(ping)
        await stack.enter_async_context(pong)
        await ping.namespace.apply_topology()

        async def answer_forever() -> None:
            while True:
                for mail in await pong.wait(60):
                    await pong.reply(mail.envelope.id, body=BODY_512)

        # The raw pair: two connections, like two covey handles; long-lived consumers.
        raw_ping = await Raw.open(url, ["ping", "pong"])
        stack.push_async_callback(raw_ping.close)
        raw_pong = await Raw.open(url, [])
        stack.push_async_callback(raw_pong.close)
        replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        ping_in = await raw_ping.connection.channel()
        await ping_in.set_qos(prefetch_count=100)
        await (await ping_in.get_queue("raw.ping", ensure=False)).consume(replies.put)
        pong_in = await raw_pong.connection.channel()
        await pong_in.set_qos(prefetch_count=100)

        async def raw_answer(message: AbstractIncomingMessage) -> None:
            await raw_pong.publish(BODY_512.encode(), "ping")
            await message.ack()

        await (await pong_in.get_queue("raw.pong", ensure=False)).consume(raw_answer)

        async def covey_trip() -> float:
            started = time.perf_counter()
            await ping.send("agent:pong", "ping", BODY_512)
            got = await ping.wait(10)
            took = time.perf_counter() - started
            assert got, "no answer within 10 s"
            return took * 1000

        async def raw_trip() -> float:
            started = time.perf_counter()
            await raw_ping.publish(BODY_512.encode(), "pong")
            message = await asyncio.wait_for(replies.get(), 10)
            await message.ack()
            return (time.perf_counter() - started) * 1000

        answering = asyncio.create_task(answer_forever())
        try:
            for _ in range(warm):
                await covey_trip()
                await raw_trip()
            for _ in range(trips):
                covey_ms.append(await covey_side(covey_trip()))
                raw_ms.append(await raw_trip())
        finally:
            answering.cancel()
    note = (
        f"{trips} trips, alternating; covey: send, then wait on the other side, reply, wait; "
        "raw: publish (confirmed) and long-lived consumers"
    )
    return [
        Figure(
            "3a",
            "round trip a -> b -> a, p50",
            "ms",
            percentile(covey_ms, 50),
            percentile(raw_ms, 50),
            "≤ 1.5 × raw",
            max_ratio=1.5,
            note=note,
            extra={
                "covey_ms": [round(x, 3) for x in covey_ms],
                "raw_ms": [round(x, 3) for x in raw_ms],
            },
        ),
        Figure(
            "3b",
            "round trip a -> b -> a, p99",
            "ms",
            percentile(covey_ms, 99),
            percentile(raw_ms, 99),
            "(reported)",
        ),
    ]
