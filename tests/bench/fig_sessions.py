"""Figures 9-11: sessions. A line printed by an agent under `covey run` until an attached
reader sees it, how fast an agent can print under `covey run`, and attaching to a run
from its start when much was written after it — each against plain aio-pika (or, for
the agent's output, against the same agent writing to a file and to a pipe)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from benchlib import (
    COVEY,
    PYTHON,
    Bench,
    Figure,
    covey_env,
    covey_side,
    percentile,
    wall_time,
)

from coordinator import session_reader
from coordinator.client import Covey
from coordinator.gateway import session_message
from coordinator.runner import new_run_id
from coordinator.session import (
    COUNT_HEADER,
    FIRST_SEQ_HEADER,
    MAX_BATCH_EVENTS,
    STREAM,
    Pending,
    SessionBatch,
    offset_of,
)
from coordinator.session_writer import SessionWriter

# -- the agents ----------------------------------------------------------------------------

# Prints `waiting`, waits for the go file (the reader is attached by then), then COUNT
# lines, one every PERIOD seconds, each with the wall-clock moment it was printed.
TICKER = """
import os, sys, time
count, period, go = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
print("waiting", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.002)
started = time.monotonic()
for i in range(count):
    time.sleep(max(0.0, started + i * period - time.monotonic()))
    print(f"tick {i} {time.time():.6f}", flush=True)
"""

# Prints COUNT lines as fast as it can (Python's own buffering, as any program has it)
# and writes how long that took, by its own clock, to the file given.
FLOOD = """
import sys, time
count, took = int(sys.argv[1]), sys.argv[2]
started = time.perf_counter()
write = sys.stdout.write
for i in range(count):
    write(f"line {i} of the agent's output, as a program might print it\\n")
sys.stdout.flush()
elapsed = time.perf_counter() - started
with open(took, "w") as f:
    f.write(repr(elapsed))
"""

LINE_PERIOD = 0.02  # figure 9: a line every 20 ms
SESSION_VHOSTS = 3  # one for each of figures 9, 10 and 11
# Figure 11's raw reader keeps a few messages in flight: each is up to 1,000 events
# (256 KiB), and what a large prefetch lets the broker send ahead (other runs' batches)
# is waited for behind, on the socket, by whatever the connection reads next.
RAW_PREFETCH = 20


def _home(bench: Bench, folder: str, agents: dict[str, list[str]]) -> Path:
    """A covey home with these agents (name -> argv), each with no lock but its own."""
    home = bench.folder(folder)
    (home / "covey.toml").write_text('identity = "human:ada"\n[humans.ada]\n')
    for name, argv in agents.items():
        (home / "agents" / name).mkdir(parents=True)
        (home / "agents" / name / "agent.toml").write_text(
            f"command = {json.dumps(argv)}\nlock = 'none'\ntimeout = 600\n"
        )
    return home


def _open(home: Path, url: str) -> Covey:
    return Covey.open(identity="human:ada", home=home, amqp_url=url, state_dir=home / "state")


async def _covey_run(home: Path, url: str, agent: str) -> float:
    """Wall seconds of a real `covey run AGENT` (its echo of the lines to /dev/null)."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        COVEY,
        "run",
        agent,
        env=covey_env(home, url),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    took = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"covey run {agent} exited {process.returncode}: {err.decode()}")
    return took


# -- 9: a printed line until an attached reader sees it --------------------------------------


async def bench_sessions(bench: Bench) -> list[Figure]:
    figures = await _line_latency(bench)
    figures += await _throughput(bench)
    figures += await _attach_far_behind(bench)
    return figures


async def _line_latency(bench: Bench) -> list[Figure]:
    lines, repeats = (25, 1) if bench.quick else (300, 3)
    url = await bench.vhost()
    folder = bench.workdir / "latency-agent"
    folder.mkdir()
    script = folder / "ticker.py"
    script.write_text(TICKER)
    go = folder / "go"
    home = _home(
        bench, "latency", {"ticker": [PYTHON, str(script), str(lines), str(LINE_PERIOD), str(go)]}
    )
    covey_ms: list[float] = []
    # printed -> the runner read it (the event's `at`) -> a plain consumer had its message
    # -> the attached reader yielded it
    parts: dict[str, list[float]] = {"pipe": [], "broker": [], "reader": []}
    raw_ms: list[float] = []
    one_process_ms: list[float] = []
    per_run: dict[str, list[float]] = {"covey_p50_ms": [], "raw_p50_ms": []}
    async with _open(home, url) as covey:
        await covey.namespace.apply_topology()
        connection = await aio_pika.connect(url)
        async with connection:
            publisher = await connection.channel(publisher_confirms=True)
            raw_stream = await publisher.declare_queue(
                "raw.sessions", durable=True, arguments={"x-queue-type": "stream"}
            )

            async def covey_once() -> float:
                go.unlink(missing_ok=True)
                # A plain consumer on covey.sessions beside the attach: when each event's
                # message reached a client, to tell the broker's part from the reader's.
                arrived: dict[int, float] = {}
                plain = await connection.channel()
                await plain.set_qos(prefetch_count=500)

                async def on_batch(message: AbstractIncomingMessage) -> None:
                    now = time.time()
                    await message.ack()
                    headers = message.headers or {}
                    first = int(headers.get(FIRST_SEQ_HEADER, 0))  # type: ignore[call-overload]
                    count = int(headers.get(COUNT_HEADER, 0))  # type: ignore[call-overload]
                    arrived.update((seq, now) for seq in range(first, first + count))

                sessions = await plain.get_queue(STREAM, ensure=False)
                await sessions.consume(on_batch, arguments={"x-stream-offset": "next"})
                try:
                    async with session_reader.watch_sessions(covey.namespace) as opened:
                        running = asyncio.ensure_future(_covey_run(home, url, "ticker"))
                        try:
                            announced = await asyncio.wait_for(anext(opened), 60)
                        except BaseException:
                            running.cancel()
                            raise
                    samples: list[float] = []
                    moments: list[tuple[int, float, float, float]] = []
                    ticks = covey.attach(announced.run_id or "")
                    async with contextlib.aclosing(ticks) as events:
                        async for _, event in events:
                            seen = time.time()
                            if event.kind == "line" and event.text == "waiting":
                                go.touch()  # attached and caught up: the ticks are all live
                            elif event.kind == "line" and event.text.startswith("tick "):
                                printed = float(event.text.split()[2])
                                at = event.at.timestamp()
                                samples.append((seen - printed) * 1000)
                                moments.append((event.seq, printed, at, seen))
                    await running
                    # The plain consumer may have had a message after the reader did.
                    for _ in range(100):
                        if all(seq in arrived for seq, *_ in moments):
                            break
                        await asyncio.sleep(0.05)
                    for seq, printed, at, seen in moments:
                        parts["pipe"].append((at - printed) * 1000)
                        parts["broker"].append((arrived[seq] - at) * 1000)
                        parts["reader"].append((seen - arrived[seq]) * 1000)
                finally:
                    await plain.close()
                assert len(samples) == lines, (len(samples), lines)
                covey_ms.extend(samples)
                per_run["covey_p50_ms"].append(round(statistics.median(samples), 3))
                return statistics.median(samples)

            async def raw_once() -> float:
                samples = await _raw_latency(url, connection, None, raw_stream.name, lines)
                raw_ms.extend(samples)
                per_run["raw_p50_ms"].append(round(statistics.median(samples), 3))
                # The same from a publisher in the reader's own process, for comparison.
                alike = await _raw_latency(url, connection, publisher, raw_stream.name, lines)
                one_process_ms.extend(alike)
                return statistics.median(samples)

            for _ in range(repeats):
                await covey_side(covey_once())
                await raw_once()
    p50 = {name: percentile(values, 50) for name, values in parts.items()}
    note = (
        f"{lines} lines, one every {LINE_PERIOD * 1000:.0f} ms, x {repeats} run(s) pooled. covey: "
        "a real `covey run`, read in the bench process by Namespace.attach (the reader "
        "library a client runs, without `covey attach`'s cold start and second pipe); "
        "raw: a process of its own publishes each line (confirmed) to a stream, a consumer "
        "at `next` in the bench process (from a publisher in the bench process itself: "
        f"p50 {percentile(one_process_ms, 50):.2f} ms, p99 {percentile(one_process_ms, 99):.2f}"
        " ms). covey's "
        f"parts, p50: agent -> runner (pipe) {p50['pipe']:.2f} ms, runner -> a plain "
        f"consumer (writer, broker) {p50['broker']:.2f} ms, -> the attached reader "
        f"{p50['reader']:.2f} ms"
    )
    extra = {
        **per_run,
        "covey_ms": [round(x, 3) for x in covey_ms],  # in the order printed, run after run
        "raw_ms": [round(x, 3) for x in raw_ms],
        "raw_one_process_p50_ms": round(percentile(one_process_ms, 50), 3),
        "raw_one_process_p99_ms": round(percentile(one_process_ms, 99), 3),
        **{f"covey_{name}_p50_ms": round(value, 3) for name, value in p50.items()},
        **{f"covey_{name}_p99_ms": round(percentile(v, 99), 3) for name, v in parts.items()},
    }
    return [
        Figure(
            "9a",
            "printed line -> attached reader, p50",
            "ms",
            percentile(covey_ms, 50),
            percentile(raw_ms, 50),
            "≤ 1.5 × raw",
            max_ratio=1.5,
            note=note,
            extra=extra,
        ),
        Figure(
            "9b",
            "printed line -> attached reader, p99",
            "ms",
            percentile(covey_ms, 99),
            percentile(raw_ms, 99),
            "(reported)",
        ),
    ]


# Figure 9's raw side: a process of its own that publishes a line every PERIOD seconds,
# its moment in the body, each confirmed, to a stream.
RAW_PUBLISHER = """
import asyncio, sys, time
import aio_pika

async def main():
    url, name, count, period = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        started = time.monotonic()
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i * period - time.monotonic()))
            body = f"tick {i} {time.time():.6f}".encode()
            await channel.default_exchange.publish(aio_pika.Message(body), name)

asyncio.run(main())
"""


async def _raw_latency(
    url: str,
    connection: aio_pika.abc.AbstractConnection,
    publisher: aio_pika.abc.AbstractChannel | None,
    name: str,
    lines: int,
) -> list[float]:
    """One message a line, every LINE_PERIOD, its moment in the body, published by a
    process of its own (or, with `publisher`, by this one); a consumer attached at `next`
    first; ms from before each publish until seen."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    queue = await channel.get_queue(name, ensure=False)
    samples: list[float] = []
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        seen = time.time()
        await message.ack()
        samples.append((seen - float(message.body.split()[2])) * 1000)
        if len(samples) == lines:
            done.set()

    await queue.consume(on_message, arguments={"x-stream-offset": "next"})
    try:
        await asyncio.sleep(0.2)  # attached before the first line
        if publisher is None:
            argv = [PYTHON, "-c", RAW_PUBLISHER, url, name, str(lines), str(LINE_PERIOD)]
            await wall_time(argv, dict(os.environ))
        else:
            started = time.monotonic()
            for i in range(lines):
                await asyncio.sleep(max(0.0, started + i * LINE_PERIOD - time.monotonic()))
                body = f"tick {i} {time.time():.6f}".encode()
                await publisher.default_exchange.publish(aio_pika.Message(body), name)
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await channel.close()  # closing the channel cancels the consumer
    return samples


# -- 10: how fast an agent prints under `covey run` --------------------------------------------


async def _throughput(bench: Bench) -> list[Figure]:
    count, repeats = (5_000, 1) if bench.quick else (200_000, 3)
    url = await bench.vhost()
    folder = bench.workdir / "flood-agent"
    folder.mkdir()
    script, took = folder / "flood.py", folder / "took"
    home = _home(bench, "throughput", {"flood": [PYTHON, str(script), str(count), str(took)]})
    script.write_text(FLOOD)
    agent: dict[str, list[float]] = {"file": [], "pipe": [], "covey": []}  # its own seconds
    wall: dict[str, list[float]] = {"file": [], "pipe": [], "covey": []}
    env = covey_env(home, url)
    sink = folder / "out"
    quoted = f"'{PYTHON}' '{script}' {count} '{took}'"
    async with _open(home, url) as covey:
        await covey.namespace.apply_topology()

    async def side(name: str, argv: list[str]) -> None:
        took.unlink(missing_ok=True)
        if name == "covey":
            wall[name].append(await covey_side(_covey_run(home, url, "flood")))
        else:
            wall[name].append(await wall_time(argv, env))
        agent[name].append(float(took.read_text()))

    for _ in range(repeats):
        await side("covey", [])
        await side("file", ["/bin/sh", "-c", f"{quoted} > '{sink}'"])
        await side("pipe", ["/bin/sh", "-c", f"{quoted} | cat > '{sink}'"])
    rate = {name: count / statistics.median(times) for name, times in agent.items()}
    wall_rate = {name: count / statistics.median(times) for name, times in wall.items()}
    runs = {
        "agent_s": {k: [round(x, 4) for x in v] for k, v in agent.items()},
        "wall_s": {k: [round(x, 4) for x in v] for k, v in wall.items()},
    }
    what = f"{count:,} lines"
    return [
        Figure(
            "10a",
            f"agent printing {what}: covey run vs file",
            "line/s",
            rate["covey"],
            rate["file"],
            "≥ 0.9 × file",
            min_ratio=0.9,
            note="lines/s by the agent's own clock (a Python loop, stdout block-buffered); "
            "covey: a real `covey run` (session, run log, echo to /dev/null); raw: the "
            f"same agent > a file. Medians of {repeats}",
            extra=runs,
        ),
        Figure(
            "10b",
            f"agent printing {what}: covey run vs pipe",
            "line/s",
            rate["covey"],
            rate["pipe"],
            "(reported)",
            note="raw: the same agent | cat > a file (the floor for any capture)",
        ),
        Figure(
            "10c",
            f"agent printing {what}: end to end vs file",
            "line/s",
            wall_rate["covey"],
            wall_rate["file"],
            "(reported)",
            note="wall time: `covey run` from spawn to exit (start-up, locks, session "
            "flushed, run recorded) against `sh -c 'agent > file'`; pipe: "
            f"{wall_rate['pipe']:,.0f} line/s",
        ),
    ]


# -- 11: attaching to a run from its start, far behind the head ----------------------------------


async def _attach_far_behind(bench: Bench) -> list[Figure]:
    after, repeats = (20_000, 2) if bench.quick else (1_000_000, 5)
    run_events = 1000
    url = await bench.vhost()
    home = _home(bench, "attach", {"scout": ["true"]})
    runs: dict[str, Any] = {}
    async with _open(home, url) as covey, contextlib.AsyncExitStack() as stack:
        await covey.namespace.apply_topology()
        run_id = new_run_id()
        # The run: its session written by covey's own writer, as `covey run` writes it,
        # ten lines at a time (its messages are batches of what was queued meanwhile).
        writer = SessionWriter.open(
            covey.settings,
            "scout",
            run_id,
            home / "scout.log",
            command=["scout"],
            trigger="manual",
        )
        for n in range(0, run_events - 2, 10):
            writer.lines([f"scout line {i}" for i in range(n, min(n + 10, run_events - 2))], _now())
            await asyncio.sleep(0.002)
        summary = await writer.close("ok", 0, None)
        assert summary.first_id is not None and not summary.missing, summary
        first_offset = offset_of(summary.first_id)
        # Other runs' events after it: batches of MAX_BATCH_EVENTS, as a fast agent's are.
        setup = time.perf_counter()
        await _write_other_runs(covey, after)
        setup = time.perf_counter() - setup
        # Raw reads on a connection of its own: what covey's reader left in flight on its
        # connection when it stopped is not raw's to wait behind.
        raw_connection = await aio_pika.connect(url)
        stack.push_async_callback(raw_connection.close)

        async def covey_once() -> tuple[float, float]:
            started = time.perf_counter()
            first = None
            seen = 0
            events = session_reader.follow(covey.namespace, run_id, "start", follow=False)
            async with contextlib.aclosing(events) as reading:
                async for _, event in reading:
                    if first is None:
                        first = time.perf_counter() - started
                    seen += event.kind != "expired"
            took = time.perf_counter() - started
            assert seen == run_events and first is not None, seen
            return first, took

        async def raw_once() -> tuple[float, float]:
            started = time.perf_counter()
            first, took = await _raw_read_run(raw_connection, run_id, first_offset, run_events)
            return first - started, took - started

        async def cli_once() -> tuple[float, float]:
            return await _attach_process(home, url, run_id, run_events)

        covey_first, covey_all, raw_first, raw_all, cli_first, cli_all = [], [], [], [], [], []
        for _ in range(repeats):
            first, whole = await covey_side(covey_once())
            covey_first.append(first)
            covey_all.append(whole)
            first, whole = await raw_once()
            raw_first.append(first)
            raw_all.append(whole)
            first, whole = await cli_once()
            cli_first.append(first)
            cli_all.append(whole)
    for name, values in {
        "covey_first_s": covey_first,
        "covey_all_s": covey_all,
        "raw_first_s": raw_first,
        "raw_all_s": raw_all,
        "attach_process_first_s": cli_first,
        "attach_process_all_s": cli_all,
    }.items():
        runs[name] = [round(x, 4) for x in values]
    runs["write_after_s"] = round(setup, 2)
    note = (
        f"one {run_events}-event run written by SessionWriter (10 lines at a time), then "
        f"{after:,} events of {after // MAX_BATCH_EVENTS} other runs ({MAX_BATCH_EVENTS} a "
        "message, confirmed, 20 in flight); covey: session_reader.follow(run id, start, "
        "follow=False) on a connected Namespace (find the run from its id's moment, the "
        "head, then read); raw: a consumer on the run's first offset (known), prefetch "
        f"{RAW_PREFETCH}, until its {run_events} events. Medians of {repeats}"
    )
    return [
        Figure(
            "11a",
            f"attach from start, {after:,} events after: first",
            "s",
            statistics.median(covey_first),
            statistics.median(raw_first),
            "≤ 0.5 s",
            max_value=0.5,
            note=note,
            extra=runs,
        ),
        Figure(
            "11b",
            f"attach from start, {after:,} events after: all {run_events}",
            "s",
            statistics.median(covey_all),
            statistics.median(raw_all),
            "≤ 1 s",
            max_value=1.0,
        ),
        Figure(
            "11c",
            "`covey attach RUN --no-follow --json`: first line",
            "s",
            statistics.median(cli_first),
            None,
            "(reported)",
            note="a cold process, from spawn; 11d: to its exit",
        ),
        Figure(
            "11d",
            "`covey attach RUN --no-follow --json`: all",
            "s",
            statistics.median(cli_all),
            None,
            "(reported)",
        ),
    ]


def _now() -> datetime:
    return datetime.now(UTC)


async def _write_other_runs(covey: Covey, events: int) -> None:
    """`events` events of other runs, MAX_BATCH_EVENTS to a message, confirmed; set-up."""
    gateway = await covey.namespace.gateway()
    user = covey.settings.amqp_url.split("://", 1)[1].split(":", 1)[0] or "guest"
    channel = await gateway.connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(STREAM, ensure=False)
    try:
        pending: list[Any] = []
        for start in range(0, events, MAX_BATCH_EVENTS):
            run_id = f"{new_run_id()}-other{start // MAX_BATCH_EVENTS}"
            size = min(MAX_BATCH_EVENTS, events - start)
            at = _now()
            batch: list[Pending] = [
                (seq, "line", at, f"other line {seq} of a busy run, printed fast", None)
                for seq in range(1, size + 1)
            ]
            message = session_message(SessionBatch.of(run_id, "other", batch), user)
            pending.append(exchange.publish(message, ""))
            if len(pending) == 20:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await channel.close()


async def _raw_read_run(
    connection: aio_pika.abc.AbstractConnection, run_id: str, offset: int, events: int
) -> tuple[float, float]:
    """Read run `run_id`'s messages from `offset` until `events` events were seen (by the
    count header); the perf_counter moments of its first message and of the last."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=RAW_PREFETCH)
    queue = await channel.get_queue(STREAM, ensure=False)
    deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    first: float | None = None
    seen = 0
    try:
        await queue.consume(deliveries.put, arguments={"x-stream-offset": offset})
        while seen < events:
            message = await asyncio.wait_for(deliveries.get(), 10)
            await message.ack()
            headers = message.headers or {}
            if headers.get("x-covey-run") != run_id:
                continue
            if first is None:
                first = time.perf_counter()
            seen += int(headers["x-covey-count"])  # type: ignore[call-overload]
        assert first is not None
        return first, time.perf_counter()
    finally:
        await channel.close()


async def _attach_process(home: Path, url: str, run_id: str, events: int) -> tuple[float, float]:
    """`covey attach RUN --no-follow --json` as a process: seconds to its first line of
    output, and to its exit."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        COVEY,
        "attach",
        run_id,
        "--no-follow",
        "--json",
        env=covey_env(home, url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    first_line = await process.stdout.readline()
    first = time.perf_counter() - started
    rest, err = await process.communicate()
    took = time.perf_counter() - started
    shown = len((first_line + rest).splitlines())
    if process.returncode != 0 or shown != events:
        raise RuntimeError(f"covey attach exited {process.returncode}, {shown} lines: {err!r}")
    return first, took
