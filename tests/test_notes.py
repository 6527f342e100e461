"""Notes (changelog cursors, lock holder and fence notes) are quorum queues (issue #16):
they outlive the node that led them, a write is never lost to a reader's peek, reads
never wear a note out, and a classic note from before keeps working as it is.

The cluster test has its own three-node LocalCluster (private nodes on free loopback
ports, never the machine's broker); the others run on the machine's broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import quote

import aio_pika
import pytest
from conftest import Broker, World
from faultkit import vhost_url, world_on
from yarl import URL

from coordinator.changelog import CURSOR_PREFIX
from coordinator.gateway import NOTE_VERSION_HEADER, Gateway
from coordinator.localbroker import LocalBroker, LocalCluster
from coordinator.lock import Holder
from coordinator.settings import Settings

WORKER = 'command = "cat \\"$COVEY_DIGEST_FILE\\" > digest-$COVEY_FENCING_TOKEN.txt"\n'
LEGACY_NOTE = {"x-max-length": 1, "x-overflow": "drop-head"}  # how notes were declared
HOLDER = "covey.lock.agent.worker.holder"
CURSOR = CURSOR_PREFIX + "worker"


def queue_types(broker: Broker, world: World) -> dict[str, str]:
    vhost = quote(URL(world.amqp_url).path.lstrip("/"), safe="")
    queues = broker.admin.api.call("GET", f"queues/{vhost}")  # type: ignore[attr-defined]
    return {q["name"]: q["type"] for q in queues}


async def test_a_write_during_a_peek_wins_and_a_thousand_reads_keep_the_note(
    amqp_url: str, applied: World
) -> None:
    """A reader has the note out when a new one is written, and puts the old one back
    afterwards: the new one is what is read (on a quorum queue with x-max-length 1 the
    old one came back and the new one was gone). Then 1,000 reads, each a delivery the
    quorum queue counts, leave the note in place, one copy of it."""
    async with await Gateway.connect(Settings(amqp_url=amqp_url)) as gateway:
        await gateway.write_note("covey.cursor.peeked", b"old", 1)
        reader = await aio_pika.connect(amqp_url)
        async with reader:
            channel = await reader.channel()
            note = await channel.declare_queue("covey.cursor.peeked", passive=True)
            held = await note.get(no_ack=False)
            assert held.body == b"old"
            await gateway.write_note("covey.cursor.peeked", b"new", 2)
            await held.reject(requeue=True)
        assert await gateway.read_note("covey.cursor.peeked") == b"new"
        began = time.monotonic()
        for _ in range(1000):
            assert await gateway.read_note("covey.cursor.peeked") == b"new"
        took = time.monotonic() - began
        print(f"NOTES 1000 reads of one quorum note in {took:.2f} s")
        inspector = await aio_pika.connect(amqp_url)
        async with inspector:
            channel = await inspector.channel()
            note = await channel.declare_queue("covey.cursor.peeked", passive=True)
            assert note.declaration_result.message_count == 1  # the old copy was dropped
            last = await note.get(no_ack=False)
            assert last.headers[NOTE_VERSION_HEADER] == 2
            assert int(last.headers["x-delivery-count"]) >= 1000  # every read counted
            await last.reject(requeue=True)


async def test_an_old_classic_note_keeps_working_after_the_upgrade(
    broker: Broker, applied: World, amqp_url: str
) -> None:
    """Notes made before (classic queues of one message, no version) are kept as they
    are: the next holder's fencing token follows the old holder note's, the old cursor
    is where the digest starts and is moved, and both stay classic."""
    world = applied
    folder = world.add_agent("worker", WORKER)
    world.ok("log", "add", "seen-before")
    seen = world.json("log")[0]["offset"]
    world.ok("log", "add", "news-after")
    legacy_holder = Holder(
        agent="worker", run_id="r0", host="h", pid=1, since="2026-01-01T00:00:00Z", token=5
    ).model_copy(update={"released": True})
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        notes = await channel.get_exchange("covey.notes", ensure=False)
        for name, body in (
            (HOLDER, legacy_holder.model_dump_json().encode()),
            (CURSOR, f'{{"offset": {seen}}}'.encode()),
        ):
            queue = await channel.declare_queue(name, durable=True, arguments=LEGACY_NOTE)
            await queue.bind(notes, name)
            await notes.publish(aio_pika.Message(body, delivery_mode=2), name)

    world.ok("run", "worker")
    digest = (folder / "digest-6.txt").read_text()  # token 5 was the old note's
    assert "news-after" in digest and "seen-before" not in digest
    world.ok("log", "add", "news-later")
    world.ok("run", "worker")
    later = (folder / "digest-7.txt").read_text()
    assert "news-later" in later and "news-after" not in later  # the old cursor moved
    types = queue_types(broker, world)
    assert types[HOLDER] == "classic" and types[CURSOR] == "classic"
    assert types["covey.lock.agent.worker.fence"] == "quorum"  # new notes are quorum


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if not LocalBroker.available():
        pytest.skip("needs the rabbitmq-server package, for private nodes")
    with LocalCluster() as started:
        yield started


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_notes_outlive_the_node_that_leads_them(world: World, cluster: LocalCluster) -> None:
    """A run through node 0 writes worker's cursor and its lock's holder and fence
    notes; the node that leads the cursor is stopped; through another node the digest
    reads the cursor, and a run takes the lock with the next fencing token and moves the
    cursor, within seconds."""
    folder = world.add_agent("worker", WORKER)
    with world_on(cluster.nodes[0], world, "notes") as on:
        vhost = on.amqp_url.rsplit("/", 1)[1]
        on.ok("log", "add", "first-news")
        on.ok("run", "worker")
        assert "first-news" in (folder / "digest-1.txt").read_text()
        status = cluster.quorum_status(CURSOR, vhost)
        assert len(status.members) == 3 and status.leader is not None, status
        stopped = cluster.index(status.leader)
        # Left down: this file's cluster serves this test alone and goes with it (a
        # restart under load takes a minute). world_on then deletes the vhost through
        # node 0, or says nothing if node 0 is the one down.
        cluster.stop_node(stopped)
        survivor = next(i for i in range(len(cluster.nodes)) if i != stopped)
        on.amqp_url = vhost_url(cluster.nodes[survivor], vhost)
        began = time.monotonic()
        digest = on.covey("digest", "worker")
        read_took = time.monotonic() - began
        assert digest.returncode == 0, digest.stderr
        assert "first-news" not in digest.stdout  # the cursor was read, past it
        on.ok("log", "add", "second-news")
        began = time.monotonic()
        on.ok("run", "worker")
        run_took = time.monotonic() - began
        second = (folder / "digest-2.txt").read_text()  # token 1 was read from the fence
        assert "second-news" in second and "first-news" not in second
        print(
            f"NOTES leader {status.leader} stopped: digest read in {read_took:.1f} s, "
            f"run (lock notes, cursor moved) in {run_took:.1f} s"
        )
        assert read_took < 20 and run_took < 30  # was: BrokerUnavailable after 10 s
        assert "second-news" not in on.ok("digest", "worker")  # the cursor moved
