"""covey side by side with raw aio-pika, on the same broker, in one run.

    .venv/bin/python tests/bench/run.py [--quick] [--out figures.json] [--only NAME]...
                                        [--url AMQP_URL] [--profile covey.prof]

Figures (see issue #7): 1 send throughput, 2 drain throughput, 3 round trip,
4 cold CLI commands, 5 locks, 6 digest far behind, 7 `covey topology apply`
for 1,000 agents, 8 `covey supervise` idle with them; sessions (issue #13): 9 a
printed line until an attached reader sees it, 10 an agent printing as fast as
it can under `covey run`, 11 attaching to a run from its start far behind the
head; the web server (issue #14): 14 fifty SSE clients following a fast run,
`/api/agents` on figure 7's roster; MCP (issue #15): 15 `covey mcp` per call, its
tool definitions, a cold `covey notify`; replication (issue #16): 16 figures 1, 2,
3a and 5a on a private 3-node cluster against a private single node, and their
memory. `--only` takes send, drain, roundtrip, cli, locks, digest, topology,
supervisor, sessions, web, mcp, cluster.

Each figure is measured for covey and for the plain aio-pika equivalent,
interleaved (covey, raw, covey, raw, …) so that a noisy machine hits both
alike; the table gives medians, the ratio covey/raw, the target and whether it
was met, and `--out` writes all of it with every repetition and the machine's
facts as JSON. A full run takes about 5 minutes on 2 cores (the sessions
figures under 2 of them, figure 16 about 3 more); `--quick` uses tiny sizes and
takes about a minute and a half, much of it starting the broker, and leaves figure 16
out (starting three nodes would add half a minute and 400 MB to CI's smoke test)
unless asked for with `--only cluster`.

By default the run starts a private throwaway RabbitMQ node
(coordinator.localbroker) and removes it at the end, so a thousand quorum
queues never touch a shared broker; with `--url` it runs on that broker
instead, in vhosts of its own (management API, else rabbitmqctl), deleted at
the end. Each figure gets a vhost of its own. Processes the bench starts cache
their bytecode in a private folder, as an installed covey would.

Exit status: 0 when every figure was measured, met or not; 1 when one failed
(its row says why, and the others are still measured).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import pstats
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the figure modules beside this one
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # conftest: the tests' admin

import aio_pika
import benchlib
from benchlib import Admin, Bench, CtlAdmin, Figure, admin_for_url
from fig_cli import bench_cli
from fig_cluster import bench_cluster
from fig_locks import bench_locks
from fig_mail import bench_drain, bench_round_trip, bench_send
from fig_mcp import bench_mcp
from fig_roster import bench_digest, bench_supervisor, bench_topology, topology_size
from fig_sessions import SESSION_VHOSTS, bench_sessions
from fig_web import bench_web

from coordinator import __version__
from coordinator.localbroker import LocalBroker

FIGURES: dict[str, Callable[[Bench], Awaitable[list[Figure]]]] = {
    "send": bench_send,
    "drain": bench_drain,
    "roundtrip": bench_round_trip,
    "cli": bench_cli,
    "locks": bench_locks,
    "digest": bench_digest,
    "topology": bench_topology,
    "supervisor": bench_supervisor,
    "sessions": bench_sessions,
    "web": bench_web,
    "mcp": bench_mcp,
    "cluster": bench_cluster,
}
# Left out of `--quick` unless named with `--only`: see the docstring.
NOT_QUICK = {"cluster"}
# Seconds a figure group may take, beyond the default (quick, full): figure 16 starts
# four nodes of its own and measures every figure twice.
LIMITS = {"cluster": (240, 900)}


def vhosts_needed(names: list[str], bench: Bench) -> int:
    """How many vhosts the chosen figures take, to create them in one go."""
    _, topology_runs = topology_size(bench)
    # Figure 16 brings brokers of its own.
    count = sum(
        1 for name in names if name not in ("topology", "supervisor", "sessions", "cluster")
    )
    if "sessions" in names:
        count += SESSION_VHOSTS
    if "topology" in names:
        count += 2 * topology_runs
    elif "supervisor" in names:
        count += 1
    if "web" in names and "topology" not in names:  # /api/agents needs a roster of its own
        count += 1
    return count


async def broker_facts(url: str) -> dict[str, Any]:
    connection = await aio_pika.connect(url)
    async with connection:
        properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
    return {
        "rabbitmq": str(properties.get("version")),
        "erlang": str(properties.get("platform")),
    }


def machine_facts() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "covey": __version__,
        "aio_pika": aio_pika.__version__,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def table(figures: list[Figure]) -> str:
    lines = [
        f"{'#':<4}{'figure':<46}{'unit':>6}{'covey':>11}{'raw':>11}{'ratio':>7}  {'target':<22}met?"
    ]
    for f in figures:
        raw = _num(f.raw) if f.raw is not None else "-"
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        lines.append(
            f"{f.id:<4}{f.name[:45]:<46}{f.unit:>6}{_num(f.covey):>11}{raw:>11}{ratio:>7}  "
            f"{f.target:<22}{met}"
        )
        if f.note:
            lines.append(f"{'':<8}{f.note}")
        if f.error:
            lines.append(f"{'':<8}FAILED: {f.error}")
    return "\n".join(lines)


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


async def measure(
    args: argparse.Namespace, base_url: str, admin: Admin, workdir: Path
) -> dict[str, Any]:
    chosen = args.only or [n for n in FIGURES if not (args.quick and n in NOT_QUICK)]
    names = [name for name in FIGURES if name in chosen]
    started = time.perf_counter()
    bench = Bench(
        base_url=base_url,
        admin=admin,
        quick=args.quick,
        workdir=workdir,
        prefix=f"covey-bench-{uuid.uuid4().hex[:6]}",
    )
    try:
        if not args.url:  # the private node's default vhost serves the first figure
            bench.default_vhost_free = True
        bench.provision(vhosts_needed(names, bench) - bench.default_vhost_free)
        facts = {**machine_facts(), **await broker_facts(base_url)}
        if not args.quick:  # rabbitmqctl's Erlang start-up would weigh on the first figure
            await bench.settled()
        figures: list[Figure] = []
        timings: dict[str, float] = {}
        for name in names:
            limit = LIMITS.get(name, (150, 300))[0 if args.quick else 1]
            began = time.perf_counter()
            print(f"bench: {name} …", file=sys.stderr, flush=True)
            try:
                figures += await asyncio.wait_for(FIGURES[name](bench), limit)
            except Exception as err:  # the other figures are still worth having
                if isinstance(err, TimeoutError):
                    err = TimeoutError(f"took over {limit} s")
                traceback.print_exc()
                figures.append(Figure.failed(name, err))
            timings[name] = round(time.perf_counter() - began, 2)
    finally:
        await bench.settled()
        if args.url:  # a throwaway node goes whole; a shared broker gets its vhosts back
            admin.delete_vhosts(bench.created)
    return {
        "mode": "quick" if args.quick else "full",
        "broker": "private throwaway node" if not args.url else "given --url",
        "machine": facts | {"load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "seconds_per_figure": timings,
        "figures": figures,
        "measure_seconds": round(time.perf_counter() - started, 2),
    }


async def main() -> int:
    """0 when every figure was measured (met or not), 1 when one could not be."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, under 30 s")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--only", choices=list(FIGURES), action="append", help="repeatable")
    parser.add_argument(
        "--url", help="run on this broker (vhosts of its own) instead of a private node"
    )
    parser.add_argument(
        "--profile", type=Path, help="cProfile covey's side of every figure into this file"
    )
    args = parser.parse_args()
    if args.profile:
        benchlib.PROFILER = benchlib.Profiler()
    wall_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="covey-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        dont_write = benchlib.cache_bytecode(workdir / "pycache")
        warming = asyncio.create_task(benchlib.warm_bytecode())  # while the node starts
        admin: Admin
        if args.url:
            base_url, admin = args.url, admin_for_url(args.url)
        else:
            if not LocalBroker.available():
                raise SystemExit(
                    "bench: no rabbitmq-server here for a private node: apt-get install "
                    "rabbitmq-server, or run on a broker of yours with --url"
                )
            node = LocalBroker()
            stack.callback(node.remove)
            await asyncio.to_thread(node.start)
            base_url, admin = node.url, CtlAdmin(node.ctl)
        await warming
        result = await measure(args, base_url, admin, workdir)
    result["bytecode"] = (
        "cached under a private PYTHONPYCACHEPREFIX for the processes the bench starts"
        + (f" (the environment had PYTHONDONTWRITEBYTECODE={dont_write})" if dont_write else "")
    )
    result["wall_seconds"] = round(time.perf_counter() - wall_started, 2)
    figures: list[Figure] = result["figures"]
    print(table(figures))
    met = [f for f in figures if f.met is not None]
    print(
        f"\n{sum(bool(f.met) for f in met)} of {len(met)} targets met; "
        f"{result['mode']} run, {result['wall_seconds']:.0f} s in all "
        f"({result['machine']['cpu_count']} CPUs, RabbitMQ {result['machine']['rabbitmq']}, "
        f"Python {result['machine']['python']})"
    )
    if args.out:
        result["figures"] = [f.to_dict() for f in figures]
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if benchlib.PROFILER is not None:
        benchlib.PROFILER.profile.dump_stats(args.profile)
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(25)
    return 1 if any(f.error for f in figures) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
