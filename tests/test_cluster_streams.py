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
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import World
from faultkit import copies, vhost_url, world_on
from test_cluster import cluster, settled, vhost_of
from test_cluster_mail import given_every_node

from coordinator.localbroker import LocalCluster
from coordinator.topology import CHANGELOG_STREAM, RUNS_STREAM, SESSIONS

pytestmark = pytest.mark.slow
__all__ = ["cluster"]  # the fixture (test_cluster.py: one cluster per module), used by name

STREAMS = (CHANGELOG_STREAM, RUNS_STREAM, SESSIONS)


@pytest.fixture
def single_replicas(world: World, cluster: LocalCluster) -> Iterator[World]:
    """The test's covey home with `replicas = 1`, on a vhost of its own, through node 0."""
    toml = world.home / "covey.toml"
    toml.write_text("replicas = 1\n" + toml.read_text())
    with world_on(cluster.nodes[0], world, "streams") as on:
        yield on


@pytest.mark.timeout(180)
def test_streams_are_read_through_another_node_when_the_first_has_no_replica(
    single_replicas: World, cluster: LocalCluster
) -> None:
    """`replicas = 1`: each stream lives on one node. covey given every node's URL, the
    nodes with no replica first (`amqp_order = "listed"`), reads all of the changelog
    (`covey log`), a digest and a run's session (`covey attach`) in full, and says nothing
    of the nodes that refused the consumer."""
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


PRINT_20 = "for n in range(20): print(f'line {n}', flush=True)"
