"""Notes (changelog cursors, lock holder and fence notes) are quorum queues (issue #16),
so that they outlive the node that led them (tests/test_cluster_runs.py stops it): a
write is never lost to a reader's peek, reads never wear a note out, someone showing who
holds a lock never hides the last fencing token from its next holder, a note nobody reads
stays small, and a classic note from before keeps working as it is.
"""

from __future__ import annotations

import time

import aio_pika
from conftest import Broker, World
from yarl import URL

from coordinator.changelog import CURSOR_PREFIX
from coordinator.gateway import NOTE_COPIES, NOTE_VERSION_HEADER, Gateway
from coordinator.lock import Holder, LockSession, LockSpec
from coordinator.settings import Settings

WORKER = 'command = "cat \\"$COVEY_DIGEST_FILE\\" > digest-$COVEY_FENCING_TOKEN.txt"\n'
LEGACY_NOTE = {"x-max-length": 1, "x-overflow": "drop-head"}  # how notes were declared
HOLDER = "covey.lock.agent.worker.holder"
CURSOR = CURSOR_PREFIX + "worker"


def queue_types(broker: Broker, world: World) -> dict[str, str]:
    return broker.admin.queue_types(URL(world.amqp_url).path.lstrip("/"))


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


async def ready(amqp_url: str, queue: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        note = await channel.declare_queue(queue, passive=True)
        return note.declaration_result.message_count or 0


async def test_someone_showing_the_holder_hides_no_fencing_token(amqp_url: str) -> None:
    """A reader (`covey status`, the page) has every copy of the slot's holder note out
    while the next holder takes the lock: the token still follows the last one, at
    once, and the release it missed is not mistaken for a crash (no lease wait)."""
    settings = Settings(amqp_url=amqp_url)
    spec = LockSpec("shown")
    for run in ("r1", "r2"):
        async with await LockSession.open(settings, Holder.me("worker", run, "h")) as session:
            await session.acquire(spec)
    reader = await aio_pika.connect(amqp_url)
    async with reader:
        channel = await reader.channel()
        holder = await channel.declare_queue("covey.lock.shown.holder", passive=True)
        out = []
        while (copy := await holder.get(no_ack=False, fail=False)) is not None:
            out.append(copy)
        assert max(c.headers[NOTE_VERSION_HEADER] for c in out) == 2 * 2 + 1  # r2 released
        began = time.monotonic()
        async with await LockSession.open(settings, Holder.me("worker", "r3", "h")) as session:
            held = await session.acquire(spec)
        took = time.monotonic() - began
        assert held.token == 3 and not held.takeover, held
        assert took < 5, f"the take waited {took:.1f} s"  # not NOTE_PATIENCE
        for copy in out:
            await copy.reject(requeue=True)
    async with await Gateway.connect(settings) as gateway:
        shown = await gateway.read_note("covey.lock.shown.holder")
    assert shown is not None and Holder.model_validate_json(shown).run_id == "r3"


async def test_notes_nobody_reads_stay_small(amqp_url: str) -> None:
    """Twenty takes and releases with nobody looking: the fence holds the last take's
    copies only (each take drops what it read), the holder note at most NOTE_COPIES."""
    settings = Settings(amqp_url=amqp_url)
    for run in range(20):
        async with await LockSession.open(settings, Holder.me("worker", f"r{run}", "h")) as session:
            held = await session.acquire(LockSpec("busy"))
    assert held.token == 20
    assert await ready(amqp_url, "covey.lock.busy.fence") == 2  # r19's take and release
    assert await ready(amqp_url, "covey.lock.busy.holder") == NOTE_COPIES


async def test_a_lock_in_an_empty_namespace_makes_its_notes(amqp_url: str) -> None:
    """Nothing declared, not even the notes exchange: the first take's two note writes
    are refused together (the channel closes), and both notes are made; the second take
    reads the first's token from the fence."""
    settings = Settings(amqp_url=amqp_url)
    tokens = []
    for run in ("r1", "r2"):
        async with await LockSession.open(settings, Holder.me("worker", run, "h")) as session:
            tokens.append((await session.acquire(LockSpec("fresh"))).token)
    assert tokens == [1, 2]
    assert await ready(amqp_url, "covey.lock.fresh.fence") == 2
    async with await Gateway.connect(settings) as gateway:
        shown = await gateway.read_note("covey.lock.fresh.holder")
    assert shown is not None and Holder.model_validate_json(shown).released
