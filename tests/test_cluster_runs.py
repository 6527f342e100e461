"""Runs, locks, supervisors and the changelog on a three-node cluster with a node failing
(issue #16).

One LocalCluster (private nodes on free loopback ports, never the machine's own broker)
serves the whole file. Every agent here stamps its start, its progress and its end, with
time.time(), in a log shared by all of them (one machine, one clock), and the checks are
made on those stamps and on covey's run records:

* a `covey run` holding the global lock on node A, which also leads the changelog
  stream; A stopped: the run learns it lost the lock (exit 8, lock-lost), changelog
  entries are appended through node B while A is down, a supervisor on node B takes the
  lock (reading the last fencing token from the replicated fence note) and runs the next
  agent, whose digest shows those entries once; the two agents never ran at once, and
  every entry is there once A is back;
* two supervisors on different nodes, three agents on schedules every few seconds: every
  firing in the window runs once, none twice.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import World, covey_command
from faultkit import connections, stop, vhost_url, world_on
from test_cluster import cluster, settled, vhost_of

from coordinator.guard import GRACE_SECONDS
from coordinator.localbroker import LocalCluster
from coordinator.lock import HEARTBEAT_SECONDS, TAKEOVER_SECONDS
from coordinator.topology import CHANGELOG_STREAM

# A cluster start, a node stopped and started again, a schedule watched for half a minute.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]
__all__ = ["cluster"]  # the fixture (test_cluster.py: one cluster per module), used by name

# Stamps `start`, `alive` every 0.1 s for argv[2] seconds, then `end`, each with the agent's
# name, pid, time.time(), fencing token and state folder (which supervisor ran it); copies
# the digest it was given to argv[3], when there is one.
STAMPING_AGENT = """
import os, shutil, sys, time
log, seconds = sys.argv[1], float(sys.argv[2])
name, pid = os.environ["COVEY_AGENT"], os.getpid()
token = os.environ.get("COVEY_FENCING_TOKEN", 0)
where = os.path.basename(os.environ.get("COVEY_STATE_DIR", "-"))
def say(what):
    with open(log, "a") as f:
        f.write(f"{what} {name} {pid} {time.time()} {token} {where}\\n")
say("start")
if len(sys.argv) > 3:
    shutil.copy(os.environ["COVEY_DIGEST_FILE"], sys.argv[3])
until = time.monotonic() + seconds
while time.monotonic() < until:
    time.sleep(0.1)
    say("alive")
say("end")
"""


# Appends argv[2:] to the changelog as argv[1], on one connection (20 `covey log add`
# processes would take as many seconds here).


# Appends argv[2:] to the changelog as argv[1], on one connection (20 `covey log add`
# processes would take as many seconds here).
APPEND = """
import asyncio, sys
from coordinator.client import Covey

async def main() -> None:
    async with Covey.open(identity=sys.argv[1]) as covey:
        for summary in sys.argv[2:]:
            await covey.log_add(summary)

asyncio.run(main())
"""


@dataclass
class Span:
    """One agent run, from its stamps."""

    agent: str
    pid: int
    start: float
    token: int
    where: str  # the state folder of the covey that ran it
    last: float  # the last moment it was seen working
    ended: bool


def spans(log: Path) -> list[Span]:
    """Every run in the log, in the order they started."""
    found: dict[int, Span] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        what, agent, pid, at, token, where = line.split()
        if what == "start":
            found[int(pid)] = Span(agent, int(pid), float(at), int(token), where, float(at), False)
        elif int(pid) in found:
            found[int(pid)].last = float(at)
            found[int(pid)].ended |= what == "end"
    return sorted(found.values(), key=lambda s: s.start)


def stamping(world: World, name: str, toml: str, seconds: float, *extra: str) -> None:
    script = world.home / "stamping_agent.py"
    script.write_text(STAMPING_AGENT)
    args = ", ".join(f'"{a}"' for a in (sys.executable, script, world.home / "stamps.log"))
    extras = "".join(f', "{a}"' for a in extra)
    world.add_agent(name, f'command = [{args}, "{seconds}"{extras}]\n{toml}')


def through(world: World, cluster: LocalCluster, order: list[int], **extra: str) -> dict[str, str]:
    """`world`'s environment for a covey that tries these nodes, in this order."""
    urls = [vhost_url(cluster.nodes[i], vhost_of(world)) for i in order]
    return world.env | {
        "COVEY_AMQP_URL": urls[0],
        "COVEY_AMQP_URLS": ",".join(urls),
        "COVEY_AMQP_ORDER": "listed",
        **extra,
    }


def launch(world: World, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*covey_command(), *args],
        env=env,
        cwd=world.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def covey_json(world: World, env: dict[str, str], *args: str) -> Any:
    done = world.covey(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def runs_of(world: World, env: dict[str, str], agent: str) -> list[dict[str, Any]]:
    return covey_json(world, env, "runs", agent, "--limit", "500")  # type: ignore[no-any-return]


def wait_until(condition: Any, timeout: float, what: str, said: Path | None = None) -> None:
    """Poll `condition` until true; else fail saying `what`, and the tail of `said` (a
    supervisor's log) when given."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            log = f"; it said:\n{said.read_text()[-4000:]}" if said else ""
            raise AssertionError(f"timed out waiting for {what}{log}")
        time.sleep(0.2)


def test_a_run_loses_its_lock_with_its_node_and_a_supervisor_elsewhere_runs_the_next(
    world: World, cluster: LocalCluster, tmp_path: Path
) -> None:
    """Node A leads the changelog stream and holds `covey run holder`'s lock connection
    (lock connections never move); a supervisor on node B runs `next`, which waits for the
    global lock. A stopped: the run exits 8, lock-lost, within the heartbeat bound; the
    supervisor takes the lock, waits out holder's lease and runs `next`, never beside
    `holder`. Entries appended through B while A is down are in `next`'s following
    digest once, and all there once A is back."""
    with world_on(cluster.nodes[0], world, "runs") as on:
        vhost = vhost_of(on)
        stream = settled(
            lambda: cluster.stream_status(CHANGELOG_STREAM, vhost),
            lambda s: len(s.members) == 3 and s.leader is not None,
        )
        assert stream.leader is not None, stream
        a = cluster.index(stream.leader)
        b, c = (i for i in range(3) if i != a)
        stamping(on, "holder", "", 120)
        digest_copy = tmp_path / "next-digest.txt"
        stamping(on, "next", "wait_lock = 120\n", 1, str(digest_copy))
        log = on.home / "stamps.log"
        on_a, on_b = through(on, cluster, [a, b, c]), through(on, cluster, [b, c])

        on.ok("log", "add", "before the stop", "--as", "scout", env=on_b)
        on.ok("digest", "next", "--advance", env=on_b)  # next's cursor: past "before"

        # The run tries A first and so takes its lock there; its other connection may move.
        run = launch(on, on_a, "run", "holder")
        said = tmp_path / "supervisor.err"  # a file: read when a wait times out
        with said.open("w") as into:
            supervisor = subprocess.Popen(
                [*covey_command(), "supervise", "--no-metrics"],
                env=on_b | {"COVEY_STATE_DIR": str(tmp_path / "state-b")},
                cwd=on.home,
                stdout=subprocess.DEVNULL,
                stderr=into,
            )
        try:
            wait_until(lambda: spans(log), 60, "holder to start")
            lock_names = [name for _, name in connections(cluster.nodes[a], vhost)]
            assert any(name.startswith("covey lock holder") for name in lock_names), lock_names
            # Accepted once the supervisor listens; its run then waits for the global lock,
            # on a lock connection to B.
            wait_until(
                lambda: on.covey("run", "next", "--via-supervisor", env=on_b).returncode == 0,
                60,
                "the supervisor to take requests",
            )
            wait_until(
                lambda: any(
                    name.startswith("covey lock next")
                    for _, name in connections(cluster.nodes[b], vhost)
                ),
                30,
                "next's run to wait for the lock on B",
            )
            stopping, stopping_at = time.monotonic(), time.time()
            cluster.stop_node(a)
            stopped = time.monotonic()
            try:
                out, err = run.communicate(timeout=90)
                exited = time.monotonic() - stopping
                assert run.returncode == 8, out + err
                assert "lock-lost" in out
                # A graceful stop closes the connection; a dead node's heartbeats would be
                # missed twice: the agent is stopped within that, plus the guard's grace.
                # (The run then records its end through another node: slower, unbounded.)
                stopped_agent = spans(log)[0].last - stopping_at
                print(
                    f"node {a} stop took {stopped - stopping:.1f} s; holder's agent last seen "
                    f"{stopped_agent:.1f} s and covey run exited {exited:.1f} s after it began"
                )
                bound = (stopped - stopping) + 2 * HEARTBEAT_SECONDS + GRACE_SECONDS
                assert stopped_agent < bound, f"the agent ran {stopped_agent:.1f} s on"

                wait_until(
                    lambda: len(spans(log)) == 2 and spans(log)[1].ended,
                    90,
                    "next's run",
                    said,
                )
                holder, nxt = spans(log)
                assert (holder.agent, nxt.agent) == ("holder", "next")
                assert not holder.ended
                print(
                    f"next started {nxt.start - holder.last:.1f} s after holder was last seen "
                    f"(takeover bound {TAKEOVER_SECONDS:.0f} s)"
                )
                assert holder.last < nxt.start, (
                    f"holder worked {holder.last - nxt.start:.2f} s into next's run"
                )
                assert "Nothing new since" in digest_copy.read_text()
                # Whether its read of the fence note met the quorum queue leaderless (that
                # closes the lock connection: the run takes the lock again on a new one).
                retried = said.read_text().count("trying again on a new lock connection")
                print(f"next's run tried again on a new lock connection {retried} time(s)")

                # Still with A down: appended through B, then next runs again.
                during = [f"while A is down {n}" for n in range(20)]
                appended = subprocess.run(
                    [sys.executable, "-c", APPEND, "agent:scout", *during],
                    env=on_b,
                    cwd=on.home,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert appended.returncode == 0, appended.stderr
                wait_until(
                    lambda: on.covey("run", "next", "--via-supervisor", env=on_b).returncode == 0,
                    60,
                    "the supervisor to take the second request",
                )
                wait_until(lambda: len(spans(log)) == 3 and spans(log)[2].ended, 60, "next again")
                shown = digest_copy.read_text()
                # Entry lines end with their summary ("- #3 (15s ago) while A is down 2").
                entries = [line for line in shown.splitlines() if line.startswith("- #")]
                listed = [line.split(") ", 1)[1] for line in entries]
                assert Counter(listed) == Counter(during), shown
                assert "Nothing new since" in on.ok("digest", "next", env=on_b)

                holder_runs = runs_of(on, on_b, "holder")
                assert [r["outcome"] for r in holder_runs] == ["lock-lost"], holder_runs
                next_runs = runs_of(on, on_b, "next")
                assert [r["outcome"] for r in next_runs] == ["ok", "ok"], next_runs
                # holder never released the global lock: next's first run waited out its
                # lease (counted from when it took the lock), the second did not.
                waited = [r["lease_wait_seconds"] for r in next_runs]
                assert waited[0] >= TAKEOVER_SECONDS - 2 and waited[1] is None, next_runs
                everything = covey_json(on, on_b, "log", "--since", "0", "--limit", "1000")
                summaries = [e["summary"] for e in everything]
                assert Counter(summaries) == Counter(["before the stop", *during]), summaries
            finally:
                cluster.start_node(a)
            # And through A, listed first, once it is back: until its stream member runs,
            # covey reads through a node that has one (Gateway.consume_stream); either
            # way every entry is there, once.
            wanted = Counter(["before the stop", *during])
            read = settled(
                lambda: on.covey("log", "--since", "0", "--limit", "1000", "--json", env=on_a),
                lambda done: (
                    done.returncode == 0
                    and Counter(e["summary"] for e in json.loads(done.stdout)) == wanted
                ),
                timeout=90,
            )
            assert read.returncode == 0, read.stderr
            assert Counter(e["summary"] for e in json.loads(read.stdout)) == wanted
        finally:
            for process in (run, supervisor):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.communicate(timeout=30)
                stop(process)


PERIOD = 5  # seconds between firings
WINDOW = 30  # seconds of firings checked (the 60 s shows nothing more: 18 firings)


def test_two_supervisors_on_two_nodes_run_every_firing_once(
    world: World, cluster: LocalCluster, tmp_path: Path
) -> None:
    """Three agents fire every PERIOD seconds; a supervisor on node 1 and one on node 2,
    each with its own state folder, both fire every one of them. Each agent's own lock
    lets one run and skips the other (`skipped:busy`): over WINDOW seconds every firing
    ran exactly once, by the stamps and by the run records."""
    agents = ("tick", "tock", "tack")
    with world_on(cluster.nodes[0], world, "runs") as on:
        for name in agents:
            # No shared lock (the global one would let one agent run per firing, not three).
            stamping(on, name, f'schedule = "* * * * * */{PERIOD}"\nlock = "none"\n', 1.5)
        log = on.home / "stamps.log"
        said = {node: tmp_path / f"supervisor-{node}.err" for node in (1, 2)}
        supervisors = []
        for node, err in said.items():
            env = through(on, cluster, [node]) | {"COVEY_STATE_DIR": str(tmp_path / f"s{node}")}
            with err.open("w") as into:
                supervisors.append(
                    subprocess.Popen(
                        [*covey_command(), "supervise", "--no-metrics"],
                        env=env,
                        cwd=on.home,
                        stdout=subprocess.DEVNULL,
                        stderr=into,
                    )
                )
        try:
            wait_until(
                lambda: all("supervising" in err.read_text() for err in said.values()),
                60,
                "both supervisors to schedule",
            )
            # The first firing both surely saw coming, and the last whose run ends in time.
            first = (time.time() // PERIOD + 1) * PERIOD
            last = first + WINDOW - PERIOD
            # Stopped between firings: the last one's runs finish within the shutdown grace.
            time.sleep(max(0.0, last + PERIOD / 2 - time.time()))
        finally:
            for process in supervisors:
                process.send_signal(signal.SIGTERM)
            for process in supervisors:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(60)
                stop(process)
        exits = [process.returncode for process in supervisors]
        errors = "\n".join(err.read_text()[-2000:] for err in said.values())
        assert exits == [0, 0], errors

        firings = [first + k * PERIOD for k in range(round((last - first) / PERIOD) + 1)]
        runs = spans(log)
        lag = max(run.start - (run.start // PERIOD) * PERIOD for run in runs)
        # A run is its firing's while it starts well before the next firing.
        assert lag < PERIOD - 1, f"a run started {lag:.1f} s after its firing"
        by_supervisor = Counter(run.where for run in runs)
        print(
            f"{len(runs)} runs for {len(firings)} firings x {len(agents)} agents in the window; "
            f"by supervisor {dict(by_supervisor)}; latest start {lag:.2f} s after its firing"
        )
        skipped: dict[str, int] = {}
        for name in agents:
            fired = Counter((run.start // PERIOD) * PERIOD for run in runs if run.agent == name)
            twice = {at: n for at, n in fired.items() if n > 1}
            assert not twice, f"{name}: firings run more than once: {twice}"
            missed = [at for at in firings if at not in fired]
            assert not missed, f"{name}: firings never run: {missed} (ran: {sorted(fired)})"
            records = runs_of(on, on.env, name)
            ok = [r for r in records if r["outcome"] == "ok"]
            assert len(ok) == sum(fired.values()), records
            skipped[name] = len(records) - len(ok)
            assert {r["trigger"] for r in records} == {"schedule"}, records
            assert {r["outcome"] for r in records} <= {"ok", "skipped:busy"}, records
        print(f"runs recorded skipped:busy (the other supervisor's try) {skipped}")
