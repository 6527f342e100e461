"""Emitting: how an agent adds its own events (`progress`, `token`, `tool`, `status`,
`result`) to its run's session, through the run rather than the broker.

`covey run` serves a Unix socket in the run folder (`EmitServer`) and names it to the
agent in `COVEY_SESSION_SOCKET`. The agent, its children, `covey emit` and
`Covey.session()` connect and send JSON lines:

    {"kind": "progress", "text": "reading the inbox", "data": {"fraction": 0.4}}

and the server answers each with `ok` or one `error: ...` line. A valid event goes to
the run's session writer, in arrival order, so emitted events interleave with the
agent's output lines and get their seqs from the same writer. `ok` means the run has
the event, not that the broker has: the writer publishes it (or reports it missing).

Why through the run: the agent needs no broker credentials, no connection and no
confirms to emit, and an emit costs a local round trip whatever the broker is doing.
The writer owns ordering, batching and retries in one place.

The client half (`emit`, `emit_blocking`, `Emitter`) uses the standard library only:
`covey emit` runs many times per run, so it must start fast (no pydantic, no aio-pika).
For the same reason asyncio, with the ssl it loads, is imported where it is used: it
would be half of `covey emit`'s start-up, and the blocking client needs none of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.errors import BadInput, CoveyError, ExitCode

if TYPE_CHECKING:
    import asyncio

SOCKET_VARIABLE = "COVEY_SESSION_SOCKET"
NOT_IN_A_RUN = f"covey emit works inside `covey run`: {SOCKET_VARIABLE} is not set"
ANSWER_SECONDS = 5.0  # the run answers at once; longer means it hangs or is gone
MAX_LINE_BYTES = 1024 * 1024  # a line longer than this, newline or not, is cut off
MAX_DATA_BYTES = 64 * 1024  # an event's data, serialised
MAX_CONNECTIONS = 64  # at once; an agent's tools share one run, not one socket each
SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes, its NUL included

# kind, text, data: the writer's method that queues one event (synchronous, O(1)).
OnEvent = Callable[[str, str, "dict[str, Any] | None"], None]


class SessionUnreachable(CoveyError):
    """The run's session socket did not answer: the run has ended, or hangs. Exit 1 (a
    command that ran and did not succeed), not 4: no broker is involved, and an agent's
    script that branches on 4 to wait for RabbitMQ would wait for nothing."""

    exit_code = ExitCode.FAILED


# -- the run's side -------------------------------------------------------------------


class EmitServer:
    """The run's session socket: validates each line and hands it to `on_event`.

    Nothing a client sends stops the run: a bad line gets an `error:` answer, a line
    over MAX_LINE_BYTES ends that connection, a client past MAX_CONNECTIONS is turned
    away, and a client that vanishes is forgotten.
    """

    def __init__(self, path: Path, on_event: OnEvent, private_dir: Path | None) -> None:
        self.path = path
        self._on_event = on_event
        self._private_dir = private_dir  # made for the socket (a long run folder), removed after
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False  # a connection accepted as it closes is turned away

    @classmethod
    async def start(cls, run_dir: Path, run_id: str, on_event: OnEvent) -> EmitServer:
        """Serve `run_dir/RUN_ID.sock`, or, when that path is too long for a Unix socket,
        a socket in a new private (0700) folder under $XDG_RUNTIME_DIR or the temp dir."""
        import asyncio

        run_dir.mkdir(parents=True, exist_ok=True)
        path, private_dir = run_dir / f"{run_id}.sock", None
        if len(os.fsencode(path)) > SOCKET_PATH_BYTES:
            private_dir = _private_dir()
            path = private_dir / "session.sock"
        server = cls(path, on_event, private_dir)
        try:
            server._server = await asyncio.start_unix_server(
                server._serve, path, limit=MAX_LINE_BYTES
            )
            # Only the run's own user may emit into its session: the agent runs as it.
            os.chmod(path, 0o600)
        except BaseException:
            await server.close()
            raise
        return server

    @property
    def env(self) -> dict[str, str]:
        """What the agent's environment gets, so that `covey emit` finds this socket."""
        return {SOCKET_VARIABLE: str(self.path)}

    async def close(self) -> None:
        """Stop serving, end every connection, remove the socket. After this returns,
        `on_event` is not called again: the writer may then write `closed`.

        A connection the loop accepted in the instant before this is neither served
        nor closed by Python 3.11's asyncio (its transport fails to attach to a closed
        server); its client gets no answer and gives up after ANSWER_SECONDS."""
        import asyncio

        self._closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.cancel()
        if self._connections:
            await asyncio.wait(self._connections)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    async def __aenter__(self) -> EmitServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        task = asyncio.current_task()
        assert task is not None
        try:
            if self._closing:
                return
            if len(self._connections) >= MAX_CONNECTIONS:
                await _answer(writer, f"error: the run takes {MAX_CONNECTIONS} connections at once")
                return
            self._connections.add(task)
            while await self._one_line(reader, writer):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went, or the run ends: nothing to answer
        finally:
            self._connections.discard(task)
            writer.close()

    async def _one_line(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read, check, hand over and answer one line; False when the connection ends."""
        import asyncio

        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:
            if end.partial.strip():
                await _answer(writer, "error: the last line had no newline; it was not taken")
            return False
        except asyncio.LimitOverrunError:
            await _answer(writer, f"error: a line is at most {MAX_LINE_BYTES} bytes; closing")
            return False
        try:
            kind, text, data = parse_line(line)
            self._on_event(kind, text, data)
        except BadInput as err:
            await _answer(writer, f"error: {err}")
        else:
            await _answer(writer, "ok")
        return True


def parse_line(line: bytes) -> tuple[str, str, dict[str, Any] | None]:
    """One client line as (kind, text, data); BadInput with one line saying what is wrong."""
    # Imported here, not at the top: the client half must not load pydantic; the run,
    # which serves the socket, has it loaded already.
    from coordinator.session import EMITTED_KINDS, MAX_TEXT_CHARS

    try:
        event = json.loads(line, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise BadInput(f"not a JSON line ({err})") from None
    if not isinstance(event, dict):
        raise BadInput('a line is a JSON object: {"kind": ..., "text": ..., "data": {...}}')
    if unknown := sorted(set(event) - {"kind", "text", "data"}):
        raise BadInput(f"unknown key {unknown[0]!r}: a line has kind, text and data")
    kind, text, data = event.get("kind"), event.get("text", ""), event.get("data")
    if kind not in EMITTED_KINDS:
        raise BadInput(f"kind {_shown(kind)} is not one of {', '.join(EMITTED_KINDS)}")
    if not isinstance(text, str):
        raise BadInput("text is a string")
    if len(text) > MAX_TEXT_CHARS:
        raise BadInput(f"text is at most {MAX_TEXT_CHARS} characters, not {len(text)}")
    if data is not None and not isinstance(data, dict):
        raise BadInput("data is a JSON object")
    if data is not None and len(json.dumps(data).encode()) > MAX_DATA_BYTES:
        raise BadInput(f"data is at most {MAX_DATA_BYTES} bytes as JSON")
    if kind == "progress":
        fraction = (data or {}).get("fraction")
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise BadInput('progress needs data {"fraction": F}, F from 0 to 1')
        if not 0 <= fraction <= 1:
            raise BadInput(f"progress fraction {fraction} is not from 0 to 1")
    return kind, text, data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _shown(value: object) -> str:
    """A client's value, short and on one line, for an error answer."""
    shown = json.dumps(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


async def _answer(writer: asyncio.StreamWriter, text: str) -> None:
    writer.write(text.encode() + b"\n")
    await writer.drain()  # a client that never reads its answers stalls only itself


def _private_dir() -> Path:
    """A new folder only this user may enter, with a path short enough for a socket."""
    for base in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"):
        if base and len(os.fsencode(base)) < SOCKET_PATH_BYTES - 40 and os.path.isdir(base):
            return Path(tempfile.mkdtemp(prefix="covey-", dir=base))  # mkdtemp: mode 0700
    raise BadInput("no folder with a path short enough for the run's session socket")


# -- the agent's side -------------------------------------------------------------------


def socket_path() -> str:
    """The run's session socket, from the environment `covey run` gave the agent."""
    path = os.environ.get(SOCKET_VARIABLE)
    if not path:
        raise BadInput(NOT_IN_A_RUN)
    return path


def encode(kind: str, text: str = "", data: dict[str, Any] | None = None) -> bytes:
    """One line of the protocol. The run checks it; this only makes it JSON."""
    event: dict[str, Any] = {"kind": kind, "text": text}
    if data is not None:
        event["data"] = data
    try:
        return json.dumps(event, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as err:
        raise BadInput(f"data is not JSON: {err}") from None


def _outcome(answer: bytes, path: str) -> None:
    """Nothing for `ok`; BadInput for the run's `error:`; SessionUnreachable for silence."""
    if answer == b"ok\n":
        return
    if answer.startswith(b"error: "):
        raise BadInput(answer[len(b"error: ") :].decode(errors="replace").strip())
    if not answer:
        raise SessionUnreachable(f"the run closed its session socket {path}: has it ended?")
    raise SessionUnreachable(f"{path} answered {answer[:40]!r}: is it a covey run's socket?")


def _unreachable(path: str, err: OSError | TimeoutError) -> SessionUnreachable:
    if isinstance(err, TimeoutError):
        why = f"no answer within {ANSWER_SECONDS:g} s"
    else:
        why = err.strerror or type(err).__name__
    return SessionUnreachable(f"the run's session socket {path}: {why}; has the run ended?")


def emit_blocking(kind: str, text: str = "", data: dict[str, Any] | None = None) -> None:
    """`emit` without an event loop, for `covey emit`: one connection, one line."""
    path, line = socket_path(), encode(kind, text, data)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(ANSWER_SECONDS)
            client.connect(path)
            client.sendall(line)
            answer = _read_answer(client)
    except (OSError, TimeoutError) as err:
        raise _unreachable(path, err) from None
    _outcome(answer, path)


def _read_answer(client: socket.socket) -> bytes:
    """The run's one-line answer (short: `ok` or an error), or what came before it closed."""
    answer = b""
    while not answer.endswith(b"\n") and len(answer) < MAX_LINE_BYTES:
        chunk = client.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


async def emit(kind: str, text: str = "", data: dict[str, Any] | None = None) -> None:
    """Add one event to the current run's session (a connection for it alone); for more
    than a few, `Emitter` keeps one connection."""
    async with Emitter() as emitter:
        await emitter.emit(kind, text, data)


class Emitter:
    """One connection to the run's session socket, kept for the life of the context:

    async with Emitter() as s:  # or `covey.session()`
        await s.progress(0.5, "halfway")
    """

    def __init__(self, path: str | None = None) -> None:
        self._path = path
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._turn: asyncio.Lock | None = None  # one line and its answer at a time

    async def __aenter__(self) -> Emitter:
        import asyncio

        self._turn = asyncio.Lock()
        path = self._path = self._path or socket_path()
        try:
            async with asyncio.timeout(ANSWER_SECONDS):
                self._stream = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
        except (OSError, TimeoutError) as err:
            raise _unreachable(path, err) from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._stream is not None:
            writer = self._stream[1]
            self._stream = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def emit(self, kind: str, text: str = "", data: dict[str, Any] | None = None) -> None:
        """Send one event and wait for the run to take it; BadInput if it refuses it."""
        import asyncio

        if self._stream is None or self._path is None or self._turn is None:
            raise BadInput("emit inside `async with covey.session() as s:`")
        reader, writer = self._stream
        line = encode(kind, text, data)
        async with self._turn:
            try:
                writer.write(line)
                await writer.drain()
                async with asyncio.timeout(ANSWER_SECONDS):
                    answer = await reader.readline()
            except (OSError, TimeoutError) as err:
                raise _unreachable(self._path, err) from None
        _outcome(answer, self._path)

    async def progress(self, fraction: float, text: str = "") -> None:
        """How far the run is, from 0 to 1, and what it is doing."""
        await self.emit("progress", text, {"fraction": fraction})

    async def token(self, text: str) -> None:
        """A delta of text the agent streams (a model's output), shown inline."""
        await self.emit("token", text)

    async def tool(self, name: str, summary: str = "") -> None:
        """A tool call: its name (also in data, for programs) and a one-line summary."""
        await self.emit("tool", f"{name}: {summary}" if summary else name, {"name": name})

    async def status(self, text: str) -> None:
        await self.emit("status", text)

    async def result(self, text: str) -> None:
        """The run's final answer."""
        await self.emit("result", text)
