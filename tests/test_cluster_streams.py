"""Streams on a three-node cluster (issue #16): reading through a node that holds no replica
of the stream, and a run's session written across a stop of the sessions stream's leader.

RabbitMQ refuses a stream consumer on a node with no running replica of the stream
(PRECONDITION_FAILED "... does not have a running replica on the local node"); covey's
readers then read through another node. A session writer whose batch was in flight when
the stream's leader stopped gets no confirm for it; it publishes the batch again on a
fresh channel, and readers pass the repeat by.

One cluster (coordinator.localbroker.LocalCluster: private nodes on free loopback ports,
never the machine's own broker) serves the whole file; each test has a vhost of its own
on it, and a test that stops a node starts it again before it ends.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from conftest import World, start
from faultkit import copies, vhost_url, world_on
from test_cluster import cluster, settled, vhost_of
from test_cluster_mail import given_every_node, on_cluster, urls_from, whole
from test_sessions import _finished

from coordinator.localbroker import LocalCluster
from coordinator.topology import CHANGELOG_STREAM, RUNS_STREAM, SESSIONS

pytestmark = pytest.mark.slow
__all__ = ["cluster", "on_cluster"]  # fixtures (one cluster per module), used by name

STREAMS = (CHANGELOG_STREAM, RUNS_STREAM, SESSIONS)


@pytest.fixture
def single_replicas(world: World, cluster: LocalCluster) -> Iterator[World]:
    """The test's covey home with `replicas = 1`, on a vhost of its own, through node 0."""
    toml = world.home / "covey.toml"
    toml.write_text("replicas = 1\n" + toml.read_text())
    with world_on(cluster.nodes[0], world, "streams") as on:
        yield on


@pytest.mark.timeout(300)
def test_streams_are_read_through_another_node_when_the_first_has_no_replica(
    single_replicas: World, cluster: LocalCluster
) -> None:
    """`replicas = 1`: each stream lives on one node. covey given every node's URL, the
    nodes with no replica first (`amqp_order = "listed"`), reads all of the changelog
    (`covey log`), a digest and a run's session (`covey attach`) in full, and says nothing
    of the nodes that refused the consumer. With the changelog's node stopped, `covey
    log` through the others says so in one line (exit 4)."""
    on = single_replicas
    vhost = vhost_of(on)
    on.add_agent(
        "printer", f'command = [{json.dumps(sys.executable)}, "-c", {json.dumps(PRINT_20)}]\n'
    )
    for n in range(5):
        on.ok("log", "add", f"change {n}", "--as", "writer")
    on.ok("run", "printer")
    (run,) = on.json("runs", "printer")
    holders = {
        name: settled(
            lambda name=name: cluster.stream_status(name, vhost), lambda s: len(s.members) == 1
        )
        for name in STREAMS
    }
    members = {member for status in holders.values() for member in status.members}
    replicaless = [i for i, node in enumerate(cluster.nodes) if node.nodename not in members]
    assert replicaless, f"every node holds a stream's replica: {holders}"
    order = replicaless + [i for i in range(len(cluster.nodes)) if i not in replicaless]
    given_every_node(on, [vhost_url(cluster.nodes[i], vhost) for i in order])

    began = time.monotonic()
    log = on.covey("log", "--json")
    log_took = time.monotonic() - began
    assert log.returncode == 0 and log.stderr == "", log.stderr
    assert sorted(e["summary"] for e in json.loads(log.stdout)) == [f"change {n}" for n in range(5)]

    digest = on.covey("digest", "scout")
    assert digest.returncode == 0 and digest.stderr == "", digest.stderr
    for n in range(5):
        assert f"change {n}" in digest.stdout

    began = time.monotonic()
    attach = on.covey("attach", run["run_id"], "--json")
    attach_took = time.monotonic() - began
    assert attach.returncode == 0 and attach.stderr == "", attach.stderr
    events = [json.loads(line) for line in attach.stdout.splitlines()]
    lines = [e["text"] for e in events if e["kind"] == "line"]
    assert lines == [f"line {n}" for n in range(20)]
    assert events[-1]["kind"] == "closed"
    print(
        f"TALLY cluster-replicaless-read: first_node={order[0]} log={log_took:.1f}s "
        f"attach={attach_took:.1f}s lines={len(lines)} duplicates={copies(lines)}"
    )

    # No node that answers has a replica (the changelog's one node stopped): one line,
    # exit 4, within connect_timeout's bounds, not a hang or a traceback.
    (holder,) = {cluster.index(member) for member in holders[CHANGELOG_STREAM].members}
    elsewhere = [vhost_url(cluster.nodes[i], vhost) for i in order if i != holder]
    on.amqp_url = elsewhere[0]
    given_every_node(on, elsewhere)
    cluster.stop_node(holder)
    try:
        began = time.monotonic()
        orphaned = on.covey("log", timeout=120)
        orphaned_took = time.monotonic() - began
    finally:
        cluster.start_node(holder)
    assert orphaned.returncode == 4, orphaned.stdout + orphaned.stderr
    assert len(orphaned.stderr.strip().splitlines()) == 1, orphaned.stderr
    assert CHANGELOG_STREAM in orphaned.stderr and "Traceback" not in orphaned.stderr
    assert orphaned_took < 60, orphaned_took
    print(f"no replica reachable: exit 4 in {orphaned_took:.1f} s: {orphaned.stderr.strip()}")


PRINT_20 = "for n in range(20): print(f'line {n}', flush=True)"
LINES, EVERY = 750, 0.02  # some 15 s of steady output
STEADY = (
    "import time\n"
    f"for n in range({LINES}):\n"
    "    print(f'line {n}', flush=True)\n"
    f"    time.sleep({EVERY})\n"
)


@pytest.mark.timeout(240)
def test_a_run_session_survives_its_stream_leader_stopping_mid_run(
    on_cluster: World, cluster: LocalCluster
) -> None:
    """Injected: while `covey run` (given every node, the sessions stream's leader's last)
    runs an agent that prints a line every EVERY seconds for some 15 s, the node leading
    `covey.sessions` is stopped, then started again. Asserted: `covey attach` afterwards
    shows every line once, in order, ending with `closed`; the run's record names no
    `session_missing`."""
    on = on_cluster
    vhost = vhost_of(on)
    on.add_agent(
        "steady", f'command = [{json.dumps(sys.executable)}, "-c", {json.dumps(STEADY)}]\n'
    )
    status = settled(lambda: cluster.stream_status(SESSIONS, vhost), whole)
    assert whole(status) and status.leader is not None, status
    leader = cluster.index(status.leader)
    survivor = next(i for i in range(len(cluster.nodes)) if i != leader)
    urls = urls_from(cluster, vhost, survivor)
    urls.append(urls.pop(urls.index(vhost_url(cluster.nodes[leader], vhost))))
    given_every_node(on, urls)
    on.amqp_url = urls[0]

    began = time.monotonic()
    run = start(on, "run", "steady", "-v", stdout=subprocess.DEVNULL)
    timings: dict[str, float] = {}

    def restart() -> None:
        time.sleep(5)
        timings["stopping"] = time.monotonic() - began
        cluster.stop_node(leader)
        timings["stopped"] = time.monotonic() - began
        cluster.start_node(leader)
        timings["started"] = time.monotonic() - began

    restarting = threading.Thread(target=restart)
    restarting.start()
    try:
        code = run.wait(150)
    finally:
        restarting.join(150)
    ran = time.monotonic() - began
    err = run.stderr.read() if run.stderr else ""
    moved = cluster.stream_status(SESSIONS, vhost)
    assert code == 0, err
    (run_id,) = [r["run_id"] for r in on.json("runs", "steady")]
    record = _finished(on, run_id)  # `covey runs` does not show session_missing
    attach = on.covey("attach", run_id, "--json")
    assert attach.returncode == 0, attach.stderr
    events = [json.loads(line) for line in attach.stdout.splitlines()]
    lines = [e["text"] for e in events if e["kind"] == "line"]
    kinds = Counter(e["kind"] for e in events)
    print(
        f"TALLY cluster-session-leader-stop: run={ran:.1f}s "
        f"stop_at={timings.get('stopping', 0):.1f}s "
        f"stopped_at={timings.get('stopped', 0):.1f}s started_at={timings.get('started', 0):.1f}s "
        f"lines={len(lines)} duplicates={copies(lines)} kinds={dict(kinds)} "
        f"missing={record.get('session_missing')} leader={status.leader}->{moved.leader} "
        f"writer_failures={err.count('session events not published')} "
        f"writer_outage={_outage(err)}"
    )
    assert lines == [f"line {n}" for n in range(LINES)]
    assert events[-1]["kind"] == "closed" and "missing" not in kinds
    assert not record.get("session_missing"), record


def _outage(said: str) -> str:
    """How long the session writer went without a confirm, from what `covey run` said."""
    found = re.search(r"session events published again.*?after_seconds=(\S+)", said)
    return f"{found[1]}s" if found else "none"
