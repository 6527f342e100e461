"""Agents emit their own session events through the run's socket (emit.py, `covey emit`).

The server is run in the test's own event loop with a list for the run's writer; the
CLI tests start the real `covey emit` against it. Nothing here needs the broker,
except the `Covey.session()` test, which needs a covey home.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import World, covey_command

from coordinator import emit
from coordinator.emit import (
    MAX_CONNECTIONS,
    MAX_LINE_BYTES,
    NOT_IN_A_RUN,
    SOCKET_VARIABLE,
    EmitServer,
    Emitter,
    SessionUnreachable,
)
from coordinator.errors import BadInput
from coordinator.session import EMITTED_KINDS, MAX_TEXT_CHARS

RUN_ID = "20261126T080000-abc123"
Event = tuple[str, str, "dict[str, Any] | None"]


class Writer:
    """Stands in for the run's session writer: keeps what it is given, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, kind: str, text: str, data: dict[str, Any] | None) -> None:
        if text == "boom":
            raise RuntimeError("the writer broke")
        self.events.append((kind, text, data))


@pytest.fixture
def writer() -> Writer:
    return Writer()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A state folder with a short path: pytest's own (longer under xdist's workers)
    can pass the 107 bytes a socket path may have, and the server then goes elsewhere."""
    folder = Path(tempfile.mkdtemp(prefix="covey-emit-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def server(short_dir: Path, writer: Writer) -> AsyncIterator[EmitServer]:
    async with await EmitServer.start(short_dir / "runs" / "scout", RUN_ID, writer) as served:
        yield served


@pytest.fixture
def in_run(server: EmitServer, monkeypatch: pytest.MonkeyPatch) -> EmitServer:
    monkeypatch.setenv(SOCKET_VARIABLE, str(server.path))
    return server


async def connect(server: EmitServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(server.path)


async def ask(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], line: bytes) -> str:
    reader, writer = stream
    writer.write(line)
    await writer.drain()
    return (await asyncio.wait_for(reader.readline(), 5)).decode()


# -- the server -------------------------------------------------------------------


async def test_the_socket_is_in_the_run_folder_for_the_run_only(
    short_dir: Path, server: EmitServer
) -> None:
    assert server.path == short_dir / "runs" / "scout" / f"{RUN_ID}.sock"
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert server.env == {SOCKET_VARIABLE: str(server.path)}
    await server.close()
    assert not server.path.exists()


async def test_a_run_folder_too_deep_for_a_socket_gets_a_private_short_path(
    tmp_path: Path, writer: Writer
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    async with await EmitServer.start(deep, RUN_ID, writer) as served:
        assert len(os.fsencode(served.path)) <= 107
        assert not served.path.is_relative_to(deep)
        assert stat.S_IMODE(served.path.parent.stat().st_mode) == 0o700
        async with Emitter(str(served.path)) as s:
            await s.status("deep")
    assert writer.events == [("status", "deep", None)]
    assert not served.path.parent.exists()


async def test_one_connection_keeps_the_order_of_1000_events(
    server: EmitServer, writer: Writer
) -> None:
    reader, stream = await connect(server)
    # All 1,000 at once, before reading any answer: the order is the server's doing.
    stream.write(b"".join(emit.encode("token", f"{i}") for i in range(1000)))
    await stream.drain()
    answers = [await asyncio.wait_for(reader.readline(), 5) for _ in range(1000)]
    stream.close()
    assert answers == [b"ok\n"] * 1000
    assert writer.events == [("token", f"{i}", None) for i in range(1000)]


async def test_concurrent_clients_each_keep_their_order(in_run: EmitServer, writer: Writer) -> None:
    async def client(name: str) -> None:
        async with Emitter() as s:
            for i in range(200):
                await s.emit("status", f"{name} {i}")

    names = [f"client{n}" for n in range(8)]
    await asyncio.gather(*(client(name) for name in names))
    assert len(writer.events) == 8 * 200
    for name in names:
        own = [text for _, text, _ in writer.events if text.split()[0] == name]
        assert own == [f"{name} {i}" for i in range(200)]


INVALID = {
    b"not json\n": "not a JSON line",
    b"\n": "not a JSON line",
    b"\xff\xfe\n": "not a JSON line",
    b"[1, 2]\n": "a line is a JSON object",
    b'{"text": "no kind"}\n': "kind null is not one of",
    b'{"kind": "shout"}\n': 'kind "shout" is not one of',
    b'{"kind": "closed"}\n': 'kind "closed" is not one of',
    b'{"kind": "opened"}\n': 'kind "opened" is not one of',
    b'{"kind": "missing"}\n': 'kind "missing" is not one of',
    b'{"kind": "line", "text": "fake output"}\n': 'kind "line" is not one of',
    b'{"kind": "status", "who": "me"}\n': "unknown key 'who'",
    b'{"kind": "status", "text": 5}\n': "text is a string",
    b'{"kind": "status", "data": [1]}\n': "data is a JSON object",
    b'{"kind": "status", "data": "x"}\n': "data is a JSON object",
    b'{"kind": "progress", "text": "no fraction"}\n': "progress needs data",
    b'{"kind": "progress", "data": {"fraction": "0.5"}}\n': "progress needs data",
    b'{"kind": "progress", "data": {"fraction": true}}\n': "progress needs data",
    b'{"kind": "progress", "data": {"fraction": 1.5}}\n': "progress fraction 1.5 is not",
    b'{"kind": "progress", "data": {"fraction": -0.1}}\n': "progress fraction -0.1 is not",
    b'{"kind": "progress", "data": {"fraction": NaN}}\n': "NaN is not a JSON number",
    b'{"kind": "status", "text": "' + b"x" * (MAX_TEXT_CHARS + 1) + b'"}\n': "text is at most",
    b'{"kind": "status", "data": {"x": "' + b"y" * 65536 + b'"}}\n': "data is at most",
}


async def test_every_invalid_line_is_answered_with_an_error_and_the_server_serves_on(
    server: EmitServer, writer: Writer
) -> None:
    stream = await connect(server)
    for line, problem in INVALID.items():
        answer = await ask(stream, line)
        assert answer.startswith("error: ") and problem in answer, (line[:60], answer)
        assert answer.count("\n") == 1 and len(answer) < 200
    # The same connection, and a new one, still take good events.
    assert await ask(stream, emit.encode("progress", "half", {"fraction": 0.5})) == "ok\n"
    assert await ask(await connect(server), emit.encode("result", "42")) == "ok\n"
    assert writer.events == [("progress", "half", {"fraction": 0.5}), ("result", "42", None)]


async def test_the_largest_valid_event_is_taken(server: EmitServer, writer: Writer) -> None:
    text = "\u2603" * MAX_TEXT_CHARS  # escaped as \\u2603: six bytes a character on the wire
    data = {"x": "y" * (65536 - 20)}
    assert await ask(await connect(server), emit.encode("result", text, data)) == "ok\n"
    assert writer.events == [("result", text, data)]


async def test_a_line_without_end_is_cut_off(server: EmitServer, writer: Writer) -> None:
    reader, stream = await connect(server)
    stream.write(b'{"kind": "status", "text": "' + b"x" * (10 * 1024 * 1024))
    # The run hangs up while the client still sends. Its one error line arrives when the
    # client's socket has not been reset first (the kernel's race, not covey's).
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(stream.drain(), 5)
    try:
        answer = await asyncio.wait_for(reader.readline(), 5)
    except ConnectionError:
        answer = b""
    assert answer in (b"", f"error: a line is at most {MAX_LINE_BYTES} bytes; closing\n".encode())
    assert server._connections == set()
    assert await ask(await connect(server), emit.encode("status", "next")) == "ok\n"
    assert writer.events == [("status", "next", None)]


async def test_a_line_cut_short_by_its_client_is_not_taken(
    server: EmitServer, writer: Writer
) -> None:
    reader, stream = await connect(server)
    stream.write(b'{"kind": "status", "text": "half"}')  # and no newline
    stream.write_eof()
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"error: the last line")
    assert writer.events == []


async def test_a_broken_writer_ends_that_connection_only(
    in_run: EmitServer, writer: Writer
) -> None:
    with pytest.raises(SessionUnreachable, match="closed its session socket"):
        async with Emitter() as s:
            await s.status("boom")
    async with Emitter() as s:
        await s.status("after")
    assert writer.events == [("status", "after", None)]


async def test_connections_are_bounded(server: EmitServer, writer: Writer) -> None:
    streams = [await connect(server) for _ in range(MAX_CONNECTIONS)]
    for stream in streams:  # each one counted before the next is tried
        assert await ask(stream, emit.encode("status", "here")) == "ok\n"
    reader, _ = await connect(server)
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"error: the run takes 64")
    streams.pop()[1].close()
    await asyncio.sleep(0.1)
    assert await ask(await connect(server), emit.encode("status", "room again")) == "ok\n"
    assert len(writer.events) == MAX_CONNECTIONS + 1


async def test_closing_ends_open_connections(server: EmitServer, writer: Writer) -> None:
    stream = await connect(server)
    assert await ask(stream, emit.encode("status", "served")) == "ok\n"
    await server.close()
    assert await asyncio.wait_for(stream[0].read(), 5) == b""
    assert not server.path.exists()


# -- the Python API -----------------------------------------------------------------


async def test_covey_session_emits_over_one_connection(
    world: World, in_run: EmitServer, writer: Writer
) -> None:
    covey = world.open("agent:scout")
    try:
        async with covey.session() as s:
            await s.emit("status", "starting")
            await s.progress(0.25, "reading")
            await s.token("Hel")
            await s.token("lo")
            await s.tool("grep", "searched 3 files")
            await s.result("done")
            assert len(in_run._connections) == 1
            with pytest.raises(BadInput, match="progress fraction 2"):
                await s.progress(2)
            await s.status("still connected")
    finally:
        await covey.close()
    assert writer.events == [
        ("status", "starting", None),
        ("progress", "reading", {"fraction": 0.25}),
        ("token", "Hel", None),
        ("token", "lo", None),
        ("tool", "grep: searched 3 files", {"name": "grep"}),
        ("result", "done", None),
        ("status", "still connected", None),
    ]


async def test_emit_outside_a_run_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SOCKET_VARIABLE, raising=False)
    with pytest.raises(BadInput, match="COVEY_SESSION_SOCKET is not set"):
        await emit.emit("status", "x")


async def test_a_run_that_does_not_answer_is_reported_in_seconds(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen()  # connections wait in the backlog, never answered
        with pytest.raises(SessionUnreachable, match="no answer within 5 s"):
            async with Emitter(str(path)) as s:
                await s.status("anyone?")


# -- `covey emit` -------------------------------------------------------------------


def covey_emit(*args: str, socket_path: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != SOCKET_VARIABLE}
    if socket_path is not None:
        env[SOCKET_VARIABLE] = str(socket_path)
    return subprocess.run(
        [*covey_command(), "emit", *args], env=env, capture_output=True, text=True, timeout=30
    )


async def test_covey_emit_hands_the_event_to_the_run(server: EmitServer, writer: Writer) -> None:
    async def ok(*args: str) -> None:
        done = await asyncio.to_thread(covey_emit, *args, socket_path=server.path)
        # Silent: an agent's stdout is its session's lines, so `ok` would be one more.
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")

    await ok("status", "reading mail")
    await ok("progress", "halfway", "--fraction", "0.5")
    await ok("progress", "--json", '{"fraction": 0.75, "step": 3}')
    await ok("progress", "nearly", "--json", '{"step": 4}', "--fraction", "0.9")
    await ok("tool", "grep: 3 files", "--json", '{"name": "grep"}')
    await ok("result")
    assert writer.events == [
        ("status", "reading mail", None),
        ("progress", "halfway", {"fraction": 0.5}),
        ("progress", "", {"fraction": 0.75, "step": 3}),
        ("progress", "nearly", {"step": 4, "fraction": 0.9}),
        ("tool", "grep: 3 files", {"name": "grep"}),
        ("result", "", None),
    ]


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["shout", "hi"], 'covey: kind "shout" is not one of progress, token'),
        (["closed"], 'covey: kind "closed" is not one of'),
        (["progress", "no fraction"], "covey: progress needs data"),
        (["status", "--json", "{oops"], "covey: --json DATA is not JSON"),
        (["status", "--json", "[1]"], "covey: data is a JSON object"),
        (["progress", "--json", "[1]", "--fraction", "0.5"], "covey: --json DATA is a JSON"),
    ],
)
async def test_covey_emit_refused_is_one_line_and_exit_2(
    server: EmitServer, writer: Writer, args: list[str], problem: str
) -> None:
    done = await asyncio.to_thread(covey_emit, *args, socket_path=server.path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(problem) and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == "" and writer.events == []


def test_covey_emit_checks_its_fraction() -> None:
    done = covey_emit("progress", "--fraction", "1.5", socket_path=None)
    assert done.returncode == 2 and "1.5 is not from 0 to 1" in done.stderr


def test_covey_emit_outside_a_run_says_so_and_exits_2() -> None:
    done = covey_emit("status", "hello", socket_path=None)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"covey: {NOT_IN_A_RUN}\n"
    assert NOT_IN_A_RUN == "covey emit works inside `covey run`: COVEY_SESSION_SOCKET is not set"


def test_covey_emit_after_the_run_ended_exits_1(tmp_path: Path) -> None:
    done = covey_emit("status", "late", socket_path=tmp_path / "gone.sock")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("covey: the run's session socket") and "has the run ended?" in (
        done.stderr
    )
    assert done.stderr.count("\n") == 1


def test_covey_emit_to_a_run_that_does_not_answer_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen()
        done = covey_emit("status", "anyone?", socket_path=path)
    assert done.returncode == 1
    assert "no answer within 5 s" in done.stderr and done.stderr.count("\n") == 1


async def test_covey_emit_loads_no_broker_client_nor_models(server: EmitServer) -> None:
    probe = (
        "import sys\n"
        "from coordinator import cli\n"
        "code = cli.main(['emit', 'status', 'probe'])\n"
        "heavy = ('aio_pika', 'aiormq', 'pydantic', 'structlog', 'asyncio')\n"
        "print(code, [m for m in heavy if m in sys.modules])\n"
    )
    env = {**os.environ, SOCKET_VARIABLE: str(server.path)}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", probe], env=env, capture_output=True, text=True
    )
    assert done.stdout.split(maxsplit=1) == ["0", "[]\n"], done.stdout + done.stderr


def test_covey_emit_help_names_every_kind_an_agent_may_emit() -> None:
    done = subprocess.run([*covey_command(), "emit", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for kind in EMITTED_KINDS:  # the help spells them out: emit.py does not load session.py
        assert kind in done.stdout
