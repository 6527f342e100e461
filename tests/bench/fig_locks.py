"""Figure 5: a lock taken and released, and handed to a waiter, with coordinator.lock and
with a bare exclusive queue on a raw aio-pika connection."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from benchlib import Bench, Figure, interleaved

from coordinator.events import Event
from coordinator.gateway import Gateway
from coordinator.lock import RETRY_SECONDS, Holder, LockSession, LockSpec
from coordinator.settings import Settings
from coordinator.topology import core

SPEC = LockSpec("bench")
RAW_LOCK = "raw.lock.bench"
RAW_EVENTS = "raw.events"
SETTLE = 0.2  # how long the waiter is left waiting before the holder lets go


async def _raw_try(connection: AbstractConnection) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_queue(RAW_LOCK, exclusive=True, durable=False)
        return True
    except aiormq.exceptions.ChannelLockedResource:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()


async def bench_locks(bench: Bench) -> list[Figure]:
    repeats, handoffs, timer_handoffs = (3, 2, 0) if bench.quick else (21, 7, 3)
    url = await bench.vhost()
    settings = Settings(amqp_url=url)
    rng = random.Random(7)
    async with await Gateway.connect(settings) as gateway:
        await gateway.apply(core(settings.changelog))  # covey.events, for lock.released
        events = await gateway.connection.channel(publisher_confirms=True)
        raw_events = await events.declare_exchange(RAW_EVENTS, "fanout", durable=True)

        # -- acquire + release -----------------------------------------------------------
        async def covey_cycle() -> float:
            session = await LockSession.open(settings, Holder.me("bench", "cycle", settings.host))
            started = time.perf_counter()
            await session.acquire(SPEC)
            await session.close()
            return (time.perf_counter() - started) * 1000

        async def raw_cycle() -> float:
            connection = await aio_pika.connect(url)
            started = time.perf_counter()
            channel = await connection.channel()
            queue = await channel.declare_queue(RAW_LOCK, exclusive=True, durable=False)
            await queue.delete(if_unused=False, if_empty=False)
            await channel.close()
            took = (time.perf_counter() - started) * 1000
            await connection.close()
            return took

        async def covey_cycle_connect() -> float:
            started = time.perf_counter()
            session = await LockSession.open(settings, Holder.me("bench", "cycle", settings.host))
            await session.acquire(SPEC)
            await session.close()
            return (time.perf_counter() - started) * 1000

        async def raw_cycle_connect() -> float:
            started = time.perf_counter()
            connection = await aio_pika.connect(url)
            channel = await connection.channel()
            await channel.declare_queue(RAW_LOCK, exclusive=True, durable=False)
            await connection.close()
            return (time.perf_counter() - started) * 1000

        cycle_runs: dict[str, object] = {}
        covey_ms, raw_ms = await interleaved(covey_cycle, raw_cycle, repeats, cycle_runs)
        connect_runs: dict[str, object] = {}
        covey_connect_ms, raw_connect_ms = await interleaved(
            covey_cycle_connect, raw_cycle_connect, repeats, connect_runs
        )

        # -- hand-off to a waiter -------------------------------------------------------
        async def covey_handoff(announce: bool, settle: float) -> float:
            holder = await LockSession.open(settings, Holder.me("holder", "h", settings.host))
            await holder.acquire(SPEC)
            waiter = await LockSession.open(settings, Holder.me("waiter", "w", settings.host))
            got: list[float] = []

            async def wait_for_it() -> None:
                await waiter.acquire(SPEC, wait=10)
                got.append(time.perf_counter())

            waiting = asyncio.create_task(wait_for_it())
            await asyncio.sleep(settle)
            started = time.perf_counter()
            await holder.close()
            if announce:  # what `covey run` does after it closed its lock session
                released = Event(
                    kind="lock.released", host="bench", lock=SPEC.name, agent="holder", run_id="h"
                )
                await gateway.publish_event(released)
            await waiting
            await waiter.close()
            return (got[0] - started) * 1000

        async def raw_handoff() -> float:
            holder = await aio_pika.connect(url)
            assert await _raw_try(holder)
            waiter = await aio_pika.connect(url)
            freed = asyncio.Event()
            channel = await waiter.channel()
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(RAW_EVENTS)

            async def on_event(message: AbstractIncomingMessage) -> None:
                freed.set()

            await queue.consume(on_event, no_ack=True)
            got: list[float] = []

            async def wait_for_it() -> None:
                while not await _raw_try(waiter):
                    await asyncio.wait_for(freed.wait(), 10)
                    freed.clear()
                got.append(time.perf_counter())

            waiting = asyncio.create_task(wait_for_it())
            await asyncio.sleep(SETTLE)
            started = time.perf_counter()
            await holder.close()
            await raw_events.publish(aio_pika.Message(b"released"), "")
            await waiting
            await waiter.close()
            return (got[0] - started) * 1000

        handoff_runs: dict[str, object] = {}
        covey_handoff_ms, raw_handoff_ms = await interleaved(
            lambda: covey_handoff(True, SETTLE), raw_handoff, handoffs, handoff_runs
        )
        # LockSession alone announces nothing: the waiter retries on its timer, so the
        # release lands at a random point of its RETRY_SECONDS cycle.
        timer_ms = [
            await covey_handoff(False, SETTLE + rng.uniform(0, RETRY_SECONDS))
            for _ in range(timer_handoffs)
        ]
    figures = [
        Figure(
            "5a",
            "lock acquire + release",
            "ms",
            covey_ms,
            raw_ms,
            "≤ 1.5 × raw",
            max_ratio=1.5,
            note="covey: LockSession.acquire + close (holder note written); raw: channel, "
            "exclusive declare, delete; connections open beforehand. With connect: covey "
            f"{covey_connect_ms:.1f} ms, raw {raw_connect_ms:.1f} ms",
            extra={**cycle_runs, "with_connect": connect_runs},
        ),
        Figure(
            "5b",
            "lock hand-off to a waiter (as `covey run`)",
            "ms",
            covey_handoff_ms,
            raw_handoff_ms,
            "≤ 50 ms",
            max_value=50,
            note="holder closes its session, then publishes lock.released; raw: close, "
            "then a fanout notice to the waiter, which declares again",
            extra=handoff_runs,
        ),
    ]
    if timer_ms:  # (seconds of waiting: not in a quick run)
        figures.append(
            Figure(
                "5c",
                "lock hand-off, LockSession.close alone",
                "ms",
                statistics.median(timer_ms),
                None,
                "≤ 50 ms",
                max_value=50,
                note=f"no lock.released: the waiter retries every {RETRY_SECONDS:g} s",
                extra={"covey_runs": [round(x, 3) for x in timer_ms]},
            )
        )
    return figures
