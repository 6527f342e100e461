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
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for conftest's admin

from conftest import ManagementAdmin

from coordinator import changelog, digest, stream
from coordinator.bus import Bus
from coordinator.localbroker import answers, free_port
from coordinator.roster import DigestConfig
from coordinator.settings import Settings
from coordinator.topology import CHANGELOG_STREAM, core

BROKER = "amqp://guest:guest@127.0.0.1:5672/"
COVEY = str(Path(sys.executable).parent / "covey")


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


# -- 7: topology for a large roster; 8: the supervisor idle with it ----------------------


def write_roster(home: Path, agents: int) -> None:
    (home / "agents").mkdir(parents=True)
    (home / "covey.toml").write_text('identity = "human:ada"\n[humans.ada]\n')
    for n in range(agents):
        folder = home / "agents" / f"agent{n:04d}"
        folder.mkdir()
        (folder / "agent.toml").write_text(
            f'teams = ["team{n % 10}", "guild{n % 7}"]\ncommand = "true"\n'
        )


def covey_env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVEY_")}
    env.update(COVEY_HOME=str(home), COVEY_AMQP_URL=url, COVEY_STATE_DIR=str(home / "state"))
    return env


async def bench_topology(url: str, quick: bool) -> Figure:
    agents = 100 if quick else 1000
    admin = ManagementAdmin("http://127.0.0.1:15672", "guest", "guest")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        write_roster(home, agents)
        started = time.perf_counter()
        subprocess.run(
            [COVEY, "topology", "apply"], env=covey_env(home, url), check=True, capture_output=True
        )
        covey_s = time.perf_counter() - started
    # The raw side in a fresh vhost too: declaring what exists already would be cheaper.
    vhost = f"covey-bench-{uuid.uuid4().hex[:8]}"
    admin.add_vhost(vhost, "guest")
    try:
        connection = await aio_pika.connect(BROKER + vhost)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange("covey", "topic", durable=True)
            started = time.perf_counter()
            for n in range(agents):
                queue = await channel.declare_queue(
                    f"agent.agent{n:04d}", durable=True, arguments={"x-queue-type": "quorum"}
                )
                for key in (f"agent.agent{n:04d}", f"team.team{n % 10}", f"team.guild{n % 7}"):
                    await queue.bind(exchange, key)
                await queue.bind(exchange, "broadcast")
            raw_s = time.perf_counter() - started
    finally:
        admin.delete_vhost(vhost)
    return Figure(
        f"topology apply, {agents} agents x 2 teams",
        "s",
        covey_s,
        raw_s,
        "≤ 0.5 × raw",
        "covey: the real command, parallel channels; raw: one sequential loop, one channel",
    )


async def bench_supervisor(url: str, quick: bool) -> Figure:
    agents, idle = (100, 10) if quick else (1000, 60)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        write_roster(home, agents)
        env = covey_env(home, url)
        subprocess.run([COVEY, "topology", "apply"], env=env, check=True, capture_output=True)
        port = free_port()
        daemon = subprocess.Popen(
            [COVEY, "supervise", "--metrics-port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            metrics = f"http://127.0.0.1:{port}/metrics"
            while not answers("127.0.0.1", port):  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.2)
            while "covey_mailbox_pending{" not in _get(metrics):  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.5)  # until the first broker snapshot
            cpu_before = _cpu_seconds(daemon.pid)
            await asyncio.sleep(idle)
            cpu_per_minute = (_cpu_seconds(daemon.pid) - cpu_before) * 60 / idle
            rss_mb = _rss_mb(daemon.pid)
            scrapes = []
            for _ in range(10):
                started = time.perf_counter()
                _get(metrics)
                scrapes.append(time.perf_counter() - started)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    return Figure(
        f"supervisor idle, {agents} agents: /metrics scrape",
        "s",
        statistics.median(scrapes),
        None,
        "RSS ≤ 150 MB; scrape ≤ 1 s",
        f"RSS {rss_mb:.0f} MB; CPU {cpu_per_minute:.2f} s per minute idle "
        "(broker figures refreshed every 5 s)",
    )


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


FIGURES = {"digest": bench_digest, "topology": bench_topology, "supervisor": bench_supervisor}


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
