"""covey side by side with raw aio-pika, on the same broker, in one run.

    .venv/bin/python tests/bench/run.py [--quick] [--out figures.json]

Each figure is measured for covey and for the plain aio-pika equivalent,
interleaved (covey, raw, covey, raw, …) so that a noisy machine hits both
alike; the table gives medians and the ratio covey/raw. Each figure runs in a
vhost of its own, removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for conftest's admin

from conftest import ManagementAdmin

from coordinator import changelog, digest, stream
from coordinator.bus import Bus
from coordinator.roster import DigestConfig
from coordinator.settings import Settings
from coordinator.topology import CHANGELOG_STREAM, core

BROKER = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Figure:
    name: str
    unit: str
    covey: float
    raw: float | None
    target: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.covey / self.raw if self.raw else None


async def interleaved(
    covey: Callable[[], Awaitable[float]], raw: Callable[[], Awaitable[float]], repeats: int
) -> tuple[float, float]:
    covey_runs, raw_runs = [], []
    for _ in range(repeats):
        covey_runs.append(await covey())
        raw_runs.append(await raw())
    return statistics.median(covey_runs), statistics.median(raw_runs)


async def timed(action: Awaitable[object]) -> float:
    started = time.perf_counter()
    await action
    return time.perf_counter() - started


# -- 6: the digest, with a cursor far behind the head -------------------------------------


async def bench_digest(url: str, quick: bool) -> Figure:
    behind, budget = (5_000, 50) if quick else (100_000, 50)
    settings = Settings(amqp_url=url)
    async with await Bus.connect(settings) as bus:
        await bus.apply(core(settings.changelog))
        channel = await bus.connection.channel(publisher_confirms=True)
        body = changelog.Entry.new(author="agent:other", summary="a change").model_dump_json()
        for start in range(0, behind, 1000):  # setup, not timed: batches of confirms
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(body.encode(), type=changelog.ENTRY_TYPE),
                        CHANGELOG_STREAM,
                    )
                    for _ in range(min(1000, behind - start))
                )
            )
        await changelog.advance(bus.connection, "reader", 0)
        config = DigestConfig(max_entries=budget, max_chars=1_000_000)
        head = await stream.head(bus.connection, CHANGELOG_STREAM)
        assert head is not None

        async def covey() -> float:
            started = time.perf_counter()
            news = await digest.build(bus.connection, "reader", config, "agent:reader")
            took = time.perf_counter() - started
            assert len(news.entries) == budget, len(news.entries)
            return took

        async def raw() -> float:
            # The same 50 newest entries, read with aio-pika from a known offset.
            started = time.perf_counter()
            raw_channel = await bus.connection.channel()
            await raw_channel.set_qos(prefetch_count=500)
            queue = await raw_channel.declare_queue(CHANGELOG_STREAM, passive=True)
            got: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(got.put, arguments={"x-stream-offset": head - budget + 1})
            seen = 0
            while seen < budget:
                message = await got.get()
                await message.ack()
                if int(message.headers["x-stream-offset"]) >= head - budget + 1:  # type: ignore[arg-type]
                    seen += 1
            await raw_channel.close()
            return time.perf_counter() - started

        covey_s, raw_s = await interleaved(covey, raw, repeats=5)
    return Figure(
        f"digest, cursor {behind} behind, budget {budget}",
        "s",
        covey_s,
        raw_s,
        "≤ 1 s and ≤ 3 × raw",
        "raw is told the head offset; covey finds it (attach at `last`, read one chunk)",
    )


FIGURES = {"digest": bench_digest}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under 30 s")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--only", choices=sorted(FIGURES), action="append")
    args = parser.parse_args()
    admin = ManagementAdmin("http://127.0.0.1:15672", "guest", "guest")
    figures = []
    for name in args.only or FIGURES:
        vhost = f"covey-bench-{uuid.uuid4().hex[:8]}"
        admin.add_vhost(vhost, "guest")
        try:
            figures.append(await FIGURES[name](BROKER + vhost, args.quick))
        finally:
            admin.delete_vhost(vhost)
    print(f"{'figure':<44} {'covey':>10} {'raw':>10} {'ratio':>7}  target")
    for f in figures:
        raw = f"{f.raw:.4f}" if f.raw is not None else "-"
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else "-"
        print(f"{f.name:<44} {f.covey:>10.4f} {raw:>10} {ratio:>7}  {f.target}  [{f.unit}]")
        if f.note:
            print(f"{'':<44} {f.note}")
    if args.out:
        args.out.write_text(json.dumps([asdict(f) | {"ratio": f.ratio} for f in figures], indent=2))


if __name__ == "__main__":
    asyncio.run(main())
