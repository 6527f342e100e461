"""Reading streams (coordinator/stream.py): the head, exact and without a quiet spell to wait
out, and a reader that gives back the cancel (Ctrl-C) wherever it lands."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import pytest
from conftest import World

from coordinator import changelog, stream
from coordinator.changelog import Entry
from coordinator.gateway import Gateway
from coordinator.settings import Settings
from coordinator.topology import CHANGELOG_STREAM


async def _append(gateway: Gateway, count: int) -> None:
    for n in range(count):
        await changelog.append(gateway, Entry.new(author="human:ada", summary=f"e{n}"), 10)


async def test_the_head_is_the_newest_offset_without_a_quiet_spell(applied: World) -> None:
    settings = Settings(amqp_url=applied.amqp_url)
    async with await Gateway.connect(settings, "head probe") as gateway:
        await _append(gateway, 30)
        times = []
        for _ in range(10):
            started = time.perf_counter()
            assert await stream.head(gateway, CHANGELOG_STREAM) == 29
            times.append(time.perf_counter() - started)
        await _append(gateway, 1)
        assert await stream.head(gateway, CHANGELOG_STREAM) == 30
    # It waits for no quiet (CHUNK_IDLE_SECONDS each time, before): the fastest of ten
    # finds it in a fraction of that, even on a busy machine.
    assert min(times) < stream.CHUNK_IDLE_SECONDS, times


async def test_finding_the_head_gives_back_a_cancel_wherever_it_lands(applied: World) -> None:
    """`covey attach` stops on Ctrl-C by cancelling its reader once. A cancel that lands in
    the middle of an exchange with the broker (the head's barrier) must come back out as
    the cancel: not swallowed, and not turned into a broker error, which the reader's
    reconnecting takes for a lost connection and carries on after (a CI run's attach went
    on following for 60 s)."""
    settings = Settings(amqp_url=applied.amqp_url)
    async with await Gateway.connect(settings, "cancel probe") as gateway:
        await _append(gateway, 20)
        landed = 0
        for rounds in range(0, 120, 2):  # cancelled after so many turns of the event loop
            finding = asyncio.ensure_future(stream.head(gateway, CHANGELOG_STREAM))
            for _ in range(rounds):
                await asyncio.sleep(0)
            if finding.done():
                assert finding.result() == 19
                continue
            finding.cancel()
            with pytest.raises(asyncio.CancelledError):
                await finding
            landed += 1
        assert landed >= 10, "too few cancels landed while the head was being found"
        assert await stream.head(gateway, CHANGELOG_STREAM) == 19  # and it still works


async def test_a_cancel_that_lands_as_a_reader_closes_its_channel_is_kept(
    applied: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiormq's channel close swallowed most cancels that landed while it ran (344 of 500
    here), and a reader, which closes its channel on the way out, then returned as if
    never cancelled. Each cancel here is aimed at that close (a probe notes when it
    starts; the cancel follows within a few turns of the event loop)."""
    closing = asyncio.Event()
    real_close = aio_pika.channel.Channel.close

    async def noted(self: aio_pika.channel.Channel, *args: Any, **kwargs: Any) -> None:
        closing.set()
        await real_close(self, *args, **kwargs)

    monkeypatch.setattr(aio_pika.channel.Channel, "close", noted)
    settings = Settings(amqp_url=applied.amqp_url)
    async with await Gateway.connect(settings, "cancel probe") as gateway:
        await _append(gateway, 5)
        for turns in [0, 1, 2, 3, 4, 5] * 10:
            closing.clear()
            finding = asyncio.ensure_future(stream.head(gateway, CHANGELOG_STREAM))
            await closing.wait()
            for _ in range(turns):
                await asyncio.sleep(0)
            finding.cancel()
            with pytest.raises(asyncio.CancelledError):
                await finding
        assert await stream.head(gateway, CHANGELOG_STREAM) == 4
