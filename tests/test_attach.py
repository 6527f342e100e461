"""Reading sessions back (issue #13): `covey attach`, `covey sessions`, and the Python API.

Until `covey run` publishes sessions itself, a `FakeRun` here writes what a run's writer
would, exactly as the design says: batches of `SessionEvent`s to the `covey.sessions`
exchange, one message a batch (persistent, type covey.session.v1, the run in the
`x-covey-run` header, its first seq and count in two more, a JSON array body), the
`session.opened`/`session.closed` control events, and the run's `run.started` and
`run.finished` records. Everything else is real: the broker, the `covey` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import aio_pika
import aiormq
import pytest
from conftest import World, start
from faultkit import HoldingProxy, cut, stop, world_on
from yarl import URL

from coordinator import session_reader
from coordinator.client import Covey
from coordinator.errors import BrokerUnavailable
from coordinator.events import EVENT_TYPE, Event
from coordinator.gateway import Gateway
from coordinator.localbroker import LocalBroker
from coordinator.runner import new_run_id
from coordinator.session import (
    COUNT_HEADER,
    FIRST_SEQ_HEADER,
    IDS_PER_OFFSET,
    RUN_HEADER,
    SESSION_TYPE,
    STREAM,
    SessionEvent,
)
from coordinator.settings import Settings
from coordinator.topology import EVENTS_EXCHANGE


class FakeRun:
    """Publishes one run's session as its writer would, on a connection of its own."""

    def __init__(self, url: str, agent: str = "scout") -> None:
        self.url, self.agent, self.run_id = url, agent, new_run_id()
        self.seq = 0
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.last_batch: list[SessionEvent] = []  # to publish again, as after a lost confirm

    async def __aenter__(self) -> FakeRun:
        await self.connect()
        return self

    async def connect(self) -> None:
        """Open its connection; again after the broker dropped it, as a writer reconnects."""
        self.connection = await aio_pika.connect(
            self.url, client_properties={"connection_name": f"fake run {self.run_id}"}
        )
        self.channel = await self.connection.channel(publisher_confirms=True)

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.connection is not None
        await self.connection.close()

    async def emit(self, kind: str, text: str = "", data: dict[str, Any] | None = None) -> None:
        await self.emit_many([(kind, text, data)])

    async def emit_many(self, events: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        """Publish a batch as one message, and await its confirm (as the writer does)."""
        batch = []
        for kind, text, data in events:
            event = SessionEvent(
                run_id=self.run_id, agent=self.agent, seq=self.seq, kind=kind, text=text, data=data
            )  # type: ignore[arg-type]
            self.seq += 1
            batch.append(event)
        await self.publish(batch)

    async def publish(self, batch: list[SessionEvent]) -> None:
        assert self.channel is not None
        exchange = await self.channel.get_exchange(STREAM, ensure=False)
        first_seq, count = batch[0].seq, len(batch)
        headers = {RUN_HEADER: self.run_id, FIRST_SEQ_HEADER: first_seq, COUNT_HEADER: count}
        message = aio_pika.Message(
            json.dumps([e.model_dump(mode="json") for e in batch]).encode(),
            content_type="application/json",
            type=SESSION_TYPE,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, "")
        self.last_batch = batch

    async def publish_again(self) -> None:
        """The last batch once more: its confirm was lost, so the writer sends it again."""
        await self.publish(self.last_batch)

    async def lines(self, texts: list[str]) -> None:
        await self.emit_many([("line", t, None) for t in texts])

    async def control(self, kind: str, **fields: Any) -> None:
        assert self.channel is not None
        event = Event(kind=kind, host="test", agent=self.agent, run_id=self.run_id, **fields)  # type: ignore[arg-type]
        exchange = await self.channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
        message = aio_pika.Message(
            event.model_dump_json(exclude_none=True).encode(),
            content_type="application/json",
            type=EVENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, event.routing_key)

    async def open(self) -> None:
        await self.control("run.started", trigger="manual")
        await self.emit("opened", data={"command": ["python", "agent.py"], "trigger": "manual"})
        await self.control("session.opened", stream=STREAM, first_id=None)

    async def close(self, outcome: str = "ok", exit_code: int = 0) -> None:
        data = {"outcome": outcome, "exit_code": exit_code, "reason": None}
        await self.emit("closed", data=data)
        await self.control("session.closed", stream=STREAM, first_id=None)
        await self.control("run.finished", outcome=outcome, exit_code=exit_code)


class Output:
    """A background process's stdout, read line by line as it comes (with when)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def texts(self) -> list[str]:
        return [text for _, text in self.lines]

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> float:
        """Wait until a line satisfies `predicate`; return when it was read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, text in list(self.lines):
                if predicate(text):
                    return at
            if self.process.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.01)
        raise AssertionError(f"no such line within {timeout} s; got {self.texts()[-20:]}")

    def finish(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout)
        self._thread.join(10)
        return code


def ids_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# -- after the run, and during it ----------------------------------------------------------


async def test_attach_after_a_run_shows_everything_once_in_order(applied: World) -> None:
    async with FakeRun(applied.amqp_url) as run, FakeRun(applied.amqp_url, "writer") as other:
        await run.open()
        await other.open()
        await run.lines(["one", "two"])
        await other.lines(["not scout's"])
        await run.emit("progress", "halfway", {"fraction": 0.4})
        await run.emit_many([("token", "Hel", None), ("token", "lo", None)])
        await run.emit("tool", "grep: 3 matches")
        await run.lines(["red \x1b[31mALERT\x1b[0m\rover"])
        await run.emit("status", "thinking")
        await run.emit("result", "42")
        await other.lines(["still not scout's"])
        await run.close("ok", 0)
    result = await asyncio.to_thread(applied.covey, "attach", run.run_id)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"[opened] run {run.run_id} of scout")
    assert lines[1:] == [
        "one",
        "two",
        "[progress  40%] halfway",
        "Hello",
        "[tool] grep: 3 matches",
        "red \\x1b[31mALERT\\x1b[0m\\x0dover",  # neutralised: no escape reaches the terminal
        "[status] thinking",
        "[result] 42",
        f"[closed] run {run.run_id} of scout: ok (exit code 0)",
    ]
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    # By agent: its last run, the same session.
    by_agent = await asyncio.to_thread(applied.covey, "attach", "scout")
    assert by_agent.returncode == 0 and by_agent.stdout == result.stdout


async def test_attach_during_a_run_follows_it_to_the_end(applied: World) -> None:
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        await run.lines([f"early {n}" for n in range(5)])
        out = Output(start(applied, "attach", "scout"))
        try:
            await asyncio.to_thread(out.wait_for, lambda t: t == "early 4")
            for n in range(5):
                await run.lines([f"late {n}"])
                await asyncio.sleep(0.05)
            await run.close("failed", 3)
            code = await asyncio.to_thread(out.finish)
        finally:
            stop(out.process)
    assert code == 0
    texts = out.texts()
    assert texts[1:] == [
        *(f"early {n}" for n in range(5)),
        *(f"late {n}" for n in range(5)),
        f"[closed] run {run.run_id} of scout: failed (exit code 3)",
    ]


async def test_json_gives_ids_and_from_id_resumes_exactly_after(applied: World) -> None:
    async with FakeRun(applied.amqp_url) as run, FakeRun(applied.amqp_url, "writer") as other:
        await run.open()
        for n in range(6):
            await run.lines([f"line {n}"])
            await other.lines([f"other {n}"])
        await run.close()
    everything = ids_of(await asyncio.to_thread(applied.ok, "attach", run.run_id, "--json"))
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 8
    assert [e["kind"] for e in everything] == ["opened", *["line"] * 6, "closed"]
    assert [e["seq"] for e in everything] == list(range(8))
    assert all(e["run_id"] == run.run_id for e in everything)
    seen = everything[3]["id"]  # the last id a reader saw: it resumes after it
    rest = ids_of(
        await asyncio.to_thread(applied.ok, "attach", run.run_id, "--from", str(seen), "--json")
    )
    assert rest == everything[4:]
    # `--from now` on a run that has ended shows only how it ended.
    now = ids_of(
        await asyncio.to_thread(applied.ok, "attach", run.run_id, "--from", "now", "--json")
    )
    assert [e["kind"] for e in now] == ["closed"]


async def test_no_follow_stops_at_what_is_there_and_the_api_reads_the_same(
    applied: World,
) -> None:
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        await run.lines(["a", "b"])
        result = await asyncio.to_thread(applied.covey, "attach", run.run_id, "--no-follow")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[1:] == ["a", "b"]
        await run.close()
    async with applied.open() as covey:
        events = [(i, e) async for i, e in covey.attach(run.run_id)]
    assert [e.kind for _, e in events] == ["opened", "line", "line", "closed"]
    assert [i for i, _ in events] == sorted({i for i, _ in events})


async def test_a_batch_published_twice_shows_once(applied: World) -> None:
    """A writer whose confirm was lost publishes the batch again: the stream then holds its
    events twice, and readers show them once (by seq), ids still increasing."""
    async with FakeRun(applied.amqp_url) as run, FakeRun(applied.amqp_url, "writer") as other:
        await run.open()
        await run.lines(["a", "b", "c"])
        await other.lines(["not scout's"])
        await run.publish_again()
        await run.lines(["d"])
        await run.publish_again()
        await run.close()
    everything = ids_of(await asyncio.to_thread(applied.ok, "attach", run.run_id, "--json"))
    assert [e["kind"] for e in everything] == ["opened", *["line"] * 4, "closed"]
    assert [e["text"] for e in everything[1:-1]] == ["a", "b", "c", "d"]
    assert [e["seq"] for e in everything] == list(range(6))
    ids = [e["id"] for e in everything]
    assert ids == sorted(set(ids))
    # Resumed from each id but the last (`closed`: nothing follows it, it would wait):
    # exactly what follows it, the repeats passed by there too.
    for n, seen in enumerate(everything[:-1]):
        rest = ids_of(
            await asyncio.to_thread(
                applied.ok, "attach", run.run_id, "--from", str(seen["id"]), "--json"
            )
        )
        assert rest == everything[n + 1 :], seen
    async with applied.open() as covey:
        events = [(i, e) async for i, e in covey.attach(run.run_id)]
    assert [e.seq for _, e in events] == list(range(6))


async def test_resuming_from_an_id_inside_a_batch_gives_exactly_what_follows(
    applied: World,
) -> None:
    async with FakeRun(applied.amqp_url) as run, FakeRun(applied.amqp_url, "writer") as other:
        await run.open()
        await run.lines([f"line {n}" for n in range(5)])  # one message, five events
        await other.lines(["other"])
        await run.emit_many([("status", "busy", None), ("line", "line 5", None)])
        await run.close()
    everything = ids_of(await asyncio.to_thread(applied.ok, "attach", run.run_id, "--json"))
    texts = [e["text"] for e in everything[1:-1]]
    assert texts == [*(f"line {n}" for n in range(5)), "busy", "line 5"]
    ids = [e["id"] for e in everything]
    assert ids == sorted(set(ids)) and len(ids) == 9
    batch = ids[1:6]  # the five lines: one message, consecutive ids
    assert batch == list(range(batch[0], batch[0] + 5))
    assert batch[0] % IDS_PER_OFFSET == 0
    for n in (1, 3, 5, 6):  # the first, middle and last of the batch, and the one after
        rest = ids_of(
            await asyncio.to_thread(
                applied.ok, "attach", run.run_id, "--from", str(ids[n]), "--json"
            )
        )
        assert rest == everything[n + 1 :], n
    text = await asyncio.to_thread(applied.ok, "attach", run.run_id, "--from", str(ids[3]))
    assert text.splitlines() == [
        "line 3",
        "line 4",
        "[status] busy",
        "line 5",
        f"[closed] run {run.run_id} of scout: ok (exit code 0)",
    ]


def test_an_unknown_run_is_one_line_and_exit_2(applied: World) -> None:
    for name in ("20200101T000000-abcdef", "no-such-run"):
        result = applied.covey("attach", name)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "no run" in result.stderr


# -- the control channel ------------------------------------------------------------------


async def test_sessions_follow_sees_a_new_session_within_a_second(applied: World) -> None:
    async with FakeRun(applied.amqp_url) as before:
        await before.open()
        await before.close()
    out = Output(start(applied, "sessions", "--follow"))
    try:
        await asyncio.to_thread(out.wait_for, lambda t: before.run_id in t)
        async with FakeRun(applied.amqp_url, "writer") as run:
            await run.open()
            opened_at = time.monotonic()
            seen_at = await asyncio.to_thread(out.wait_for, lambda t: run.run_id in t, 10.0)
            await run.close()
    finally:
        stop(out.process)
    assert seen_at - opened_at < 1.0, f"seen {seen_at - opened_at:.2f} s after it opened"
    listed = applied.ok("sessions", "--json")
    rows = [json.loads(line) for line in listed.splitlines()]
    assert [r["run_id"] for r in rows] == [before.run_id, run.run_id]
    assert [r["outcome"] for r in rows] == ["ok", "ok"]


# -- a cut connection, and retention (a private node; a vhost with tiny retention) -----------


@pytest.fixture(scope="module")
def node() -> Iterator[LocalBroker]:
    with LocalBroker() as broker:
        yield broker


@pytest.mark.slow
async def test_a_cut_attach_connection_resumes_with_no_gap_and_no_duplicate(
    world: World, node: LocalBroker
) -> None:
    """Injected: `rabbitmqctl close_connection` on the attaching `covey attach`'s connection
    (named `covey human:ada`) while the run writes. Asserted: every line once, in order."""
    with world_on(node, world, "attach") as on:
        vhost = on.amqp_url.rsplit("/", 1)[1]
        async with FakeRun(on.amqp_url) as run:
            await run.open()
            await run.lines([f"line {n}" for n in range(100)])
            out = Output(start(on, "attach", run.run_id, "--json"))
            try:
                await asyncio.to_thread(out.wait_for, lambda t: '"line 99"' in t)
                writing = asyncio.ensure_future(_write_slowly(run, 100, 200))
                cuts = await asyncio.to_thread(cut, node, vhost, "covey human:ada")
                await writing
                await run.lines([f"line {n}" for n in range(200, 300)])
                await run.close()
                code = await asyncio.to_thread(out.finish)
            finally:
                stop(out.process)
    events = [json.loads(t) for t in out.texts()]
    lines = [e["text"] for e in events if e["kind"] == "line"]
    print(f"TALLY attach-cut: cuts={cuts} lines={len(lines)} events={len(events)}")
    assert cuts == 1
    assert code == 0, out.process.stderr.read() if out.process.stderr else ""
    assert lines == [f"line {n}" for n in range(300)]
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))


async def test_a_connection_lost_as_a_follow_starts_is_reopened_like_any_other(
    applied: World,
) -> None:
    """Injected: the reader's connection (through a proxy) is cut while a follow is still
    finding where to start (its broker's answers held), which once escaped the reader's
    reconnecting as a raw aiormq error. Asserted: the follow reconnects and yields the run's
    events once, in order."""
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        await run.lines([f"line {n}" for n in range(10)])
        await run.close()
        url = URL(applied.amqp_url)
        async with HoldingProxy(url).serving() as proxy:
            through = str(url.with_host("127.0.0.1").with_port(proxy.port))
            async with Covey.open(identity="human:ada", home=applied.home, amqp_url=through) as ada:
                found = await session_reader.find_run(ada.namespace, run.run_id)
                proxy.to_client.clear()  # the follow's first questions get no answer...
                follow = session_reader.follow(ada.namespace, run.run_id, found=found)
                first = asyncio.ensure_future(anext(follow))
                await asyncio.sleep(0.5)
                assert not first.done()
                proxy.cut()  # ...and its connection goes
                proxy.to_client.set()
                events = [await asyncio.wait_for(first, 30)]
                async with contextlib.aclosing(follow):
                    events += [item async for item in follow]
    kinds = [event.kind for _, event in events]
    assert kinds == ["opened", *["line"] * 10, "closed"], kinds
    assert [event.text for _, event in events if event.kind == "line"] == [
        f"line {n}" for n in range(10)
    ]
    ids = [id_ for id_, _ in events]
    assert ids == sorted(set(ids))


async def _write_slowly(run: FakeRun, first: int, last: int) -> None:
    for n in range(first, last, 5):
        await run.lines([f"line {m}" for m in range(n, n + 5)])
        await asyncio.sleep(0.02)


async def _first_offset(url: str) -> int:
    """The offset of the oldest message `covey.sessions` still keeps (it keeps some).
    Asked again by a new consumer: one that began as retention removed the segment it
    started in was seen, under load, to get nothing at all."""
    deadline = time.monotonic() + 40.0
    while (first := await _try_first_offset(url, wait=5.0)) < 0:
        assert time.monotonic() < deadline, "covey.sessions delivered nothing from `first`"
    return first


async def _try_first_offset(url: str, wait: float) -> int:
    """The oldest offset, or -1 when nothing came within `wait`: retention may have
    removed every message written so far (the segment it left is empty until the next
    publish) — under load the flood's chunks are large, and a roll-over can do that."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=10)
        queue = await channel.declare_queue(STREAM, passive=True)
        got: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(got.put, arguments={"x-stream-offset": "first"})
        try:
            message = await asyncio.wait_for(got.get(), wait)
        except TimeoutError:
            return -1
        return int(message.headers["x-stream-offset"])  # type: ignore[arg-type]


async def _retention_removed_something(url: str, within: float = 60.0) -> None:
    """Return once the oldest segment is gone (retention runs as segments roll over):
    the oldest offset kept is past 0, or nothing written so far is kept at all."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await _try_first_offset(url, wait=3.0) != 0:
            return
        await asyncio.sleep(0.5)


@pytest.mark.slow
async def test_retention_is_explicit_a_notice_first_or_exit_9(world: World) -> None:
    """Retention made to remove data: this test's vhost declares covey.sessions with
    `[sessions] max_bytes` at its minimum (1 MiB, so 1 MiB segments), and other runs write
    4 MiB after the runs under test began. The broker then drops the oldest segments."""
    config = world.home / "covey.toml"
    config.write_text(config.read_text() + "\n[sessions]\nmax_bytes = 1048576\n")
    world.ok("topology", "apply")
    async with (
        FakeRun(world.amqp_url, "loner") as gone,
        FakeRun(world.amqp_url) as run,
        FakeRun(world.amqp_url, "writer") as flood,
    ):
        await gone.open()
        await gone.lines(["soon gone"])
        await gone.close()
        await run.open()
        await run.lines([f"early {n}" for n in range(10)])
        await flood.open()
        for _ in range(40):  # 400 messages, in 1 MiB segments, ten confirms awaited together
            await asyncio.gather(*(flood.lines(["x" * 10_000]) for _ in range(10)))
        await _retention_removed_something(world.amqp_url)
        await run.lines(["late"])
        await run.close()
    first = await _first_offset(world.amqp_url)
    assert first > 20, "retention removed nothing"
    # Resuming from an id retention removed: the notice first, naming the ids.
    resumed = ids_of(
        await asyncio.to_thread(world.ok, "attach", run.run_id, "--from", "2", "--json")
    )
    assert resumed[0]["kind"] == "expired"
    assert resumed[0]["data"] == {"from": 3, "to": first * IDS_PER_OFFSET - 1}
    assert [e["text"] for e in resumed[1:] if e["kind"] == "line"] == ["late"]
    assert resumed[-1]["kind"] == "closed"
    text = await asyncio.to_thread(world.ok, "attach", run.run_id)
    assert text.splitlines()[0].startswith("[expired] the first 11 events of this run")
    # A session retention removed entirely: one line, exit 9.
    result = await asyncio.to_thread(world.covey, "attach", gone.run_id)
    assert result.returncode == 9, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no longer retained" in result.stderr


async def test_a_cancel_that_meets_a_delivery_is_not_swallowed(applied: World) -> None:
    """Ctrl-C cancels the reader once. Python 3.11's `asyncio.wait_for` swallowed a cancel
    that landed as its delivery arrived, and the reader went on following (a CI run's
    `covey attach` ignored Ctrl-C for 60 s): waiting must give the cancel back."""
    settings = Settings(amqp_url=applied.amqp_url)
    async with await Gateway.connect(settings, "cancel probe") as gateway:
        channel = await gateway.open_channel()
        deliveries: asyncio.Queue[Any] = asyncio.Queue()
        waiting = asyncio.ensure_future(session_reader._next(deliveries, gateway, channel))
        await asyncio.sleep(0.05)  # it waits for the next delivery
        deliveries.put_nowait("a delivery")  # arrives in the very turn the cancel does
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert deliveries.qsize() == 1, "a cancelled wait took the delivery with it"


async def test_a_cancel_that_the_client_turns_into_a_broker_error_still_stops_a_follow(
    applied: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiormq answers a cancel that lands in the middle of a call by closing the channel,
    and the call may then fail with the channel's error instead of the cancel. A follow
    took that for a lost connection and reconnected, following on: a CI run's `covey
    attach` ignored Ctrl-C for 60 s. Injected: every wait for a delivery that is cancelled
    fails with such an error instead. Asserted: the cancel stops the follow all the same."""
    real_next = session_reader._next

    async def converting(*args: Any) -> Any:
        try:
            return await real_next(*args)
        except asyncio.CancelledError:
            raise aiormq.exceptions.ChannelInvalidStateError("closed: RPC cancelled") from None

    monkeypatch.setattr(session_reader, "_next", converting)
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        await run.lines(["working"])
        async with applied.open("human:ada") as ada:
            follow = session_reader.follow(ada.namespace, run.run_id)

            async def read() -> None:
                async with contextlib.aclosing(follow):
                    async for _ in follow:
                        pass

            reading = asyncio.ensure_future(read())
            await asyncio.sleep(1.0)  # it has shown what there is, and waits for more
            assert not reading.done()
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reading), 10)
        await run.close()


async def test_ctrl_c_detaches_with_130_and_leaves_the_run_alone(applied: World) -> None:
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        await run.lines(["working"])
        out = Output(start(applied, "attach", run.run_id))
        try:
            await asyncio.to_thread(out.wait_for, lambda t: t == "working")
            out.process.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(out.finish)
        finally:
            stop(out.process)
        # The run goes on: its next lines and its end are there for the next reader.
        await run.lines(["still working"])
        await run.close()
    assert code == 130
    assert out.process.stderr is not None
    said = out.process.stderr.read()
    assert "detached" in said and f"covey attach {run.run_id} --from " in said
    resumed_from = said.split("--from ")[1].split("`")[0]
    rest = await asyncio.to_thread(applied.ok, "attach", run.run_id, "--from", resumed_from)
    assert rest.splitlines()[0] == "still working"


def test_a_real_run_with_emitted_events_attaches_end_to_end(applied: World) -> None:
    """The whole path with nothing faked: `covey run` publishes the agent's lines and what
    it emits with `covey emit`, in the order they happened; `covey attach` by agent name
    shows them once each, ids increasing, and ends with the outcome."""
    applied.add_agent(
        "reporter",
        'command = "echo first; covey emit progress halfway --fraction 0.5; echo second; '
        "covey emit tool 'grep: looked for TODO'; covey emit result 'the answer'; echo last\"\n",
    )
    assert applied.covey("run", "reporter").returncode == 0
    shown = applied.covey("attach", "reporter", "--json")
    assert shown.returncode == 0, shown.stderr
    events = [json.loads(line) for line in shown.stdout.splitlines()]
    kinds = [(e["kind"], e.get("text", "")) for e in events]
    assert kinds[0][0] == "opened" and kinds[-1][0] == "closed", kinds
    assert [k for k in kinds[1:-1]] == [
        ("line", "first"),
        ("progress", "halfway"),
        ("line", "second"),
        ("tool", "grep: looked for TODO"),
        ("result", "the answer"),
        ("line", "last"),
    ], kinds
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), ids
    assert events[-1]["data"]["outcome"] == "ok"
    text = applied.covey("attach", "reporter")
    assert text.returncode == 0 and "the answer" in text.stdout and "50%" in text.stdout


# -- a finished run, resumed at or after its end ------------------------------------------


def test_resuming_a_finished_run_at_or_after_its_end_prints_the_outcome_and_exits(
    applied: World,
) -> None:
    """A real finished run: `--from` the id of its `closed`, or any later id, and `--from
    now`, print how it ended (the `closed` event itself with `--json`) and exit 0: nothing
    more comes for that run, so waiting would be forever."""
    applied.add_agent("ender", "command = 'echo one; echo two; exit 3'\n")
    assert applied.covey("run", "ender").returncode == 1  # the agent failed: so did the run
    everything = ids_of(applied.ok("attach", "ender", "--json"))
    closing = everything[-1]
    assert closing["kind"] == "closed" and closing["data"]["exit_code"] == 3, everything
    run_id = closing["run_id"]
    line = f"[closed] run {run_id} of ender: failed (exit code 3)"
    later = closing["id"] + 50 * IDS_PER_OFFSET  # past the stream's end
    for start_at in (str(closing["id"]), str(closing["id"] + 1), str(later), "now"):
        shown = applied.covey("attach", run_id, "--from", start_at, "--json", timeout=30)
        assert shown.returncode == 0, (start_at, shown.stderr)
        assert ids_of(shown.stdout) == [closing], start_at
        text = applied.covey("attach", run_id, "--from", start_at, timeout=30)
        assert (text.returncode, text.stdout.splitlines()) == (0, [line]), start_at
        ended = applied.covey("attach", run_id, "--from", start_at, "--no-follow", timeout=30)
        assert (ended.returncode, ended.stdout.splitlines()) == (0, [line]), start_at
    # From the id before `closed`: exactly `closed`, as before.
    before = applied.covey("attach", run_id, "--from", str(everything[-2]["id"]), "--json")
    assert ids_of(before.stdout) == [closing]


# -- `covey sessions --follow` across a lost connection (a private node) --------------------


def _count(out: Output, run_id: str) -> int:
    return sum(run_id in text for text in out.texts())


@pytest.mark.slow
async def test_sessions_follow_survives_a_cut_and_prints_what_opened_meanwhile_once(
    world: World, node: LocalBroker
) -> None:
    """Injected: the node stops accepting connections (`suspend_listeners`) and the
    follower's connection is cut; a second run opens while it cannot reconnect (its
    `session.opened` heard by nobody); then the node accepts connections again, and a
    third run opens. Asserted: each run printed once, the second after the reconnect."""
    with world_on(node, world, "follow") as on:
        vhost = on.amqp_url.rsplit("/", 1)[1]
        async with FakeRun(on.amqp_url) as first:
            await first.open()
            await first.close()
        out = Output(start(on, "sessions", "--follow", "--json"))
        try:
            await asyncio.to_thread(out.wait_for, lambda t: first.run_id in t)
            async with FakeRun(on.amqp_url, "writer") as second:  # connected before
                await asyncio.to_thread(node.ctl, "suspend_listeners")
                try:
                    cuts = await asyncio.to_thread(cut, node, vhost, "covey human:ada")
                    await second.open()
                    await asyncio.sleep(2.0)  # several reconnects refused meanwhile
                    assert _count(out, second.run_id) == 0
                finally:
                    await asyncio.to_thread(node.ctl, "resume_listeners")
                await asyncio.to_thread(out.wait_for, lambda t: second.run_id in t, 30.0)
                await second.close()
            async with FakeRun(on.amqp_url) as third:
                await third.open()
                await asyncio.to_thread(out.wait_for, lambda t: third.run_id in t, 30.0)
                await third.close()
            await asyncio.sleep(1.0)  # a repeat would come within this
            assert out.process.poll() is None, "the follower ended"
        finally:
            stop(out.process)
    print(f"TALLY sessions-follow-cut: cuts={cuts} lines={len(out.texts())}")
    assert cuts >= 1
    counts = [_count(out, run.run_id) for run in (first, second, third)]
    assert counts == [1, 1, 1], out.texts()
    rows = [json.loads(text) for text in out.texts()]
    assert [row["run_id"] for row in rows] == [first.run_id, second.run_id, third.run_id]


@pytest.mark.slow
async def test_sessions_follow_gives_up_when_the_broker_stays_away(
    world: World, node: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node accepts no connection for longer than the give-up bound (made 2 s here):
    the watcher raises BrokerUnavailable (exit 4, one line, from `covey sessions`)."""
    monkeypatch.setattr(session_reader, "RECONNECT_GIVE_UP_SECONDS", 2.0)
    with world_on(node, world, "follow-gone") as on:
        vhost = on.amqp_url.rsplit("/", 1)[1]
        async with on.open() as covey, session_reader.watch_sessions(covey.namespace) as opened:
            await asyncio.to_thread(node.ctl, "suspend_listeners")
            try:
                assert await asyncio.to_thread(cut, node, vhost, "covey human:ada") >= 1
                began = time.monotonic()
                with pytest.raises(BrokerUnavailable) as gave_up:
                    async with asyncio.timeout(30):
                        async for _ in opened:
                            pass
                took = time.monotonic() - began
            finally:
                await asyncio.to_thread(node.ctl, "resume_listeners")
    assert 2.0 <= took < 20.0, took
    assert "\n" not in str(gave_up.value) and "covey sessions" in str(gave_up.value)
