"""Figures 6-8: the digest far behind the head, `covey topology apply` for a large roster,
and `covey supervise` idling with it."""

from __future__ import annotations

import asyncio
import signal
import statistics
import subprocess
import time
import urllib.request

import aio_pika
from benchlib import (
    COVEY,
    Bench,
    Figure,
    bulk_publish,
    covey_env,
    cpu_seconds,
    interleaved,
    rss_mb,
    wall_time,
    write_roster,
)

from coordinator import changelog, digest, stream
from coordinator.client import Covey
from coordinator.gateway import Gateway
from coordinator.identity import SenderCheck
from coordinator.localbroker import answers, free_port
from coordinator.roster import DigestConfig
from coordinator.settings import Settings
from coordinator.topology import CHANGELOG_STREAM, core

# -- 6: the digest, with a cursor far behind the head -------------------------------------

RECENT = 500  # the newest entries, appended as agents do: small chunks


async def bench_digest(bench: Bench) -> list[Figure]:
    behind, budget, repeats = (2_000, 50, 2) if bench.quick else (100_000, 50, 9)
    settings = Settings(amqp_url=await bench.vhost())
    runs: dict[str, object] = {}
    async with await Gateway.connect(settings) as gateway:
        await gateway.apply(core(settings.changelog))
        # Set-up, not timed. Agents append entries one at a time, so the stream near the
        # head is chunks of an entry or a few; the bulk load below the newest RECENT entries
        # packs ~100 a chunk, which only the depth of the stream sees.
        body = changelog.Entry.new(author="agent:other", summary="a change").model_dump_json()
        await bulk_publish(
            settings.amqp_url,
            CHANGELOG_STREAM,
            [(body.encode(), {"type": changelog.ENTRY_TYPE})],
            copies=behind - RECENT,
        )
        channel = await gateway.connection.channel(publisher_confirms=True)
        for _ in range(0, RECENT, 50):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(body.encode(), type=changelog.ENTRY_TYPE),
                        CHANGELOG_STREAM,
                    )
                    for _ in range(50)
                )
            )
        await changelog.advance(gateway, "reader", 0)
        config = DigestConfig(max_entries=budget, max_chars=1_000_000)
        head = await stream.head(gateway, CHANGELOG_STREAM)
        assert head is not None

        async def covey() -> float:
            started = time.perf_counter()
            senders = SenderCheck.for_settings(settings)
            news = await digest.build(gateway, "reader", config, "agent:reader", senders)
            took = time.perf_counter() - started
            assert len(news.entries) == budget, len(news.entries)
            return took

        async def raw() -> float:
            # The same 50 newest entries, read with aio-pika from a known offset.
            started = time.perf_counter()
            raw_channel = await gateway.connection.channel()
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

        covey_s, raw_s = await interleaved(covey, raw, repeats, runs)
    return [
        Figure(
            "6",
            f"digest, cursor {behind} behind, budget {budget}",
            "s",
            covey_s,
            raw_s,
            "≤ 1 s and ≤ 2 × raw",
            max_value=1.0,
            max_ratio=2.0,
            note="raw is told the head offset; covey finds it (attach at `last`, the newest "
            "chunk up to a basic.qos barrier) and reads its cursor; the newest "
            f"{RECENT} entries appended 50 at a time",
            extra=runs,
        )
    ]


# -- 7: topology for a large roster; 8: the supervisor idle with it ----------------------


def topology_size(bench: Bench) -> tuple[int, int]:
    """Agents, and repetitions of each side (each in fresh vhosts)."""
    return (20, 1) if bench.quick else (1000, 1)


async def bench_topology(bench: Bench) -> list[Figure]:
    agents, repeats = topology_size(bench)
    home = write_roster(bench.folder("topology"), agents)
    runs: dict[str, object] = {}

    async def covey() -> float:
        # Each run in a fresh vhost: declaring what exists already would be cheaper.
        url = await bench.vhost()
        took = await wall_time([COVEY, "topology", "apply"], covey_env(home, url))
        bench.shared["roster"] = (home, url)  # figure 8 idles on this one
        return took

    async def raw() -> float:
        connection = await aio_pika.connect(await bench.vhost())
        async with connection:
            channel = await connection.channel()
            started = time.perf_counter()
            exchange = await channel.declare_exchange("covey", "topic", durable=True)
            for n in range(agents):
                queue = await channel.declare_queue(
                    f"agent.agent{n:04d}", durable=True, arguments={"x-queue-type": "quorum"}
                )
                for key in (f"agent.agent{n:04d}", f"team.team{n % 10}", f"team.guild{n % 7}"):
                    await queue.bind(exchange, key)
                await queue.bind(exchange, "broadcast")
            return time.perf_counter() - started

    # Raw first: whoever goes second shares the node with the first one's idle quorum
    # queues (a thousand cost it about a tenth of a core), so covey takes that handicap.
    covey_s, raw_s = await interleaved(covey, raw, repeats, runs, raw_first=True)
    reapply = ""
    if not bench.quick:  # what a roster change costs: everything exists already
        home, url = bench.shared["roster"]
        again = await wall_time([COVEY, "topology", "apply"], covey_env(home, url))
        runs["reapply_s"] = round(again, 3)
        reapply = f"; again on the applied roster: {again:.1f} s"
    return [
        Figure(
            "7",
            f"topology apply, {agents} agents x 2 teams",
            "s",
            covey_s,
            raw_s,
            "≤ 0.5 × raw",
            max_ratio=0.5,
            note=f"covey: the real command, a cold process, parallel channels ({repeats} run(s), "
            f"after raw's){reapply}; raw: one sequential loop on one channel, same queues and "
            "bindings",
            extra=runs,
        )
    ]


async def bench_supervisor(bench: Bench) -> list[Figure]:
    agents, _ = topology_size(bench)
    idle = 1 if bench.quick else 15
    if "roster" in bench.shared:  # figure 7 left a namespace with this roster applied
        home, url = bench.shared["roster"]
    else:
        url = await bench.vhost()
        home = write_roster(bench.folder("supervisor"), agents)
        await wall_time([COVEY, "topology", "apply"], covey_env(home, url))
    env = covey_env(home, url)
    # One changelog entry, so that every refresh also reads each agent's cursor.
    async with Covey.open(
        identity="agent:agent0000", home=home, amqp_url=url, state_dir=home / "state"
    ) as covey:
        await covey.log_add("bench: something changed")
    port = free_port()
    started = time.perf_counter()
    daemon = subprocess.Popen(
        [COVEY, "supervise", "--metrics-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        metrics = f"http://127.0.0.1:{port}/metrics"
        while not answers("127.0.0.1", port, timeout=0.2):
            if daemon.poll() is not None:
                raise RuntimeError(f"covey supervise exited {daemon.returncode}")
            await asyncio.sleep(0.1)
        deadline = started + 120
        # Until the first broker snapshot, lag included (it comes last).
        while "covey_changelog_lag_entries{" not in await asyncio.to_thread(_get, metrics):
            if time.perf_counter() > deadline or daemon.poll() is not None:
                raise RuntimeError("covey supervise served no broker figures within 120 s")
            await asyncio.sleep(0.2)
        first_snapshot = time.perf_counter() - started
        cpu_before = cpu_seconds(daemon.pid)
        await asyncio.sleep(idle)
        cpu_per_minute = (cpu_seconds(daemon.pid) - cpu_before) * 60 / idle
        rss = rss_mb(daemon.pid)
        scrapes = []
        for _ in range(10):
            took = time.perf_counter()
            _get(metrics)
            scrapes.append((time.perf_counter() - took) * 1000)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    note = (
        f"{agents} agents, idle {idle} s after the first broker snapshot ({first_snapshot:.1f} s)"
    )
    if "roster" in bench.shared:
        note += "; figure 7's quorum queues idle on the same node"
    return [
        Figure(
            "8a",
            f"supervisor idle, {agents} agents: RSS",
            "MB",
            rss,
            None,
            "≤ 150 MB",
            max_value=150,
            note=note,
        ),
        Figure(
            "8b",
            f"supervisor idle, {agents} agents: CPU",
            "s/min",
            cpu_per_minute,
            None,
            "(reported)",
            note="broker figures refreshed every 5 s (or twice as long as the last refresh "
            "took): a passive declare per queue; cursors every 60 s",
        ),
        Figure(
            "8c",
            f"supervisor idle, {agents} agents: /metrics scrape",
            "ms",
            statistics.median(scrapes),
            None,
            "≤ 1000 ms",
            max_value=1000,
            extra={
                "scrapes_ms": [round(x, 2) for x in scrapes],
                "first_snapshot_s": first_snapshot,
            },
        ),
    ]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
