"""A channel the broker closes is answered `close-ok` even when the client's write queue
is full, and its number is not given to another channel before that answer is queued
(coordinator/aiormq_fix.py): else the next channel given its number is a connection
error that takes every reader on that connection down with it.

The client reaches the broker through a proxy in this test that can hold either
direction: holding the client's writes fills its socket and then aiormq's write queue;
holding the broker's answer makes its `channel.close` arrive just then."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
import aiormq
import pytest
from faultkit import HoldingProxy
from yarl import URL

import coordinator.gateway  # noqa: F401  # applies the correction, as every covey process does


async def _until(check: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)


async def test_a_close_from_the_broker_while_the_write_queue_is_full_leaves_the_connection_up(
    amqp_url: str,
) -> None:
    url = URL(amqp_url)
    async with HoldingProxy(url).serving() as proxy:
        connection = await aio_pika.connect(str(url.with_host("127.0.0.1").with_port(proxy.port)))
        async with connection:
            flooders = [await connection.channel(publisher_confirms=False) for _ in range(30)]
            doomed = await connection.channel()  # the highest number: the next one reuses it
            number = doomed.number
            frames = connection.transport.connection.write_queue  # type: ignore[union-attr]

            # The broker's close of `doomed` is held on its way back...
            proxy.to_client.clear()
            refused = asyncio.ensure_future(
                doomed.declare_queue("covey.test.no-such-queue", passive=True)
            )
            await asyncio.sleep(1)  # the declare has reached the broker
            # ...while the client's writes fill its socket, then aiormq's write queue.
            proxy.to_broker.clear()
            # A publish waits for the socket to take it (aiormq drains after it), and a
            # channel publishes one at a time: the queue fills with the publishes of many
            # channels, behind the one whose drain waits.
            body = b"x" * 1_000_000
            publishes = [
                flooder.default_exchange.publish(aio_pika.Message(body), "nowhere", mandatory=False)
                for flooder in flooders
            ]
            flooding = asyncio.ensure_future(asyncio.gather(*publishes))
            await _until(frames.full, "the write queue filled")
            proxy.to_client.set()  # the close arrives with no room to answer it
            await asyncio.sleep(0.5)
            # A channel opened before the answer could be queued must not get its number.
            meanwhile = asyncio.ensure_future(connection.channel())
            await asyncio.sleep(0.1)
            proxy.to_broker.set()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await refused
            await asyncio.wait_for(flooding, 60)
            opened_meanwhile = await asyncio.wait_for(meanwhile, 10)
            assert opened_meanwhile.number != number
            await opened_meanwhile.close()

            # Now a new channel gets the closed one's number: the broker must have had
            # its close-ok, or this is a connection error.
            reused = await asyncio.wait_for(connection.channel(), 10)
            assert reused.number == number
            queue = await asyncio.wait_for(reused.declare_queue(exclusive=True), 10)
            assert queue.name.startswith("amq.gen-")
            assert not connection.is_closed
