"""Figure 16 (issue #16): what replication costs. Figures 1, 2, 3a and 5a measured
again, with the same code, on a private single node and on a private 3-node cluster
(covey talking to node 0), side by side, plus the nodes' resident memory.

Each row's two columns are covey on three nodes and covey on one node, so its ratio is
cluster / one node; the note gives the raw aio-pika figure on both. The two brokers run
at the same time and each figure is measured on one node, the cluster, the cluster
again and one node again (once each in a quick run), so that a noisy machine hits both
alike; the other broker idles meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from benchlib import COVEY, Bench, CtlAdmin, Figure, covey_env, wall_time, write_roster
from fig_locks import bench_locks
from fig_mail import bench_drain, bench_round_trip, bench_send

from coordinator.localbroker import LocalBroker, LocalCluster

SIZE = 3
SIDES = ("3 nodes", "1 node")  # what the covey and raw columns hold in figure 16's rows
MB = 1024 * 1024


def settle_seconds(bench: Bench) -> float:
    """Idling before a memory reading, for the Erlang allocators to settle."""
    return 1.0 if bench.quick else 5.0


def roster_size(bench: Bench) -> int:
    """How many agents' topology is declared to read the memory one agent costs."""
    return 20 if bench.quick else 200


@dataclass
class Side:
    """One broker under test: a Bench of its own on it, and how to read its memory."""

    bench: Bench  # the first pass's, which figure 16a and the roster use
    second: Bench  # the second pass's (full runs)
    nodes: list[LocalBroker]
    readings: dict[str, Any]

    def rss_mb(self) -> float:
        return sum(node.rss_bytes() for node in self.nodes) / MB

    def rss_per_node_mb(self) -> list[float]:
        return [round(node.rss_bytes() / MB, 1) for node in self.nodes]

    def cpu_seconds(self) -> float:
        return sum(node.cpu_seconds() for node in self.nodes)

    async def remember_memory(self, key: str) -> None:
        await asyncio.sleep(settle_seconds(self.bench))
        self.readings[key] = {"total_mb": round(self.rss_mb(), 1), "nodes": self.rss_per_node_mb()}


def _side(bench: Bench, nodes: list[LocalBroker], folder: str) -> Side:
    first = nodes[0]  # covey and raw aio-pika both talk to node 0
    benches = [
        Bench(
            base_url=first.url,
            admin=CtlAdmin(first.ctl),
            quick=bench.quick,
            workdir=bench.folder(f"{folder}-{n}"),  # the figures' folders are per Bench
            prefix=f"{bench.prefix}-{folder}-{n}",
        )
        for n in range(2)
    ]
    benches[0].default_vhost_free = True  # figure 1 gets "/": the queue status looks there
    benches[0].provision(4)  # drain, round trip, locks, the roster
    if not bench.quick:
        benches[1].provision(4)  # send, drain, round trip, locks
    return Side(benches[0], benches[1], nodes, {})


async def _apply_roster(side: Side, agents: int) -> dict[str, Any]:
    """Declare one agent's topology in a fresh vhost, then `agents` agents' (in the same
    vhost): the memory between the two readings is what agents - 1 agents cost, and the
    CPU of the idle nodes afterwards what their queues cost when nobody talks."""
    url = await side.bench.vhost()
    one = write_roster(side.bench.folder("roster-1"), 1)
    many = write_roster(side.bench.folder(f"roster-{agents}"), agents)
    await wall_time([COVEY, "topology", "apply"], covey_env(one, url))
    settle = settle_seconds(side.bench)
    await asyncio.sleep(settle)
    before = side.rss_mb()
    took = await wall_time([COVEY, "topology", "apply"], covey_env(many, url))
    await asyncio.sleep(settle)
    after = side.rss_mb()
    cpu_before = side.cpu_seconds()
    idle = 2 * settle
    await asyncio.sleep(idle)
    cpu_share = (side.cpu_seconds() - cpu_before) / idle
    return {
        "apply_s": round(took, 2),
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "per_agent_kb": (after - before) * 1024 / (agents - 1),
        "idle_cpu_share": cpu_share,  # of one core, all nodes together
    }


async def _both(
    one: Side, cluster: Side, measure: Callable[[Bench], Awaitable[list[Figure]]]
) -> tuple[dict[str, Figure], dict[str, Figure]]:
    """The figures `measure` makes on one node and on the cluster, by id. A full run
    measures each twice, one node, cluster, cluster, one node, and gives the means, so
    that a machine whose load drifts weighs on both alike; every pass is kept in
    `extra`, with the load average after it (the machine is shared)."""
    passes: list[tuple[Side, Bench]] = [(one, one.bench), (cluster, cluster.bench)]
    if not one.bench.quick:
        passes += [(cluster, cluster.second), (one, one.second)]
    measured: dict[int, list[list[Figure]]] = {id(one): [], id(cluster): []}
    for side, bench in passes:
        figures = await measure(bench)
        load = [round(x, 2) for x in os.getloadavg()]
        for figure in figures:
            figure.extra["load_average_after"] = load
        measured[id(side)].append(figures)
    return _mean(measured[id(one)]), _mean(measured[id(cluster)])


def _mean(passes: list[list[Figure]]) -> dict[str, Figure]:
    """One Figure per id from one or more passes: the means of covey's and raw's."""
    if len(passes) == 1:
        return {f.id: f for f in passes[0]}
    by_id: dict[str, list[Figure]] = {}
    for figures in passes:
        for figure in figures:
            by_id.setdefault(figure.id, []).append(figure)
    return {
        figure_id: replace(
            runs[0],
            covey=statistics.mean(f.covey for f in runs),
            raw=_mean_of([f.raw for f in runs]),
            extra={"passes": [f.to_dict() for f in runs]},
        )
        for figure_id, runs in by_id.items()
    }


def _mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def _side_by_side(
    new_id: str, name: str, one: Figure, cluster: Figure, extra: dict[str, Any] | None = None
) -> Figure:
    """Covey on three nodes against covey on one, with raw aio-pika's pair in the note."""
    raw = ""
    if one.raw is not None and cluster.raw is not None:
        raw = (
            f"; raw aio-pika {_fmt(cluster.raw)} on 3 nodes, {_fmt(one.raw)} on 1 "
            f"(ratio {cluster.raw / one.raw:.2f}); covey/raw {_ratio(cluster)} on 3, "
            f"{_ratio(one)} on 1"
        )
    return Figure(
        new_id,
        name,
        one.unit,
        cluster.covey,
        one.covey,
        "(reported)",
        note=f"columns: covey on 3 nodes, on 1; figure {one.id}'s code: {one.name}"
        + ("; means of 2 passes (1, 3, 3, 1 nodes)" if "passes" in one.extra else "")
        + raw,
        extra={
            "sides": list(SIDES),
            "three_nodes": cluster.to_dict(),
            "one_node": one.to_dict(),
            **({"raw_ratio": cluster.raw / one.raw} if one.raw and cluster.raw else {}),
            **(extra or {}),
        },
    )


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _ratio(figure: Figure) -> str:
    return f"{figure.ratio:.2f}" if figure.ratio is not None else "-"


def _leaders(cluster: LocalCluster, queues: list[str]) -> dict[str, Any]:
    """Which node leads each queue (by number) and how many members it has."""
    found: dict[str, Any] = {}
    for queue in queues:
        status = cluster.quorum_status(queue, "/")
        found[queue] = {
            "leader": cluster.index(status.leader) if status.leader else None,
            "members": len(status.members),
        }
    return found


async def bench_cluster(bench: Bench) -> list[Figure]:
    node = LocalBroker(bench.folder("one-node") / "node")
    cluster = LocalCluster(SIZE, bench.folder("cluster") / "nodes")
    try:
        # Booting is mostly waiting: the node and the cluster at once.
        await asyncio.gather(asyncio.to_thread(node.start), asyncio.to_thread(cluster.start))
        return await _measure(bench, _side(bench, [node], "on-one"), cluster)
    finally:
        await asyncio.gather(asyncio.to_thread(node.remove), asyncio.to_thread(cluster.remove))


async def _measure(bench: Bench, one: Side, cluster: LocalCluster) -> list[Figure]:
    three = _side(bench, cluster.nodes, "on-three")
    for side in (one, three):  # covey's core topology and one agent's, then idle
        home = write_roster(side.bench.folder("core"), 1)
        await wall_time([COVEY, "topology", "apply"], covey_env(home, side.bench.base_url))
    await asyncio.gather(one.remember_memory("idle"), three.remember_memory("idle"))

    send_one, send_three = await _both(one, three, bench_send)
    await asyncio.gather(one.remember_memory("after_send"), three.remember_memory("after_send"))
    leaders = await asyncio.to_thread(_leaders, cluster, ["agent.sink", "raw.sink"])
    drain_one, drain_three = await _both(one, three, bench_drain)
    trip_one, trip_three = await _both(one, three, bench_round_trip)
    lock_one, lock_three = await _both(one, three, bench_locks)
    agents = roster_size(bench)
    roster_one = await _apply_roster(one, agents)
    roster_three = await _apply_roster(three, agents)

    where = ", ".join(
        f"{queue} led by node {found['leader']} of {found['members']} members"
        for queue, found in leaders.items()
    )
    send = _side_by_side(
        "16a",
        "send throughput",
        send_one["1"],
        send_three["1"],
        {"leaders": leaders},
    )
    send.note += f". Clients on node 0; {where}"
    figures = [
        send,
        _side_by_side("16b", "drain throughput", drain_one["2"], drain_three["2"]),
        _side_by_side("16c", "round trip a -> b -> a, p50", trip_one["3a"], trip_three["3a"]),
        _side_by_side("16d", "lock acquire + release", lock_one["5a"], lock_three["5a"]),
    ]
    for new_id, key, what in (
        ("16e", "idle", "idle after topology apply"),
        ("16f", "after_send", "after figure 16a's sends"),
    ):
        figures.append(
            Figure(
                new_id,
                f"broker RSS {what}",
                "MB",
                three.readings[key]["total_mb"],
                one.readings[key]["total_mb"],
                "(reported)",
                note=f"columns: all 3 nodes together, the one node; per node: "
                f"{', '.join(f'{mb:.0f}' for mb in three.readings[key]['nodes'])} MB",
                extra={
                    "sides": list(SIDES),
                    "three_nodes": three.readings[key],
                    "one_node": one.readings[key],
                },
            )
        )
    figures.append(
        Figure(
            "16g",
            f"broker memory per agent ({agents} agents)",
            "kB",
            roster_three["per_agent_kb"],
            roster_one["per_agent_kb"],
            "(reported)",
            note=f"RSS before and after `covey topology apply` of {agents} agents x 2 teams, "
            f"all nodes together; idle afterwards the nodes use "
            f"{roster_three['idle_cpu_share']:.0%} of a core on 3 nodes, "
            f"{roster_one['idle_cpu_share']:.0%} on 1. The apply took "
            f"{roster_three['apply_s']:.1f} s on 3 nodes, {roster_one['apply_s']:.1f} s on 1",
            extra={"sides": list(SIDES), "three_nodes": roster_three, "one_node": roster_one},
        )
    )
    return figures
