"""Server-sent events over HTTP, from a real `covey web` process on a real broker: the
control channel (`/api/events`) for runs other processes start, and one run's session
(`/api/sessions/RUN/events`), resumed with `Last-Event-ID` from random points, ended with
`end`, and what a finished, unknown or no longer retained run answers.

Sessions come from a real `covey run` where the test needs a real agent, else from
test_attach's FakeRun, which writes a session as a run's writer does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from conftest import Broker, World, start
from test_attach import FakeRun
from test_web_api import serving

Sse = dict[str, Any]  # {"event": kind, "id": str | None, "data": parsed JSON}


async def sse_events(response: httpx.Response) -> AsyncIterator[Sse]:
    """The events of an SSE response as they come (comments, i.e. pings, left out)."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield {
                    "event": fields.get("event", "message"),
                    "id": fields.get("id"),
                    "data": json.loads(fields["data"]),
                }
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


@contextlib.asynccontextmanager
async def opened(
    base: str, path: str, last_id: str | None = None, **params: str
) -> AsyncIterator[httpx.Response]:
    """A stream on a connection of its own (closed with the block, read or not)."""
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    async with (
        httpx.AsyncClient(base_url=base, timeout=30) as client,
        client.stream("GET", path, headers=headers, params=params) as response,
    ):
        yield response


async def read_all(base: str, path: str, **params: str) -> list[Sse]:
    """Every event of a stream that ends by itself."""
    async with opened(base, path, **params) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [event async for event in sse_events(response)]


def base_of(web: httpx.Client) -> str:
    return str(web.base_url).rstrip("/")


# -- the control channel -----------------------------------------------------------------


async def test_control_events_arrive_for_a_run_another_process_starts(applied: World) -> None:
    applied.add_agent("quick", 'command = "echo hello"\n')
    with serving(applied) as web:
        async with opened(base_of(web), "/api/events") as response:
            assert response.status_code == 200
            events = sse_events(response)
            first = await asyncio.wait_for(anext(events), 10)
            assert first == {"event": "listening", "id": None, "data": {"resumed": False}}
            run = asyncio.create_task(asyncio.to_thread(applied.covey, "run", "quick"))
            seen: list[Sse] = []
            async with asyncio.timeout(30):
                async for event in events:
                    seen.append(event)
                    if event["event"] == "run.finished":
                        break
            assert (await run).returncode == 0
    kinds = [e["event"] for e in seen]
    in_order = ["run.started", "session.opened", "session.closed", "run.finished"]
    assert [k for k in kinds if k in in_order] == in_order, kinds
    assert {"lock.acquired", "lock.released"} <= set(kinds), kinds
    assert all(e["data"]["kind"] == e["event"] for e in seen)
    assert all(e["id"] is None for e in seen)  # a signal, not a record: no ids
    (run_id,) = {e["data"]["run_id"] for e in seen if e["event"].startswith("run.")}
    assert seen[-1]["data"]["outcome"] == "ok" and seen[-1]["data"]["agent"] == "quick"
    assert run_id.startswith("20")


# -- one session ---------------------------------------------------------------------------


async def test_a_real_run_streams_in_order_with_ids_then_end_and_204_after(
    applied: World,
) -> None:
    applied.add_agent(
        "counter",
        'command = "python3 -c \'for n in range(200): print(\\"line\\", n, flush=True)\'"\n',
    )
    assert applied.covey("run", "counter").returncode == 0
    (record,) = applied.json("runs", "counter")
    run_id = record["run_id"]
    with serving(applied) as web:
        base = base_of(web)
        events = await read_all(base, f"/api/sessions/{run_id}/events")
        kinds = [e["event"] for e in events]
        assert kinds[0] == "opened" and kinds[-2:] == ["closed", "end"], kinds
        lines = [e["data"]["text"] for e in events if e["event"] == "line"]
        assert lines == [f"line {n}" for n in range(200)]
        ids = [int(e["id"]) for e in events[:-1]]
        assert ids == sorted(set(ids)) and ids == [e["data"]["id"] for e in events[:-1]]
        assert all(e["data"]["run_id"] == run_id for e in events[:-1])
        end = events[-1]
        assert end["id"] is None
        assert end["data"] == {"run_id": run_id, "closed_id": ids[-1], "outcome": "ok"}
        # By agent: its last run, the same events.
        assert await read_all(base, "/api/sessions/counter/events") == events
        # A reconnect after the end, at the closed event's id or later: 204, nothing more.
        # Once from this server's memory, once from a server that never streamed it.
        for last in (ids[-1], ids[-1] + 5):
            answer = web.get(f"/api/sessions/{run_id}/events", headers={"Last-Event-ID": str(last)})
            assert answer.status_code == 204 and answer.content == b""
    with serving(applied) as fresh:
        answer = fresh.get(
            f"/api/sessions/{run_id}/events", headers={"Last-Event-ID": str(ids[-1])}
        )
        assert answer.status_code == 204
        # One before the end: the closed event, then end.
        tail = await read_all(
            base_of(fresh), f"/api/sessions/{run_id}/events", **{"from": str(ids[-2])}
        )
        assert [e["event"] for e in tail] == ["closed", "end"]


async def test_resuming_100_times_from_random_points_sees_every_event_once(
    applied: World,
) -> None:
    """A run writes 2,000 lines in batches of 1-20 while a client keeps disconnecting at a
    random point and reconnecting with the last id it saw, each time on a new connection."""
    total = 2000
    rng = random.Random(14)
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        with serving(applied) as web:
            base = base_of(web)
            path = f"/api/sessions/{run.run_id}/events"
            written = asyncio.Event()

            async def write() -> None:
                n = 0
                while n < total:
                    size = min(rng.randint(1, 20), total - n)
                    await run.lines([f"line {m}" for m in range(n, n + size)])
                    n += size
                    await asyncio.sleep(0.01)
                written.set()

            writing = asyncio.create_task(write())
            seen: list[Sse] = []
            last: str | None = None
            reconnects = 0
            ended = False
            while not ended:
                # A random point of this connection to go at; after 100, read to the end.
                stop_after = rng.randint(0, 40) if reconnects < 100 else None
                # ... or a random moment, whichever comes first (the run may be quiet).
                patience = rng.uniform(0.05, 0.5) if stop_after is not None else 60
                async with opened(base, path, last) as response:
                    assert response.status_code == 200, await response.aread()
                    got = 0
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(patience):
                            async for event in sse_events(response):
                                if event["event"] == "end":
                                    ended = True
                                    break
                                seen.append(event)
                                last = event["id"] or last
                                got += 1
                                if got == stop_after:
                                    break  # gone mid-stream: it closes with the block
                            else:
                                raise AssertionError("the stream ended without `end`")
                    assert ended or stop_after is not None, "nothing more within 60 s"
                if not ended:
                    reconnects += 1
                if reconnects == 100 and stop_after is not None:
                    await written.wait()
                    await run.close()
            await writing
            after_end = web.get(path, headers={"Last-Event-ID": str(last)})
    lines = [e["data"]["text"] for e in seen if e["event"] == "line"]
    print(f"TALLY sse-resume: reconnects={reconnects} events={len(seen)} lines={len(lines)}")
    assert reconnects >= 100
    assert lines == [f"line {n}" for n in range(total)]
    assert seen[0]["event"] == "opened" and seen[-1]["event"] == "closed"
    ids = [int(e["id"]) for e in seen]
    assert ids == sorted(set(ids)), "an event came twice, or out of order"
    assert after_end.status_code == 204


async def test_from_now_starts_with_what_comes_next(applied: World) -> None:
    """Nothing of what was there before; then every line from the first one shown on.
    (When the reader has found "now" is not visible to a client, so the run keeps
    writing until a line arrives.)"""
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        await run.lines(["before 1", "before 2"])
        with serving(applied) as web:
            path = f"/api/sessions/{run.run_id}/events"
            async with opened(base_of(web), path, **{"from": "now"}) as response:
                assert response.status_code == 200
                events = sse_events(response)
                first = asyncio.ensure_future(anext(events))
                n = 0
                while not first.done() and n < 300:
                    await run.lines([f"after {n}"])
                    n += 1
                    await asyncio.wait([first], timeout=0.1)
                got = [await first]
                await run.close()
                got += [e async for e in events]
    texts = [e["data"]["text"] for e in got if e["event"] == "line"]
    assert texts and texts[0].startswith("after "), texts
    shown_from = int(texts[0].split()[1])
    assert texts == [f"after {m}" for m in range(shown_from, n)]
    assert [e["event"] for e in got[-2:]] == ["closed", "end"]


async def test_an_unknown_run_is_404_and_a_session_not_retained_410(applied: World) -> None:
    async with FakeRun(applied.amqp_url) as gone:
        # A run recorded as started and finished whose session the stream does not hold:
        # what retention leaves of a run (the records outlive the session).
        await gone.control("run.started", trigger="manual")
        await gone.control("run.finished", outcome="ok", exit_code=0)
    with serving(applied) as web:
        for path, status, words in [
            ("/api/sessions/20990101T000000-ffffff/events", 404, "no run"),
            ("/api/sessions/nobody-at-all/events", 404, "no run"),
            (f"/api/sessions/{gone.run_id}/events", 410, "no longer retained"),
            (f"/api/sessions/{gone.run_id}/events?from=yesterday", 400, "from"),
            ("/api/events?colour=red", 400, "colour"),
        ]:
            answer = web.get(path)
            assert answer.status_code == status, (path, answer.text)
            assert answer.headers["content-type"] == "application/json"
            body = answer.json()
            assert body["status"] == status and words in body["error"], body
        answer = web.get(f"/api/sessions/{gone.run_id}/events", headers={"Last-Event-ID": "soon"})
        assert answer.status_code == 400 and "Last-Event-ID" in answer.json()["error"]
        document = web.get("/api/openapi.json").json()
        stream = document["paths"]["/api/sessions/{run_id}/events"]["get"]["responses"]
        assert "text/event-stream" in stream["200"]["content"] and "204" in stream
        assert (
            "text/event-stream"
            in document["paths"]["/api/events"]["get"]["responses"]["200"]["content"]
        )


def _consumers(broker: Broker, vhost: str) -> int | None:
    """Consumers on the vhost's channels, as the management API says (None: no API).
    Counted by channel: a stream's consumers are not all in the queue's own figure."""
    api = getattr(broker.admin, "api", None)
    if api is None:
        return None
    channels = api.call("GET", f"vhosts/{quote(vhost, safe='')}/channels")
    return sum(int(channel.get("consumer_count", 0)) for channel in channels)


async def _until(check: Any, what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.5)


def _abrupt(port: int, path: str, until: bytes = b"data:") -> socket.socket:
    """A raw HTTP client that asks for `path` and reads the answer up to `until`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    got = b""
    while until not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    return sock


async def test_thirty_clients_cut_off_abruptly_leave_the_server_healthy(
    applied: World, broker: Broker, vhost: str
) -> None:
    """20 clients from `now` (a reader each), 5 from the start (one reader for all: the
    run's hub), 5 on the control channel (one listener), all reset mid-stream."""
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        await run.lines(["first"])
        with serving(applied) as web:
            port = web.base_url.port
            assert port is not None
            path = f"/api/sessions/{run.run_id}/events"
            socks = await asyncio.gather(
                *(
                    asyncio.to_thread(_abrupt, port, path + "?from=now", b"\r\n\r\n")
                    for _ in range(20)
                ),
                *(asyncio.to_thread(_abrupt, port, path) for _ in range(5)),
                *(asyncio.to_thread(_abrupt, port, "/api/events") for _ in range(5)),
            )
            await run.lines(["while they are there"])
            # The management API's figures lag (its statistics interval): first see the
            # readers' consumers there, then see them go with their clients (the hub's
            # after HUB_LINGER_SECONDS).
            watching = _consumers(broker, vhost) is not None
            if watching:
                await _until(lambda: _consumers(broker, vhost) == 22, "22 consumers")
            for sock in socks:  # a reset, not a polite close
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            if watching:
                await _until(lambda: (_consumers(broker, vhost) or 0) <= 1, "readers gone")
                await _until(lambda: _consumers(broker, vhost) == 0, "hub gone", 60)
            # The server's connection is still good: a later request works, and a stream.
            assert web.get("/api/agents").status_code == 200
            await run.lines(["after them"])
            await run.close()
            events = await read_all(base_of(web), path)
    texts = [e["data"]["text"] for e in events if e["event"] == "line"]
    assert texts == ["first", "while they are there", "after them"]
    assert events[-1]["event"] == "end"


async def test_fifty_clients_joining_a_run_that_has_printed_nothing_all_get_its_start(
    applied: World, tmp_path: Path
) -> None:
    """The moment a run shows as running, before its agent prints anything, fifty
    clients ask for its session at once: each gets 200 and the run's `opened`, then
    every line and `end`. (The benchmark's SSE figure starts its clients this way.)"""
    go = tmp_path / "go"
    applied.add_agent("waiter", 'command = "python3 waiter.py"\n')
    (applied.home / "agents" / "waiter" / "waiter.py").write_text(
        f"import os, time\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.005)\n"
        "for n in range(50):\n    print('line', n, flush=True)\n"
    )
    run = start(applied, "run", "waiter", stdout=subprocess.DEVNULL)
    try:
        with serving(applied) as web:
            base = base_of(web)
            run_id = None
            for _ in range(600):
                live = [
                    r
                    for r in web.get("/api/runs", params={"agent": "waiter"}).json()
                    if r["outcome"] == "running"
                ]
                if live:
                    run_id = live[-1]["run_id"]
                    break
                await asyncio.sleep(0.05)
            assert run_id is not None, "the run never showed as running"
            got_opened = [asyncio.Event() for _ in range(50)]

            async def client(n: int) -> list[Sse]:
                async with opened(base, f"/api/sessions/{run_id}/events") as response:
                    assert response.status_code == 200, await response.aread()
                    seen = []
                    async for event in sse_events(response):
                        seen.append(event)
                        if event["event"] == "opened":
                            got_opened[n].set()
                    return seen

            clients = [asyncio.create_task(client(n)) for n in range(50)]
            waiting = asyncio.gather(*(e.wait() for e in got_opened))
            # Until all have `opened`, or one client ends early (an error answer, or a
            # stream that closed before the run's end: a failure either way).
            done, _ = await asyncio.wait(
                [waiting, *clients], timeout=30, return_when=asyncio.FIRST_COMPLETED
            )
            early = [c.exception() or c.result() for c in clients if c.done()]
            assert not early, early[:3]
            assert waiting in done, (
                f"{sum(not e.is_set() for e in got_opened)} of 50 clients got no `opened`"
                " within 30 s"
            )
            go.write_text("go")
            for events in await asyncio.gather(*clients):
                kinds = [e["event"] for e in events]
                assert kinds[0] == "opened" and kinds[-2:] == ["closed", "end"], kinds
                lines = [e["data"]["text"] for e in events if e["event"] == "line"]
                assert lines == [f"line {n}" for n in range(50)]
    finally:
        go.write_text("go")
        run.wait(60)


async def test_every_client_gets_every_line_after_the_server_lost_its_connection(
    applied: World, broker: Broker, vhost: str
) -> None:
    """Fifty clients follow a run; the broker cuts every connection (the server's and the
    run's) while fifty more are asking for the run. All hundred get the
    run's `opened`, each of its lines once, then `end`."""
    async with FakeRun(applied.amqp_url) as run:
        await run.open()
        await run.lines(["before the cut"])
        with serving(applied) as web:
            base, path = base_of(web), f"/api/sessions/{run.run_id}/events"
            started = [asyncio.Event() for _ in range(100)]

            async def client(n: int) -> list[Sse]:
                # The broker's trouble is a 503 before the stream starts: ask again, as a
                # page's EventSource does.
                for _ in range(60):
                    async with opened(base, path) as response:
                        if response.status_code == 503:
                            await asyncio.sleep(0.5)
                            continue
                        assert response.status_code == 200, await response.aread()
                        seen = []
                        async for event in sse_events(response):
                            seen.append(event)
                            started[n].set()
                        return seen
                raise AssertionError("503 for 30 s")

            first = [asyncio.create_task(client(n)) for n in range(50)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started[:50])), 30)
            # The second fifty are asking for the run as the cut comes.
            second = [asyncio.create_task(client(n)) for n in range(50, 100)]
            await asyncio.sleep(0.1)
            await asyncio.to_thread(broker.admin.close_connections, vhost)
            await run.connect()  # the run's writer reconnects too
            await run.lines(["after the cut"])
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            await run.close()
            for events in await asyncio.wait_for(asyncio.gather(*first, *second), 60):
                kinds = [e["event"] for e in events]
                assert kinds[0] == "opened" and kinds[-2:] == ["closed", "end"], kinds
                lines = [e["data"]["text"] for e in events if e["event"] == "line"]
                assert lines == ["before the cut", "after the cut"], lines
