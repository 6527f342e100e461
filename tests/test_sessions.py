"""Sessions, the writing side: what `covey run` publishes to `covey.sessions` as its agent
runs, and the `session.*` control events. Real broker, real `covey run`; the stream is
read back with plain aio-pika (a consumer into an asyncio.Queue, never an iterator on a
stream), not with covey's own reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from conftest import World, covey_command, start
from faultkit import connections, cut, world_on
from pydantic_core import to_json
from test_security import as_user, credentials, secured  # noqa: F401 (a fixture)

from coordinator.localbroker import LocalBroker
from coordinator.session import (
    COUNT_HEADER,
    FIRST_SEQ_HEADER,
    IDS_PER_OFFSET,
    MAX_BATCH_EVENTS,
    RUN_HEADER,
    SESSION_TYPE,
    Pending,
    SessionBatch,
    SessionEvent,
    parse_batch,
)

Read = list[tuple[int, SessionEvent]]


async def read_session(
    url: str, run_id: str, first: int | str = "first", quiet: float = 3.0
) -> Read:
    """Every event of `run_id` in covey.sessions from offset `first`, up to its `closed`
    (or until the stream is quiet for `quiet` seconds), with its id: a message carries a
    batch of the run's events, the id is `offset * IDS_PER_OFFSET + index`."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        stream = await channel.declare_queue("covey.sessions", passive=True)
        deliveries: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        tag = await stream.consume(deliveries.put, arguments={"x-stream-offset": first})
        found: Read = []
        try:
            while True:
                try:
                    message = await asyncio.wait_for(deliveries.get(), quiet)
                except TimeoutError:
                    return found
                await message.ack()
                if (message.headers or {}).get(RUN_HEADER) != run_id:
                    continue
                assert message.type == SESSION_TYPE and message.content_type == "application/json"
                batch = [SessionEvent.model_validate(e) for e in json.loads(message.body)]
                assert 0 < len(batch) < IDS_PER_OFFSET
                assert message.headers[COUNT_HEADER] == len(batch)
                assert message.headers[FIRST_SEQ_HEADER] == batch[0].seq
                offset = int(message.headers["x-stream-offset"])  # type: ignore[arg-type]
                found.extend((offset * IDS_PER_OFFSET + i, e) for i, e in enumerate(batch))
                if batch[-1].kind == "closed":
                    return found
        finally:
            await stream.cancel(tag)


@contextlib.asynccontextmanager
async def control_events(url: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Collect `session.*` events on covey.events while the block runs (and a moment after)."""
    seen: list[dict[str, Any]] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind("covey.events", "session.#")

        async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.append({"key": message.routing_key, **json.loads(message.body)})

        await queue.consume(keep, no_ack=True)
        yield seen
        for _ in range(100):  # session.closed follows the run's end closely
            if any(e["kind"] == "session.closed" for e in seen):
                break
            await asyncio.sleep(0.1)


async def covey_run(world: World, *args: str, timeout: float = 120) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *covey_command(),
        "run",
        *args,
        env=world.env,
        cwd=world.home,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


async def stream_bodies(url: str, name: str) -> list[Any]:
    """The JSON bodies of every message in stream `name`, from its start."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        stream = await channel.declare_queue(name, passive=True)
        deliveries: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        tag = await stream.consume(deliveries.put, arguments={"x-stream-offset": "first"})
        found = []
        try:
            while True:
                try:
                    message = await asyncio.wait_for(deliveries.get(), 3)
                except TimeoutError:
                    return found
                await message.ack()
                found.append(json.loads(message.body))
        finally:
            await stream.cancel(tag)


def run_id_of(log_dir: Path) -> str:
    (log,) = log_dir.glob("*.log")
    return log.name.removesuffix(".log")


def assert_in_order(events: Read) -> None:
    offsets = [offset for offset, _ in events]
    assert offsets == sorted(set(offsets)), "ids must only grow"
    assert [e.seq for _, e in events] == list(range(len(events))), "consecutive seqs"


def test_a_run_publishes_its_session_in_order_and_announces_it(applied: World) -> None:
    world = applied
    world.add_agent(
        "talker",
        "command = \"echo one; echo two >&2; printf 'three\\\\n\\\\nfive'; exit 3\"\n",
    )

    async def scenario() -> tuple[Read, list[dict[str, Any]], str]:
        async with control_events(world.amqp_url) as seen:
            code, output = await covey_run(world, "talker")
            assert code != 0, output  # the agent failed: so does the run
        run_id = run_id_of(world.state_dir / "runs" / "talker")
        return await read_session(world.amqp_url, run_id), seen, run_id

    events, seen, run_id = asyncio.run(scenario())
    assert_in_order(events)
    kinds = [e.kind for _, e in events]
    assert kinds == ["opened", "line", "line", "line", "line", "line", "closed"]
    opened, closed = events[0][1], events[-1][1]
    assert opened.data is not None and opened.data["trigger"] == "manual"
    assert opened.data["command"][-1].startswith("echo one")
    assert [e.text for _, e in events[1:-1]] == ["one", "two", "three", "", "five"]
    assert closed.data == {"outcome": "failed", "exit_code": 3, "reason": None}
    assert {e.run_id for _, e in events} == {run_id} and {e.agent for _, e in events} == {"talker"}
    ats = [e.at for _, e in events]
    assert ats == sorted(ats)

    # The control channel: where the session is, from its first id.
    by_kind = {e["kind"]: e for e in seen}
    assert [e["key"] for e in seen] == ["session.opened.talker", "session.closed.talker"]
    for kind in ("session.opened", "session.closed"):
        event = by_kind[kind]
        assert event["run_id"] == run_id and event["stream"] == "covey.sessions"
        assert event["first_id"] == events[0][0], "first_id is the id of `opened`"
        assert datetime.fromisoformat(event["since"]) == opened.at
    assert by_kind["session.closed"]["outcome"] == "failed"
    assert "session_missing" not in by_kind["session.closed"]
    # The run's record (run.finished, kept in covey.runs) says where its session is too.
    (finished,) = [
        e
        for e in asyncio.run(stream_bodies(world.amqp_url, "covey.runs"))
        if e["kind"] == "run.finished" and e["run_id"] == run_id
    ]
    assert finished["stream"] == "covey.sessions" and finished["first_id"] == events[0][0]
    assert "session_missing" not in finished


def test_100000_lines_all_arrive_in_order(applied: World) -> None:
    world = applied
    world.add_agent("flood", "command = 'seq 1 100000'\nlock = 'none'\n")

    async def scenario() -> Read:
        code, output = await covey_run(world, "flood", timeout=300)
        assert code == 0, output
        run_id = run_id_of(world.state_dir / "runs" / "flood")
        return await read_session(world.amqp_url, run_id, quiet=10)

    events = asyncio.run(scenario())
    assert_in_order(events)
    assert [e.text for _, e in events[1:-1]] == [str(i) for i in range(1, 100_001)]
    assert events[-1][1].kind == "closed" and events[-1][1].data["outcome"] == "ok"  # type: ignore[index]


def test_a_batch_body_is_what_its_events_serialise_to() -> None:
    """SessionBatch.of builds its JSON from plain dicts, each moment formatted once: byte
    for byte what SessionEvent gives, for every moment, text and data alike."""
    first = datetime(2026, 12, 3, 6, 23, 40, 123456, tzinfo=UTC)
    second = datetime(2026, 12, 3, 6, 23, 41, tzinfo=UTC)  # no microseconds
    events: list[Pending] = [
        (0, "opened", first, "", {"command": ["x"], "trigger": "manual"}),
        (1, "line", first, "plain", None),
        (2, "line", second, 'quotes " \\ tab\t bell\x07 é ✓', None),
        (3, "line", first, "back to the first moment", None),
        (4, "progress", second, "half", {"fraction": 0.5}),
    ]
    batch = SessionBatch.of("20261203T062340-ab12cd", "scout", events)
    expected = [
        SessionEvent(
            run_id="20261203T062340-ab12cd",
            agent="scout",
            seq=seq,
            kind=kind,
            at=at,
            text=text,
            data=data,
        ).model_dump(mode="json", exclude_none=True)
        for seq, kind, at, text, data in events
    ]
    assert batch.body == to_json(expected)
    assert (batch.first_seq, batch.count, batch.at) == (0, 5, first)
    assert parse_batch(batch.body) == [SessionEvent.model_validate(e) for e in expected]


def test_a_run_that_never_starts_has_no_session(applied: World) -> None:
    world = applied
    flag = world.home / "started"
    world.add_agent("holder", f"command = 'touch {flag}; sleep 30'\n")
    world.add_agent("other", "command = 'echo never'\n")
    holding = start(world, "run", "holder")
    try:
        deadline = time.monotonic() + 30
        while not flag.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = world.covey("run", "other", "--skip-if-busy")
        assert result.returncode == 5, result.stdout + result.stderr
    finally:
        holding.send_signal(signal.SIGTERM)
        holding.wait(30)
    everything = asyncio.run(read_all(world.amqp_url))
    assert {agent for agent, _ in everything} == {"holder"}
    assert [kind for _, kind in everything][-1] == "closed"


async def read_all(url: str) -> list[tuple[str, str]]:
    """(agent, kind) of every event in covey.sessions (each message a batch of them)."""
    batches = await stream_bodies(url, "covey.sessions")
    return [(e["agent"], e["kind"]) for batch in batches for e in batch]


# -- a broker that blocks publishers ---------------------------------------------------

TIMED = """
import sys, time
n, out = int(sys.argv[1]), sys.argv[2]
started = time.monotonic()
for i in range(n):
    print(f"line {i}", flush=(i % 100 == 0))
    if i % 1000 == 0:
        time.sleep(0.02)  # some 0.4 s in all: the alarm comes on while it prints
with open(out, "w") as f:
    f.write(str(time.monotonic() - started))
"""


ALARM_SECONDS = 6.0


@pytest.fixture(scope="module")
def node() -> Iterator[LocalBroker]:
    with LocalBroker() as broker:
        yield broker


def test_a_memory_alarm_neither_slows_the_agent_nor_leaves_a_silent_gap(
    world: World, node: LocalBroker
) -> None:
    with world_on(node, world, "session-alarm") as on:
        script = on.home / "timed.py"
        script.write_text(TIMED)
        took = on.home / "took"
        on.add_agent("printer", f'command = ["{sys.executable}", "{script}", "20000", "{took}"]\n')
        on.ok("run", "printer")  # without an alarm
        calm = float(took.read_text())
        for log in (on.state_dir / "runs" / "printer").glob("*.log"):
            os.unlink(log)

        async def scenario() -> tuple[int, str]:
            running = asyncio.create_task(covey_run(on, "printer"))
            await asyncio.sleep(0.3)  # the agent has started
            node.ctl("set_vm_memory_high_watermark", "0")  # the broker blocks publishers
            try:
                await asyncio.sleep(ALARM_SECONDS)
            finally:
                node.ctl("set_vm_memory_high_watermark", "0.4")
            return await running

        code, output = asyncio.run(scenario())
        assert code == 0, output
        alarmed = float(took.read_text())
        # An agent held up by the alarm would take over ALARM_SECONDS: the bound is generous
        # for a busy machine and still well below that.
        assert alarmed < min(calm * 2 + 2.5, ALARM_SECONDS - 1), (calm, alarmed)
        log_dir = on.state_dir / "runs" / "printer"
        run_id = run_id_of(log_dir)
        logged = [
            line.split(" ", 1)[1] for line in (log_dir / f"{run_id}.log").read_text().splitlines()
        ]
        assert logged == [f"line {i}" for i in range(20000)]
        events = asyncio.run(read_session(on.amqp_url, run_id, quiet=10))
        assert_whole_or_announced(events, 20000)


def assert_whole_or_announced(events: Read, lines: int) -> None:
    """Every line in order, or the gaps named exactly by a `missing` event: no silent gap.
    (A batch published again after a lost confirm may repeat events: seqs tell.)"""
    seen: dict[int, SessionEvent] = {}
    for _, event in events:
        assert event.seq not in seen or seen[event.seq] == event
        seen[event.seq] = event
    assert events[-1][1].kind == "closed"
    missing: set[int] = set()
    for event in seen.values():
        if event.kind == "missing":
            assert event.data is not None
            for first, last in event.data["seqs"]:
                missing.update(range(first, last + 1))
    present = set(seen)
    last_seq = max(present)
    assert present | missing == set(range(last_seq + 1)), "a gap nobody announced"
    texts = [seen[s].text for s in sorted(present) if seen[s].kind == "line"]
    numbers = [int(t.split()[1]) for t in texts]
    assert numbers == sorted(numbers)
    if not missing:
        assert numbers == list(range(lines))


# -- a provisioned namespace ------------------------------------------------------------


def test_a_provisioned_run_publishes_its_session_for_anyone_to_read(
    secured: World,  # noqa: F811 (the fixture, from test_security)
) -> None:
    world = secured
    world.add_agent("echo", "command = 'echo provisioned'\n")
    world.ok("provision", "--host", "testhost")  # echo joined the roster
    result = world.covey("run", "echo", env=as_user(world, "supervisor.testhost"))
    assert result.returncode == 0, result.stderr
    assert "could not publish" not in result.stderr and "not published" not in result.stderr
    run_id = run_id_of(world.state_dir / "runs" / "echo")
    for reader in ("human.ada", "agent.scout"):  # people and agents attach
        events = asyncio.run(read_session(credentials(world, reader), run_id))
        assert [e.kind for _, e in events] == ["opened", "line", "closed"], reader
        assert events[1][1].text == "provisioned"

    # An agent publishes nothing to the broker's sessions: its events go through its run.
    async def forge() -> None:
        connection = await aio_pika.connect(credentials(world, "agent.scout"))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            sessions = await channel.get_exchange("covey.sessions", ensure=False)
            await sessions.publish(aio_pika.Message(b"{}"), "")

    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        asyncio.run(forge())


# -- the writer's connection lost mid-run (a private node) ---------------------------------

# Twenty lines every 10 ms, flushed: some 2,000 a second, so an outage of seconds is more
# than the pipe holds (64 KiB) and an agent whose run stopped reading would stall on it.
# It starts printing once `go` exists and, done, waits for `back`: the test decides when
# the outage begins and ends relative to the agent, however slowly rabbitmqctl answers.
STEADY = """
import os, sys, time
rounds, out, go, back = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
while not os.path.exists(go):
    time.sleep(0.05)
started = time.monotonic()
for r in range(rounds):
    print("\\n".join(f"line {r * 20 + i}" for i in range(20)), flush=True)
    time.sleep(0.01)
with open(out + ".tmp", "w") as f:
    f.write(str(time.monotonic() - started))
os.replace(out + ".tmp", out)
while not os.path.exists(back):
    time.sleep(0.05)
"""
WRITER = "covey session printer"  # the name its connection is given


@dataclass
class Steady:
    """The STEADY agent's files: when to start, how long its lines took, when to end."""

    go: Path
    took: Path
    back: Path

    def calm(self) -> None:
        self.go.touch()
        self.back.touch()

    def reset(self) -> None:
        for path in (self.go, self.took, self.back):
            path.unlink(missing_ok=True)

    async def printed(self) -> None:
        """Let it print, and wait until it has printed everything."""
        self.go.touch()
        deadline = time.monotonic() + 60
        while not self.took.exists():
            assert time.monotonic() < deadline, "the agent stalled"
            await asyncio.sleep(0.1)


def _steady_agent(world: World, rounds: int) -> Steady:
    script = world.home / "steady.py"
    script.write_text(STEADY)
    files = Steady(world.home / "go", world.home / "took", world.home / "back")
    argv = [sys.executable, str(script), str(rounds), str(files.took), str(files.go)]
    world.add_agent("printer", f"command = {json.dumps([*argv, str(files.back)])}\n")
    return files


def _logged(world: World, run_id: str) -> list[str]:
    log = world.state_dir / "runs" / "printer" / f"{run_id}.log"
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


def _fresh_log_dir(world: World) -> Path:
    log_dir = world.state_dir / "runs" / "printer"
    for log in log_dir.glob("*.log"):
        os.unlink(log)
    return log_dir


def _finished(world: World, run_id: str) -> dict[str, Any]:
    """The run's `run.finished` record."""
    (finished,) = [
        e
        for e in asyncio.run(stream_bodies(world.amqp_url, "covey.runs"))
        if e["kind"] == "run.finished" and e["run_id"] == run_id
    ]
    return finished  # type: ignore[no-any-return]


async def _writer_away(node: LocalBroker, vhost: str, until: Any) -> int:
    """Once the run's session writer has connected: the node accepts no new connection
    and the writer's is cut (the run's other connections, its lock's among them, stay);
    until `until()` is done, then connections are accepted again. Returns how many were
    cut."""
    deadline = time.monotonic() + 60
    while not any(
        n.startswith(WRITER) for _, n in await asyncio.to_thread(connections, node, vhost)
    ):
        assert time.monotonic() < deadline, "the run's session writer never connected"
        await asyncio.sleep(0.1)
    await asyncio.to_thread(node.ctl, "suspend_listeners")
    try:
        cuts = await asyncio.to_thread(cut, node, vhost, WRITER)
        await until()
    finally:
        await asyncio.to_thread(node.ctl, "resume_listeners")
    return cuts


def test_a_writer_cut_off_mid_run_catches_up_and_the_agent_never_waits(
    world: World, node: LocalBroker
) -> None:
    """Injected: the session writer's connection cut, and no reconnect possible, for as
    long as the agent prints 10,000 lines at some 2,000 a second (more than the pipe
    holds); then the broker is back while the run goes on. Asserted: the agent prints as
    fast as without the outage (it never waits for the broker), the run log has every
    line, and the session has every line in order: the writer kept them and caught up."""
    with world_on(node, world, "session-cut") as on:
        vhost = on.amqp_url.rsplit("/", 1)[1]
        rounds = 500  # 10,000 lines, some 5 s
        agent = _steady_agent(on, rounds)
        agent.calm()
        on.ok("run", "printer")
        calm = float(agent.took.read_text())
        agent.reset()
        log_dir = _fresh_log_dir(on)

        async def scenario() -> tuple[int, str, int]:
            running = asyncio.create_task(covey_run(on, "printer"))
            cuts = await _writer_away(node, vhost, agent.printed)
            agent.back.touch()
            code, output = await running
            return code, output, cuts

        code, output, cuts = asyncio.run(scenario())
        assert code == 0, output
        assert cuts == 1
        away = float(agent.took.read_text())
        run_id = run_id_of(log_dir)
        lines = rounds * 20
        assert _logged(on, run_id) == [f"line {i}" for i in range(lines)]
        events = asyncio.run(read_session(on.amqp_url, run_id, quiet=10))
        missing = [e for _, e in events if e.kind == "missing"]
        print(
            f"TALLY session-cut: calm={calm:.2f}s away={away:.2f}s events={len(events)} "
            f"missing={[e.data for e in missing]}"
        )
        # Every line printed while the writer was away: an agent that waited for it
        # would have stalled once the pipe was full, and never got this far.
        assert away < calm * 1.5 + 2.0, (calm, away)
        assert_whole_or_announced(events, lines)
        # The writer keeps what the agent prints while the broker is away (up to MAX_EVENTS,
        # MAX_BYTES) and publishes it once it is back: this session is whole.
        assert not missing, "a backlog of 10,000 lines is kept whole"
        shown = on.covey("attach", run_id, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines()[1:] == [
            *(f"line {i}" for i in range(lines)),
            f"[closed] run {run_id} of printer: ok (exit code 0)",
        ]


def test_a_writer_cut_off_at_the_end_names_what_it_lacks_and_attach_says_so(
    world: World, node: LocalBroker
) -> None:
    """Injected: the writer's connection cut, and none possible, from before the agent
    prints until the run has finished (its bounded close gives up). The run's other
    connections stay, so it ends and is recorded. Asserted: the run log has every line;
    the session has `opened` only, and `run.finished` names every other seq as
    session_missing (no silent gap); `covey attach` shows the missing notice and the
    outcome, and exits 0 rather than waiting for a `closed` that will never come."""
    with world_on(node, world, "session-end") as on:
        vhost = on.amqp_url.rsplit("/", 1)[1]
        rounds = 100  # 2,000 lines
        agent = _steady_agent(on, rounds)
        agent.back.touch()  # it ends once it has printed
        log_dir = _fresh_log_dir(on)

        async def scenario() -> tuple[int, str, int]:
            running = asyncio.create_task(covey_run(on, "printer"))

            async def finished() -> None:
                agent.go.touch()
                await asyncio.wait({running})

            cuts = await _writer_away(node, vhost, finished)
            code, output = await running
            return code, output, cuts

        began = time.monotonic()
        code, output, cuts = asyncio.run(scenario())
        took = time.monotonic() - began
        assert code == 0, output
        assert cuts == 1
        run_id = run_id_of(log_dir)
        lines = rounds * 20
        assert _logged(on, run_id) == [f"line {i}" for i in range(lines)]
        events = asyncio.run(read_session(on.amqp_url, run_id, quiet=5))
        named = _finished(on, run_id).get("session_missing")
        print(f"TALLY session-end: run={took:.1f}s published={len(events)} session_missing={named}")
        assert [e.kind for _, e in events] == ["opened"]
        last_seq = lines + 2  # `opened`, the lines, `missing`, `closed`
        assert named == [[1, last_seq]]
        began = time.monotonic()
        shown = on.covey("attach", run_id, timeout=45)
        attached = time.monotonic() - began
        print(f"TALLY session-end attach: {attached:.2f}s")
        assert shown.returncode == 0, shown.stderr
        # The notice from the run's record (the writer's own never reached the broker):
        # the record knows the host, not the log's path there.
        assert shown.stdout.splitlines()[1:] == [
            f"[missing] events (seq 1-{last_seq}) could not be published; "
            f"the run log on {socket.gethostname()} has every line",
            f"[closed] run {run_id} of printer: ok (exit code 0)",
        ]


def test_a_writer_cut_off_while_its_queue_overflows_names_the_oldest_it_dropped(
    world: World, node: LocalBroker
) -> None:
    """Injected: the writer's connection cut, none possible, while the agent prints more
    than the writer keeps in memory (MAX_EVENTS, MAX_BYTES); then the broker is back before
    the run ends. Asserted: the oldest unsent lines are dropped, one `missing` event names
    exactly those seqs before `closed`, the rest (the newest) is published in order, the
    run log has every line, and `covey attach` shows the notice where the gap is."""
    with world_on(node, world, "session-overflow") as on:
        vhost = on.amqp_url.rsplit("/", 1)[1]
        lines = 300_000  # some 62 MB queued at EVENT_BYTES each: over MAX_BYTES
        go, back = on.home / "go", on.home / "back"
        wait_for = "while [ ! -e {0} ]; do sleep 0.05; done"
        command = f"{wait_for.format(go)}; seq -f 'line %.0f' 1 {lines}; {wait_for.format(back)}"
        on.add_agent("printer", f"command = {json.dumps(command)}\n")
        log_dir = on.state_dir / "runs" / "printer"

        async def printed() -> None:
            go.touch()
            deadline = time.monotonic() + 60
            while len(_logged_lines(log_dir)) < lines:
                assert time.monotonic() < deadline, "the agent did not print in time"
                await asyncio.sleep(0.2)

        async def scenario() -> tuple[int, str, int]:
            running = asyncio.create_task(covey_run(on, "printer"))
            cuts = await _writer_away(node, vhost, printed)
            back.touch()
            code, output = await running
            return code, output, cuts

        code, output, cuts = asyncio.run(scenario())
        assert code == 0, output
        assert cuts == 1
        run_id = run_id_of(log_dir)
        assert _logged(on, run_id) == [f"line {n}" for n in range(1, lines + 1)]
        events = asyncio.run(read_session(on.amqp_url, run_id, quiet=10))
        notices = [e for _, e in events if e.kind == "missing"]
        print(
            f"TALLY session-overflow: published={len(events)} "
            f"missing={[n.data['seqs'] for n in notices if n.data]}"
        )
        assert_whole_or_announced(events, lines)
        (notice,) = notices
        assert notice.data is not None
        ((first, last),) = notice.data["seqs"]
        # Nothing was confirmed before the cut; the batch then in flight (at most
        # MAX_BATCH_EVENTS) is kept to be published again, and of the queue behind it the
        # oldest are dropped: the newest are kept.
        assert 1 <= first <= 1 + MAX_BATCH_EVENTS and first < last < lines, (first, last)
        kept = [*range(1, first), *range(last + 1, lines + 1)]
        kinds = [e.kind for _, e in events]
        assert kinds == ["opened", *["line"] * len(kept), "missing", "closed"], kinds[-3:]
        assert [e.text for _, e in events[1:-2]] == [f"line {n}" for n in kept]
        assert _finished(on, run_id)["session_missing"] == [[first, last]], "and in its record"
        shown = on.covey("attach", run_id, timeout=60)
        assert shown.returncode == 0, shown.stderr
        said = shown.stdout.splitlines()
        assert said[1 : 1 + len(kept)] == [f"line {n}" for n in kept]
        assert said[1 + len(kept) :] == [
            f"[missing] events (seq {first}-{last}) could not be published; "
            f"{log_dir / (run_id + '.log')} has every line",
            f"[closed] run {run_id} of printer: ok (exit code 0)",
        ]


def _logged_lines(log_dir: Path) -> list[str]:
    logs = list(log_dir.glob("*.log"))
    return logs[0].read_text().splitlines() if logs else []
