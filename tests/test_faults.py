"""Fault injection (issue #6): what covey does when RabbitMQ blocks publishers, restarts or
cuts connections, and when its own processes are killed at bad moments.

Anything that stops, restarts or cuts a broker does it to a private node (`node`),
never to the machine's own broker. Each test says what it injected, counts what was
sent, confirmed, delivered, duplicated and lost, asserts on those counts, and prints
them on one `TALLY` line (`pytest -s` shows it; a failure report always does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from conftest import Raw, World, start
from faultkit import (
    PATIENT_AGENT,
    Tally,
    assert_sends_whole,
    connections,
    copies,
    cut,
    group_members,
    kill_group,
    mailbox,
    mailbox_locked,
    mailbox_size,
    mark_all_done,
    running,
    send_all,
    send_until_confirmed,
    stop,
    tally_sends,
    world_on,
)

from coordinator.gateway import Gateway
from coordinator.localbroker import LocalBroker, free_port
from coordinator.lock import Holder, LockBusy, LockSession, LockSpec, slot_state


@pytest.fixture(scope="module")
def node() -> Iterator[LocalBroker]:
    with LocalBroker() as broker:
        yield broker


@pytest.fixture
def on_node(world: World, node: LocalBroker) -> Iterator[World]:
    """The test's covey home, pointed at a fresh vhost of its own on the private node."""
    with world_on(node, world, "fault") as on:
        yield on


def node_vhost(world: World) -> str:
    return world.amqp_url.rsplit("/", 1)[1]


@pytest.mark.slow
def test_a_memory_alarm_makes_send_exit_4_within_its_timeout(
    on_node: World, node: LocalBroker
) -> None:
    node.ctl("set_vm_memory_high_watermark", "0")  # injected: the broker blocks publishers
    try:
        started = time.monotonic()
        result = on_node.covey("send", "scout", "while blocked", "--timeout", "2")
        took = time.monotonic() - started
        assert result.returncode == 4, result.stdout + result.stderr
        assert "blocking publishers" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert took < 15  # bounded by its timeout (2 s), with room for a slow start
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")
    # Sent=1, confirmed=0: reported as failed. Once the alarm clears, mail flows again.
    on_node.ok("send", "scout", "after the alarm")
    assert "after the alarm" in [m["subject"] for m in on_node.json("inbox", "--as", "scout")]


# -- 1. a broker restart under a sender ------------------------------------------------


def restart(node: LocalBroker) -> None:
    node.stop()  # SIGTERM: the node shuts down, closing every connection
    node.start()  # the same ports and data directory


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_broker_restart_under_a_sender_loses_no_confirmed_message(
    on_node: World, node: LocalBroker
) -> None:
    """Injected: the private node is stopped (SIGTERM) and started again on the same ports
    and data while one `Covey` handle sends 5,000 messages to scout, one confirmed send at
    a time. A send that raises counts as failed and the message is sent again under a
    new attempt subject (`mNNNNN.A`), as a careful sender would.

    Asserted: every send either returned (confirmed) or raised BrokerUnavailable, none
    hung; every confirmed attempt is in scout's mailbox exactly once; nothing in the
    mailbox was never sent; every one of the 5,000 was confirmed in the end. A failed
    attempt may still have arrived (at-least-once from the sender's side): counted.
    """
    total, restart_at = 5000, 1500
    tally = Tally("broker-restart-under-sender")
    outcome: dict[str, str] = {}  # attempt subject -> "confirmed" | exception class | "hung"
    restarting: asyncio.Future[None] | None = None
    began = time.monotonic()
    try:
        async with on_node.open("human:ada") as ada:
            for n in range(total):
                if n == restart_at:
                    restarting = asyncio.ensure_future(asyncio.to_thread(restart, node))
                await send_until_confirmed(ada, "scout", n, outcome, 200)
            assert restarting is not None
            await restarting
        send_time = time.monotonic() - began

        async with on_node.open("agent:scout") as scout:
            while await scout.drain():
                pass
        raw = Raw(on_node.amqp_url)
        left, dead, unrouted = [
            await raw.count(q) for q in ("agent.scout", "covey.dead", "covey.unrouted")
        ]
    finally:
        if restarting is not None:
            await restarting  # never leave the module's node down for the next test
    subjects = [m.envelope.subject for m in mailbox(on_node.state_dir, on_node.amqp_url, "scout")]
    tally_sends(tally, outcome, subjects, dead)
    tally.notes.update(
        left_in_queue=left,
        unrouted=unrouted,
        send_seconds=round(send_time, 1),
    )
    tally.show()

    assert_sends_whole(outcome, subjects, total, "the restart")
    assert left == 0 and dead == 0 and unrouted == 0


# -- 2. kill -9 of a supervisor mid-run ---------------------------------------------------


def scout_drain(world: World) -> subprocess.Popen[str]:
    """`covey inbox --as scout --json` in the background, its (long) output discarded."""
    return start(world, "inbox", "--as", "scout", "--json", stdout=subprocess.DEVNULL)


def _start_supervisor(world: World) -> subprocess.Popen[str]:
    return start(world, "supervise", "--metrics-port", str(free_port()), stdout=subprocess.DEVNULL)


def _patient_agent(world: World, name: str) -> Path:
    """An agent that drains its mail, writes what it is to the returned file, then works
    for 300 s; run by the supervisor every second (never twice at once)."""
    script = world.home / "patient.py"
    script.write_text(PATIENT_AGENT)
    said = world.home / f"{name}.json"
    world.add_agent(
        name, f'command = ["python3", "{script}", "{said}"]\nschedule = "* * * * * */1"\n'
    )
    return said


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def _free_within(world: World, specs: list[LockSpec], since: float, bound: float) -> float:
    """Seconds from `since` until a fresh session took every lock in `specs` (then let go);
    fails past `bound`."""
    settings = world.open().settings
    async with await LockSession.open(
        settings, Holder.me("fault-probe", "probe", settings.host)
    ) as probe:
        for spec in specs:
            while True:
                try:
                    await probe.acquire(spec)
                    break
                except LockBusy:
                    assert time.monotonic() - since < bound, f"{spec.name} still held: {bound} s"
                    await asyncio.sleep(0.1)
    return time.monotonic() - since


async def _busy(world: World, spec: LockSpec) -> bool:
    settings = world.open().settings
    async with await LockSession.open(
        settings, Holder.me("fault-probe", "check", settings.host)
    ) as probe:
        try:
            await probe.acquire(spec)
        except LockBusy:
            return True
    return False


@pytest.mark.slow
async def test_kill_9_of_a_supervisor_mid_run_frees_the_lock_records_lost_and_keeps_mail(
    applied: World, raw: Raw
) -> None:
    """Injected: SIGKILL to `covey supervise` while its agent runs (after the agent
    drained the first 20 messages, with 20 more waiting in its queue).

    Asserted: the agent's own lock and the global lock are free within 5 s, the run is
    recorded `lost`, and the agent's mail is intact: all 40 in its mailbox exactly once,
    none left in the queue, none dead."""
    tally = Tally("kill-9-supervisor")
    said = _patient_agent(applied, "victim")
    sent: list[str] = []
    async with applied.open("human:ada") as ada:
        for n in range(20):
            sent.append((await ada.send("victim", f"before {n}")).id)
    supervisor = _start_supervisor(applied)
    agent: dict[str, Any] = {}
    try:
        _wait_for(said.exists, 60, "the agent to start and drain")
        agent = json.loads(said.read_text())
        assert agent["drain_exit"] == 0 and sorted(agent["drained"]) == sorted(sent)
        async with applied.open("human:ada") as ada:
            for n in range(20):
                sent.append((await ada.send("victim", f"during {n}")).id)
        specs = [LockSpec.for_agent("victim"), LockSpec("global")]
        assert all([await _busy(applied, spec) for spec in specs])  # held before the kill
        killed_at = time.monotonic()
        supervisor.kill()  # injected: SIGKILL, no goodbye
        supervisor.wait(30)
        freed_after = await _free_within(applied, specs, killed_at, bound=5.0)
        runs = applied.json("runs", "victim")
        inbox = applied.json("inbox", "--as", "victim", "--all")
    finally:
        stop(supervisor)
        if agent:
            kill_group(agent["pgid"])  # the orphan, if it outlived its supervisor
    ids = [m["id"] for m in inbox]
    dead = await raw.count("covey.dead")
    tally.sent = tally.confirmed = len(sent)
    tally.delivered, tally.duplicates = len(ids), copies(m["subject"] for m in inbox)
    tally.lost, tally.dead = len(set(sent) - set(ids)), dead
    tally.notes.update(
        lock_free_after_s=round(freed_after, 2),
        outcomes=[r["outcome"] for r in runs],
        left_in_queue=await raw.count("agent.victim"),
    )
    tally.show()
    assert freed_after < 5.0
    assert [r["outcome"] for r in runs] == ["lost"]
    assert sorted(ids) == sorted(sent) and tally.duplicates == 0 and tally.lost == 0
    assert tally.notes["left_in_queue"] == 0 and dead == 0


@pytest.mark.slow
def test_kill_9_of_a_supervisor_leaves_no_agent_process_running(applied: World) -> None:
    """Injected: SIGKILL to `covey supervise` while its agent (one process, in a process
    group of its own) runs. Asserted: within 10 s nothing of the agent's process group is
    left running: otherwise it works on without a lock, and the next run of the same
    agent may start beside it."""
    said = _patient_agent(applied, "orphan")
    supervisor = _start_supervisor(applied)
    agent: dict[str, Any] = {}
    try:
        _wait_for(said.exists, 60, "the agent to start")
        agent = json.loads(said.read_text())
        assert running(agent["pid"])
        supervisor.kill()  # injected
        supervisor.wait(30)
        deadline = time.monotonic() + 10
        while group_members(agent["pgid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = group_members(agent["pgid"])
        print(f"TALLY kill-9-supervisor-orphan: agent_pid={agent['pid']} left_running={left}")
        assert left == [], f"agent processes {left} outlived their supervisor by 10 s"
    finally:
        stop(supervisor)
        if agent:
            kill_group(agent["pgid"])


# -- 3. a drain killed at random points, 100 times ---------------------------------------


async def _settled_count(raw_channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await raw_channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_a_drain_killed_100_times_at_random_points_loses_and_repeats_nothing(
    applied: World, raw: Raw
) -> None:
    """Injected: `covey inbox --as scout --json` is SIGKILLed 100 times after a random delay
    (seeded), drawn from the whole life of a drain: from before it connects to well after
    it would have finished. Before every attempt scout's queue is topped up to 300
    messages, one in ten of them junk (not an envelope). Junk widens the window this test
    is after: a drain commits the good mail, then dead-letters the junk (one confirmed
    publish each), and only then acks, so a kill in that stretch leaves mail committed
    but not acked.

    Counted per attempt: killed or finished by itself; whether the mailbox grew; whether
    the kill landed between commit and ack (then mail is both in the mailbox and back in
    the queue, or junk both dead-lettered and back in the queue). Asserted after a final
    clean drain: every envelope sent is in the mailbox exactly once and nothing else is;
    the queue is empty; covey.dead holds only the junk (each at least once; a kill
    between dead-lettering and ack may leave two copies, by design) and nothing
    dead-lettered as `delivery-limit`: a message handed back more than `delivery_limit`
    (10) times by killed drains would be, and so be missing from the mailbox."""
    attempts, queued, seed = 100, 300, 6
    rng = random.Random(seed)
    tally = Tally("drain-killed-100-times")
    sent: list[str] = []
    junk: list[str] = []

    def timed(identity: str) -> float:
        begun = time.monotonic()
        applied.ok("inbox", "--as", identity, "--json")
        return time.monotonic() - begun

    connection = await aio_pika.connect(applied.amqp_url)
    kinds: Counter[str] = Counter()
    hits = unsettled = 0
    errors: list[str] = []
    began = time.monotonic()
    process: subprocess.Popen[str] | None = None
    try:
        channel = await connection.channel()
        exchange = await (await connection.channel(publisher_confirms=True)).get_exchange(
            "covey", ensure=False
        )

        async def top_up(participant: str, count: int, ids: list[str], junk: list[str]) -> None:
            valid = count - count // 10
            ids += await send_all(ada, participant, [f"m{len(ids) + k}" for k in range(valid)])
            for _ in range(count // 10):
                junk.append(f"junk-{participant}-{len(junk)}")
                body = b"\x00 not an envelope " + junk[-1].encode()
                await exchange.publish(
                    aio_pika.Message(body, message_id=junk[-1]), f"agent.{participant}"
                )

        async with applied.open("human:ada") as ada:
            # How long a drain lives, empty and with 300 to take, on this machine now.
            empty = timed("writer")
            await top_up("loner", queued, [], [])
            full = timed("loner")
            # Kill points from before it connects to after it would have finished; the top
            # of the range adapts to the machine's load so that about 1 in 5 drains finishes.
            low, high = 0.5 * empty, 1.25 * full
            lowest_high = highest_high = high
            excess = 0  # of mail counted twice: committed not acked, or dead-lettered twice

            for _ in range(attempts):
                missing = queued - await _settled_count(channel, "agent.scout")
                await top_up("scout", missing, sent, junk)
                # As an agent would: what it has read is done, so `inbox` lists the new.
                mark_all_done(applied.state_dir, applied.amqp_url, "scout")
                before = mailbox_size(applied.state_dir, applied.amqp_url, "scout")
                process = scout_drain(applied)
                try:
                    process.wait(rng.uniform(low, high))
                    kinds["finished"] += 1
                    if process.returncode != 0:
                        errors.append(process.stderr.read() if process.stderr else "")
                    high = max(low + 0.1, high * 0.9)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)  # injected
                    process.wait(30)
                    kinds["killed"] += 1
                    high *= 1.025
                lowest_high, highest_high = min(lowest_high, high), max(highest_high, high)
                # Once the broker has taken back what the dead drain held, every message
                # is in the mailbox or covey.dead, in the queue, or both.
                deadline = time.monotonic() + 10
                while True:
                    stored = mailbox_size(applied.state_dir, applied.amqp_url, "scout")
                    waiting = await _settled_count(channel, "agent.scout")
                    dead = await _settled_count(channel, "covey.dead")
                    now_excess = stored + waiting + dead - len(sent) - len(junk)
                    if now_excess >= 0 or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.02)
                unsettled += now_excess < 0
                hits += now_excess > excess  # new double counts: killed between commit and ack
                excess = now_excess
                kinds["mailbox_grew"] += stored > before
        process = None
        final = json.loads(applied.ok("inbox", "--as", "scout", "--json", "--all"))
        left = await _settled_count(channel, "agent.scout")
    finally:
        stop(process)
        await connection.close()
    ids = [m["id"] for m in final]
    letters = [x for x in applied.json("dead", "list") if x["routing_key"] == "agent.scout"]
    reasons = Counter(letter["reason"] for letter in letters)
    junk_dead = [x["id"] for x in letters if x["reason"] == "invalid"]
    tally.sent = tally.confirmed = len(sent)
    tally.delivered, tally.duplicates = len(ids), copies(m["subject"] for m in final)
    tally.lost = len(set(sent) - set(ids))
    tally.dead = len(letters) - len(junk_dead)  # dead but for being junk
    over_limit = {x["id"] for x in letters if x["reason"] == "delivery-limit"}
    tally.notes.update(
        **kinds,
        killed_between_commit_and_ack=hits,
        over_limit_filed_anyway=len(over_limit & set(ids)),
        over_limit_junk=len(over_limit & set(junk)),
        over_limit_not_in_mailbox=len(over_limit & set(sent) - set(ids)),
        unsettled=unsettled,
        junk_sent=len(junk),
        junk_dead=len(set(junk_dead)),
        junk_dead_copies=copies(junk_dead),
        dead_reasons=dict(reasons),
        drain_errors=len(errors),
        kill_window_s=f"{low:.2f}-({lowest_high:.2f}..{highest_high:.2f})",
        seed=seed,
        seconds=round(time.monotonic() - began, 1),
    )
    tally.show()
    assert kinds["killed"] >= attempts // 2, "most drains must actually be killed"
    assert hits >= 1, "no kill landed between commit and ack: the test missed its window"
    assert errors == [] and unsettled == 0
    assert tally.dead == 0, f"dead-lettered innocent mail: {dict(reasons)}"
    assert tally.lost == 0 and tally.duplicates == 0
    assert set(ids) == set(sent) and left == 0
    assert set(junk_dead) == set(junk)  # every piece of junk kept as invalid, none lost


@pytest.mark.slow
async def test_drains_that_cannot_write_their_mailbox_leave_the_mail_with_the_broker(
    applied: World, raw: Raw
) -> None:
    """Injected: 11 times in a row (one more than the default delivery limit, 10), a
    `covey inbox --as scout` starts while another writer holds the mailbox's write lock
    (a slow disk, a stuck process), and is SIGKILLed a second later. Nothing about
    scout's 50 messages is wrong.

    Asserted: no drain took the 50 while it could not commit them (a drain that dies
    holding deliveries hands them back, and on RabbitMQ 3.10 every hand-back counts
    towards the delivery limit); after a clean drain all 50 are in the mailbox, once
    each, and nothing is in covey.dead."""
    tally = Tally("drain-killed-while-mailbox-locked-11-times")
    limit = applied.open().settings.delivery_limit
    async with applied.open("human:ada") as ada:
        sent = await send_all(ada, "scout", [f"m{n}" for n in range(50)])
    left_with_broker = 0
    process: subprocess.Popen[str] | None = None
    try:
        for _ in range(limit + 1):
            with mailbox_locked(applied.state_dir, applied.amqp_url, "scout"):
                process = scout_drain(applied)
                await asyncio.sleep(1.5)  # started, connected, and waiting for the lock
                left_with_broker += await raw.count("agent.scout") == len(sent)
                process.send_signal(signal.SIGKILL)  # injected
                process.wait(30)
        process = None
        final = json.loads(applied.ok("inbox", "--as", "scout", "--json", "--all"))
    finally:
        stop(process)
    ids = [m["id"] for m in final]
    letters = applied.json("dead", "list")
    reasons = Counter(x["reason"] for x in letters)
    tally.sent = tally.confirmed = len(sent)
    tally.delivered, tally.duplicates = len(ids), copies(m["subject"] for m in final)
    tally.lost = len(set(sent) - set(ids))
    tally.dead = len(letters)
    tally.notes.update(kills=limit + 1, left_with_broker=left_with_broker, dead=dict(reasons))
    tally.show()
    assert left_with_broker == limit + 1  # no killed drain held any of them
    assert tally.dead == 0, f"innocent mail dead-lettered: {dict(reasons)}"
    assert sorted(ids) == sorted(sent) and tally.duplicates == 0


# -- 4. a message that fails every time, and the mail behind it -------------------------


async def test_a_message_failing_every_time_goes_dead_and_the_mail_behind_it_flows(
    applied: World, raw: Raw
) -> None:
    """Injected: a consumer that takes scout's poison message and hands it back
    (reject, requeue) every time, 11 times: one more than the default delivery limit
    (10). 10 messages wait behind it from the start; 10 more arrive meanwhile.

    Asserted: each of the 11 failures was the poison (the mail behind it was never
    touched), the poison is in covey.dead as `delivery-limit`, and all 20 messages
    behind it reach scout's mailbox, once each."""
    tally = Tally("poison-at-the-head")
    limit = applied.open().settings.delivery_limit
    assert limit == 10  # the default this test is about
    async with applied.open("human:ada") as ada:
        poison = (await ada.send("scout", "poison")).id
        behind = [(await ada.send("scout", f"behind {n}")).id for n in range(10)]
        failures = []
        connection = await aio_pika.connect(applied.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("agent.scout", passive=True)
            for n in range(limit + 1):
                taken = await queue.get(timeout=5)
                failures.append(taken.message_id)
                await taken.reject(requeue=True)  # injected: the consumer failed on it
                if n == limit // 2:
                    behind += [(await ada.send("scout", f"meanwhile {k}")).id for k in range(10)]
    inbox = applied.json("inbox", "--as", "scout", "--all")
    ids = [m["id"] for m in inbox]
    letters = applied.json("dead", "list")
    tally.sent = tally.confirmed = 1 + len(behind)
    tally.delivered, tally.duplicates = len(ids), copies(m["subject"] for m in inbox)
    tally.lost = len(set(behind) - set(ids))
    tally.dead = len(letters)
    tally.notes.update(failures=len(failures), dead_reasons=[x["reason"] for x in letters])
    tally.show()
    assert failures == [poison] * (limit + 1)
    assert [(x["id"], x["reason"]) for x in letters] == [(poison, "delivery-limit")]
    assert sorted(ids) == sorted(behind) and tally.duplicates == 0
    assert await raw.count("agent.scout") == 0


# -- 5. connections cut mid-drain and mid-lock -------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_connection_cut_mid_drain_loses_and_repeats_nothing(
    on_node: World, node: LocalBroker
) -> None:
    """Injected: `rabbitmqctl close_connection` on the connection of a running
    `covey inbox --as scout` draining 6,000 messages of ~20 KB, once part of them is
    filed. Then a second, clean drain.

    Asserted: the cut drain exits 4 (lost RabbitMQ) with part of the mail filed; after
    the second drain every message is in the mailbox exactly once, nothing is left in
    the queue, nothing is dead. (What the cut drain had committed but not acked is both
    filed and back in the queue, and must not show twice.)"""
    # ~20 KB each: a drain of several seconds, long enough to cut into even when the cut
    # itself (rabbitmqctl: an Erlang VM's start) takes seconds on a loaded machine; with
    # 6,000, a CI run at load 12 saw the drain end before the cut landed.
    total = 12000
    tally = Tally("cut-mid-drain")
    body = "lorem ipsum dolor sit amet consectetur " * 500
    vhost, state, url = node_vhost(on_node), on_node.state_dir, on_node.amqp_url
    raw = Raw(url)
    async with on_node.open("human:ada") as ada:
        sent = await send_all(ada, "scout", [f"m{n}" for n in range(total)], body)
    draining = scout_drain(on_node)
    cuts, filed_at_cut = 0, 0
    try:
        deadline = time.monotonic() + 30
        pids: list[str] = []
        while not pids and draining.poll() is None:  # its connection, found beforehand
            assert time.monotonic() < deadline, "the drain never connected"
            pids = [p for p, name in connections(node, vhost) if name == "covey agent:scout"]
        for _ in range(3000):  # until it has filed some
            if mailbox_size(state, url, "scout") or draining.poll() is not None:
                break
            await asyncio.sleep(0.01)
        filed_at_cut = mailbox_size(state, url, "scout")
        for pid in pids:
            with contextlib.suppress(subprocess.CalledProcessError):
                node.ctl("close_connection", pid, "cut by a covey fault test")
                cuts += 1
        _, err = draining.communicate(timeout=60)
    finally:
        stop(draining)
    filed = mailbox_size(state, url, "scout")
    twice = filed + await raw.count("agent.scout") - total  # filed, and back in the queue
    final = json.loads(on_node.ok("inbox", "--as", "scout", "--json", "--all"))
    ids = [m["id"] for m in final]
    tally.sent = tally.confirmed = len(sent)
    tally.delivered, tally.duplicates = len(ids), copies(m["subject"] for m in final)
    tally.lost = len(set(sent) - set(ids))
    tally.dead = await raw.count("covey.dead")
    tally.notes.update(
        cuts=cuts,
        filed_at_cut=filed_at_cut,
        filed_before_exit=filed,
        filed_and_requeued=twice,
        exit=draining.returncode,
    )
    tally.show()
    assert cuts == 1 and 0 < filed_at_cut < total, "the drain ended before the cut"
    assert draining.returncode == 4 and "lost RabbitMQ" in err, err
    assert 0 < filed < total
    assert sorted(ids) == sorted(sent) and tally.duplicates == 0 and tally.lost == 0
    assert tally.dead == 0 and await raw.count("agent.scout") == 0


@pytest.mark.slow
async def test_a_lock_holder_whose_connection_is_cut_learns_it_lost_the_lock(
    on_node: World, node: LocalBroker
) -> None:
    """Injected: `rabbitmqctl close_connection` on a LockSession's connection while it
    holds the global lock.

    Asserted: before the cut another session cannot take the lock; after it the holder's
    `lost` event is set within 15 s, and another session takes the lock at once."""
    settings = on_node.open().settings
    spec = LockSpec("global")
    holder = await LockSession.open(settings, Holder.me("scout", "fault-holder", settings.host))
    try:
        await holder.acquire(spec)
        assert await _busy(on_node, spec)  # really held
        cuts = await asyncio.to_thread(
            cut, node, node_vhost(on_node), "covey lock scout fault-holder"
        )
        cut_at = time.monotonic()
        await asyncio.wait_for(holder.lost.wait(), 15)
        noticed = time.monotonic() - cut_at
        async with await LockSession.open(
            settings, Holder.me("writer", "next", settings.host)
        ) as other:
            taken = await other.acquire(spec, wait=5)
            async with await Gateway.connect(settings, "looker") as looker:
                held, by = await slot_state(looker, spec.queues[0])
    finally:
        await holder.close()
    print(
        f"TALLY cut-mid-lock: holders=1 cuts={cuts} lost_noticed_after_s={noticed:.2f} "
        f"retaken_by={taken.holder.agent}"
    )
    assert cuts == 1
    assert held and by is not None and by.agent == "writer"


@pytest.mark.slow
async def test_concurrent_sends_on_one_handle_share_one_connection_even_after_a_cut(
    on_node: World, node: LocalBroker
) -> None:
    """Injected: `rabbitmqctl close_all_connections` on the test's vhost, cutting a `Covey`
    handle's connection(s) between two bursts of 50 concurrent sends on that handle (the
    first burst is the handle's first use).

    Asserted: every send of both bursts is confirmed and delivered once; the handle
    holds one connection after each burst (a connect or reconnect opens one, not one per
    concurrent caller); once closed it leaves no connection behind on the broker."""
    tally = Tally("cut-between-concurrent-sends")
    vhost = node_vhost(on_node)

    def open_as_ada() -> int:
        return sum(1 for _, name in connections(node, vhost) if name == "covey human:ada")

    async def burst(prefix: str) -> list[str | BaseException]:
        sending = (ada.send("scout", f"{prefix}{n}") for n in range(50))
        done = await asyncio.gather(*sending, return_exceptions=True)
        return [x if isinstance(x, BaseException) else x.id for x in done]

    async with on_node.open("human:ada") as ada:
        outcomes = await burst("a")
        after_first_use = await asyncio.to_thread(open_as_ada)
        # Injected: every connection to the test's vhost (ada's only) cut at once.
        await asyncio.to_thread(node.ctl, "close_all_connections", "-p", vhost, "cut by a test")
        cut_left = await asyncio.to_thread(open_as_ada)
        outcomes += await burst("b")
        after_reconnect = await asyncio.to_thread(open_as_ada)
    for _ in range(10):  # the broker lets go of a closed connection within moments
        if not (after_close := await asyncio.to_thread(open_as_ada)):
            break
        await asyncio.sleep(0.5)
    sent = [x for x in outcomes if isinstance(x, str)]
    failed = [type(x).__name__ for x in outcomes if isinstance(x, BaseException)]
    async with on_node.open("agent:scout") as scout:
        drained = await scout.drain()
    ids = [e.id for e in drained]
    tally.sent, tally.confirmed, tally.failed = len(outcomes), len(sent), len(failed)
    tally.delivered, tally.duplicates = len(ids), copies(e.subject for e in drained)
    tally.lost = len(set(sent) - set(ids))
    tally.notes.update(
        connections_after_first_use=after_first_use,
        connections_after_reconnect=after_reconnect,
        connections_after_close=after_close,
    )
    tally.show()
    assert cut_left == 0 and failed == []
    assert tally.lost == 0 and tally.duplicates == 0 and len(ids) == 100
    assert after_first_use == 1, f"{after_first_use} connections for one handle"
    assert after_reconnect == 1, f"{after_reconnect} connections for one handle after the cut"
    assert after_close == 0, f"{after_close} connections left open after the handle closed"


@pytest.mark.slow
async def test_a_private_node_reports_the_memory_and_cpu_its_processes_use(
    node: LocalBroker,
) -> None:
    """The bench's figure 16 reads these: a running node holds tens of megabytes
    resident, and its CPU time grows while it takes a thousand confirmed messages."""
    assert node.rss_bytes() > 30 * 2**20
    before = node.cpu_seconds()
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("", exclusive=True)
        for _ in range(10):
            message = aio_pika.Message(b"x" * 512, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await asyncio.gather(
                *(channel.default_exchange.publish(message, queue.name) for _ in range(100))
            )
    assert node.cpu_seconds() > before
