"""Figure 14, the web server (issue #14). 14a-c: 50 SSE clients following one `covey run`
whose agent prints 1,000 lines a second, against the same 50 on raw aio-pika stream
consumers; 14d-f: `GET /api/agents` with a large roster, alone, twenty at once, and cached.

The agent stamps each line with the moment it printed it (`time.time()`), so a client's
latency is its clock on receipt minus that stamp (one machine, one clock). It waits for a
go file before printing, which the bench writes once every client has the run's
`opened` event: every line is then a live one, for both sides alike."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from benchlib import (
    COVEY,
    Bench,
    Figure,
    covey_env,
    cpu_seconds,
    percentile,
    wall_time,
    write_home,
    write_roster,
)

from coordinator.localbroker import free_port
from coordinator.session import STREAM

CLIENTS = 50
RATE = 1000  # lines a second
P99_TARGET_MS = 250.0
AGENTS_TARGET_MS = 200.0
FALL_BEHIND_SECONDS = 30.0  # a follower not done this long after the run's end is behind

PRINTER = textwrap.dedent(
    """
    import os, sys, time
    go, seconds, rate = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    while not os.path.exists(go):
        time.sleep(0.005)
    total, n, began = int(seconds * rate), 0, time.time()
    while n < total:
        due = min(total, int((time.time() - began) * rate) + 1)
        while n < due:
            sys.stdout.write(f"{time.time():.6f} {n}\\n")
            n += 1
        sys.stdout.flush()
        time.sleep(0.001)
    """
)


class Client:
    """One follower's tally: the lines it got, in order, and each one's latency."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.lines = 0
        self.in_order = True
        self.latencies: list[float] = []  # seconds

    def line(self, text: str, received: float) -> None:
        stamp, _, number = text.partition(" ")
        self.in_order = self.in_order and int(number) == self.lines
        self.lines += 1
        self.latencies.append(received - float(stamp))


async def follow_sse(base: str, run_id: str, client: Client) -> None:
    """Read the session's SSE stream to its `end`, parsing only what the tally needs."""
    async with (
        httpx.AsyncClient(base_url=base, timeout=120) as http,
        http.stream("GET", f"/api/sessions/{run_id}/events") as response,
    ):
        assert response.status_code == 200, await response.aread()
        pending = b""
        async for chunk in response.aiter_bytes():
            received = time.time()
            blocks = (pending + chunk).split(b"\n\n")
            pending = blocks.pop()
            for block in blocks:
                if b"\nevent: line\n" in block:  # the text, without parsing all of it
                    start = block.index(b'"text":"') + 8
                    client.line(block[start : block.index(b'"', start)].decode(), received)
                elif b"event: opened" in block:
                    client.opened.set()
                elif block.startswith(b"event: end"):
                    return


async def follow_raw(url: str, client: Client) -> None:
    """The same with plain aio-pika: a connection of its own, a stream consumer from
    `next` (attached before the run starts: the only run in its namespace then), the
    run's batches parsed."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(STREAM, passive=True)
        got: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(got.put, arguments={"x-stream-offset": "next"})
        client.opened.set()  # attached: from here on, it sees the run's events
        while True:
            message = await got.get()
            received = time.time()
            await message.ack()
            for event in json.loads(message.body):
                if event["kind"] == "line":
                    client.line(event["text"], received)
                elif event["kind"] == "closed":
                    await channel.close()  # cancels the consumer: never left on a stream
                    return


async def bench_web(bench: Bench) -> list[Figure]:
    seconds = 2.0 if bench.quick else 10.0
    figures = await _sse_figures(bench, seconds)
    figures += await _agents_figures(bench)
    return figures


async def _serve(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    web = subprocess.Popen(
        [COVEY, "web", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while True:
            try:
                await http.get("/api/openapi.json")
                return web, base
            except httpx.TransportError:
                if web.poll() is not None or time.monotonic() > deadline:
                    problem = web.communicate()[1]
                    raise RuntimeError(f"covey web did not start: {problem!r}") from None
                await asyncio.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _live_run(base: str, agent: str) -> str:
    """The id of `agent`'s run once it is recorded as running."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for _ in range(600):
            runs = (await http.get("/api/runs", params={"agent": agent})).json()
            live = [r for r in runs if r["outcome"] == "running"]
            if live:
                return str(live[-1]["run_id"])
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{agent}'s run never showed as running")


async def _sse_figures(bench: Bench, seconds: float) -> list[Figure]:
    url = await bench.vhost()
    folder = bench.folder("web")
    home = write_home(folder / "home", {"printer": []})
    (home / "agents" / "printer" / "printer.py").write_text(PRINTER)
    env = covey_env(home, url)
    await wall_time([COVEY, "topology", "apply"], env)
    web, base = await _serve(env)
    try:
        raw_side = await _one_run(bench, home, env, seconds, folder / "go-raw", raw_url=url)
        covey_side = await _one_run(
            bench, home, env, seconds, folder / "go-covey", sse=(base, web.pid)
        )
    finally:
        _stop(web)
    total = int(seconds * RATE)
    note = (
        f"{CLIENTS} clients, one run printing {RATE} lines/s for {seconds:g} s ({total} lines); "
        "latency: the line's print time to its client's receipt"
    )
    everyone = covey_side["complete"]
    if not raw_side["complete"]:
        note += f"; raw: {raw_side['clients_behind']} of {CLIENTS} clients fell behind"
    return [
        Figure(
            "14a",
            f"SSE, {CLIENTS} clients, {RATE} lines/s: p99 latency",
            "ms",
            covey_side["p99_ms"],
            raw_side["p99_ms"],
            f"≤ {P99_TARGET_MS:g} ms, all lines",
            max_value=P99_TARGET_MS if everyone else -1.0,
            note=note + ("" if everyone else "; NOT every SSE client got every line"),
            extra={"covey": covey_side, "raw": raw_side},
        ),
        Figure(
            "14b",
            f"SSE, {CLIENTS} clients: median latency",
            "ms",
            covey_side["p50_ms"],
            raw_side["p50_ms"],
            "(reported)",
            note="upstream (one raw consumer beside the SSE clients: the run's writer and "
            f"the broker): p50 {covey_side.get('upstream_p50_ms')} ms, "
            f"p99 {covey_side.get('upstream_p99_ms')} ms",
        ),
        Figure(
            "14c",
            f"SSE, {CLIENTS} clients: `covey web` CPU",
            "%core",
            covey_side["server_cpu_percent"],
            None,
            "(reported)",
            note="CPU of the `covey web` process while the run printed, as /proc says; "
            "raw has no server",
        ),
    ]


async def _one_run(
    bench: Bench,
    home: Path,
    env: dict[str, str],
    seconds: float,
    go: Path,
    sse: tuple[str, int] | None = None,
    raw_url: str | None = None,
) -> dict[str, Any]:
    """One run of the printer, followed by CLIENTS clients (SSE, or raw consumers)."""
    clients = [Client() for _ in range(CLIENTS)]
    followers: list[asyncio.Task[None]] = []
    # With the SSE clients, one raw consumer as well: what the run's lines take to reach
    # any reader of the stream (the run's writer and the broker), before the web server.
    upstream = Client()
    upstream_task: asyncio.Task[None] | None = None
    if raw_url is not None:  # attached before the run starts, from `next`
        followers = [asyncio.create_task(follow_raw(raw_url, c)) for c in clients]
        await asyncio.wait_for(asyncio.gather(*(c.opened.wait() for c in clients)), 60)
    else:
        upstream_task = asyncio.create_task(follow_raw(env["COVEY_AMQP_URL"], upstream))
        await asyncio.wait_for(upstream.opened.wait(), 60)
    (home / "agents" / "printer" / "agent.toml").write_text(
        f'command = "{sys.executable} printer.py {go} {seconds} {RATE}"\ntimeout = "5m"\n'
    )
    run = subprocess.Popen(
        [COVEY, "run", "printer"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        if sse is not None:
            base, _ = sse
            run_id = await _live_run(base, "printer")
            followers = [asyncio.create_task(follow_sse(base, run_id, c)) for c in clients]
            await _all_opened(clients, followers)
        cpu_before = cpu_seconds(sse[1]) if sse else 0.0
        own_before = time.process_time()
        began = time.perf_counter()
        go.write_text("go")
        # Followers that fall this far behind are stopped and counted as incomplete.
        _, late = await asyncio.wait(followers, timeout=seconds + FALL_BEHIND_SECONDS)
        took = time.perf_counter() - began
        cpu = cpu_seconds(sse[1]) - cpu_before if sse else 0.0
        own = time.process_time() - own_before
        code = await asyncio.to_thread(run.wait, 60)
        if code != 0:
            raise RuntimeError(f"covey run printer exited {code}: {run.communicate()[1]!r}")
        if upstream_task is not None:
            await asyncio.wait([upstream_task], timeout=FALL_BEHIND_SECONDS)
    finally:
        for task in [*followers, *([upstream_task] if upstream_task else [])]:
            task.cancel()
        if run.poll() is None:
            run.kill()
            run.wait()
    total = int(seconds * RATE)
    latencies = [x * 1000 for c in clients for x in c.latencies]
    return {
        "complete": all(c.lines == total and c.in_order for c in clients),
        "clients_behind": len(late),
        "lines_per_client_min": min(c.lines for c in clients),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "server_cpu_percent": round(100 * cpu / took, 1) if sse else None,
        "seconds": round(took, 2),
        "clients_cpu_percent": round(100 * own / took, 1),
        **(
            {
                "upstream_p50_ms": round(1000 * statistics.median(upstream.latencies), 2),
                "upstream_p99_ms": round(1000 * percentile(upstream.latencies, 99), 2),
            }
            if upstream.latencies
            else {}
        ),
        "load_average": os.getloadavg()[0],
    }


async def _all_opened(clients: list[Client], followers: list[asyncio.Task[None]]) -> None:
    """Until every client has the run's `opened`; failing with what the followers that
    ended early raised (an error answer, say), or with how many were still waiting."""
    opened = asyncio.ensure_future(asyncio.gather(*(c.opened.wait() for c in clients)))
    await asyncio.wait([opened, *followers], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if opened.done():
        return
    opened.cancel()
    await asyncio.gather(opened, return_exceptions=True)
    ended = [repr(f.exception() or "ended without `opened`") for f in followers if f.done()]
    waiting = sum(not c.opened.is_set() for c in clients)
    raise RuntimeError(
        f"{waiting} of {len(clients)} SSE clients had no `opened` after up to 60 s; "
        f"{len(ended)} ended early: {ended[:3]}"
    )


async def _agents_figures(bench: Bench) -> list[Figure]:
    """`GET /api/agents`: on figure 7's namespace when it ran (its roster applied), else
    on one of our own. 14d: one request at a time, each a look of its own (the default);
    14e: twenty at once, which share looks (shared.py), against one alone; 14f: with
    `max_age=15`, as the page's timer asks."""
    if "roster" in bench.shared:
        home, url = bench.shared["roster"]
        where = "figure 7's namespace"
    else:
        agents = 20 if bench.quick else 1000
        url = await bench.vhost()
        home = write_roster(bench.folder("web-roster"), agents)
        await wall_time([COVEY, "topology", "apply"], covey_env(home, url), check=True)
        where = "a namespace of its own"
    web, base = await _serve(covey_env(home, url))
    took: list[float] = []
    together: list[float] = []
    cached: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:

            async def get(params: dict[str, float] | None = None) -> float:
                started = time.perf_counter()
                answer = await http.get("/api/agents", params=params)
                assert answer.status_code == 200, answer.text
                return (time.perf_counter() - started) * 1000

            for _ in range(6):
                took.append(await get())
            count = len((await http.get("/api/agents")).json())
            for _ in range(3):
                together.append(max(await asyncio.gather(*(get() for _ in range(20)))))
            for _ in range(6):
                cached.append(await get({"max_age": 15}))
    finally:
        _stop(web)
    median = statistics.median(took[1:])  # the first warms the connection up
    return [
        Figure(
            "14d",
            f"GET /api/agents, {count} agents",
            "ms",
            median,
            None,
            f"≤ {AGENTS_TARGET_MS:g} ms",
            max_value=AGENTS_TARGET_MS,
            note=f"median of 5 after one warm-up, `covey web` on {where}",
            extra={"runs_ms": [round(x, 1) for x in took]},
        ),
        Figure(
            "14e",
            f"GET /api/agents, 20 at once, {count} agents: the slowest (raw: one alone)",
            "ms",
            statistics.median(together),
            median,
            "(reported)",
            note="twenty requests at once share two looks: the first's, and one begun "
            "after the others came",
            extra={"runs_ms": [round(x, 1) for x in together]},
        ),
        Figure(
            "14f",
            f"GET /api/agents?max_age=15 (the page's timer), {count} agents",
            "ms",
            statistics.median(cached[1:]),
            None,
            "(reported)",
            note="an answer up to 15 s old, from the last look",
            extra={"runs_ms": [round(x, 1) for x in cached]},
        ),
    ]
