"""Tools for the fault-injection tests (tests/test_faults.py and others): a tally of what
was sent and what arrived, a proxy that holds or cuts a client's connections, the
connections of a private broker node (to cut them), a look into (and a hold on) a
mailbox file, and stopping the processes a test started. No mocks: everything here
talks to a real broker, a real SQLite file or real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yarl import URL

from coordinator.client import Covey
from coordinator.localbroker import LocalBroker
from coordinator.mailbox import Mail, MailStatus, MailStore, store_path
from coordinator.names import Address

if TYPE_CHECKING:
    from conftest import World

# -- a proxy to hold or cut ---------------------------------------------------------------


class HoldingProxy:
    """A TCP proxy to the broker whose two directions can each be held, and whose
    connections can be cut."""

    def __init__(self, upstream: URL) -> None:
        self.upstream = upstream
        self.to_broker = asyncio.Event()
        self.to_client = asyncio.Event()
        self.to_broker.set()
        self.to_client.set()
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[HoldingProxy]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self.to_broker.set()
            self.to_client.set()
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection(
            self.upstream.host, self.upstream.port or 5672
        )
        self._writers += [client_w, broker_w]
        for pipe in (
            self._pipe(client_r, broker_w, self.to_broker),
            self._pipe(broker_r, client_w, self.to_client),
        ):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)

    def cut(self) -> None:
        """Drop every connection through the proxy, as a network failure would (the
        proxy goes on accepting new ones)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event
    ) -> None:
        try:
            while data := await reader.read(65536):
                await gate.wait()  # held: nothing more is read, so the sender's buffers fill
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


# -- the tally --------------------------------------------------------------------------


@dataclass
class Tally:
    """What a fault test sent and what came of it; `show` prints it on one line
    (`pytest -s`, or with the failure report)."""

    test: str
    sent: int = 0  # publish attempts
    confirmed: int = 0  # confirmed by the broker (the sender was told "sent")
    failed: int = 0  # reported to the sender as not sent (an exception)
    delivered: int = 0  # in the recipient's mailbox
    duplicates: int = 0  # extra copies of one sent message in the mailbox
    lost: int = 0  # confirmed, yet not in the mailbox
    dead: int = 0  # in covey.dead
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        figures = " ".join(
            f"{name}={getattr(self, name)}"
            for name in ("sent", "confirmed", "failed", "delivered", "duplicates", "lost", "dead")
        )
        extra = " ".join(f"{key}={value}" for key, value in self.notes.items())
        return f"TALLY {self.test}: {figures}" + (f" {extra}" if extra else "")

    def show(self) -> None:
        print(self.line(), flush=True)


def copies(keys: Iterable[str]) -> int:
    """How many entries are extra copies of another one."""
    return sum(count - 1 for count in Counter(keys).values() if count > 1)


# -- a private node's vhosts and connections -----------------------------------------


def vhost_url(node: LocalBroker, vhost: str) -> str:
    return str(URL(node.url).with_path("/" + vhost, encoded=False))


_NAME = re.compile(r'\{"connection_name","((?:[^"\\]|\\.)*)"\}')


@contextlib.contextmanager
def world_on(node: LocalBroker, world: World, label: str) -> Iterator[World]:
    """`world` pointed at a fresh vhost of its own on the private `node`, topology
    applied; the vhost is deleted afterwards."""
    vhost = f"covey-{label}-{uuid.uuid4().hex[:10]}"
    node.ctl("add_vhost", vhost)
    node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    world.amqp_url = vhost_url(node, vhost)
    world.ok("topology", "apply")
    yield world
    with contextlib.suppress(subprocess.SubprocessError):  # a node left down says so elsewhere
        node.ctl("delete_vhost", vhost, timeout=120)


def connections(node: LocalBroker, vhost: str) -> list[tuple[str, str]]:
    """(connection pid, client-given name) of every client connection to `vhost`."""
    out = node.ctl(
        "list_connections", "-q", "--no-table-headers", "pid", "vhost", "client_properties"
    )
    found = []
    for line in out.splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[1] == vhost:
            named = _NAME.search(parts[2])
            found.append((parts[0], named.group(1) if named else ""))
    return found


def cut(
    node: LocalBroker,
    vhost: str,
    name: str,
    until: Callable[[], bool] = lambda: False,
    timeout: float = 30.0,
) -> int:
    """Close (as `rabbitmqctl close_connection` does: CONNECTION_FORCED) the connections to
    `vhost` whose client-given name starts with `name`, listing again until one was cut,
    `until()` says stop, or `timeout` passes. Returns how many were cut."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until():
        targets = [pid for pid, given in connections(node, vhost) if given.startswith(name)]
        closed = 0
        for pid in targets:
            # It may have gone between the listing and now.
            with contextlib.suppress(subprocess.CalledProcessError):
                node.ctl("close_connection", pid, "cut by a covey fault test")
                closed += 1
        if closed:
            return closed
        time.sleep(0.05)
    return 0


# -- mailboxes ------------------------------------------------------------------------


def mailbox(state_dir: Path, amqp_url: str, participant: str) -> list[Mail]:
    """Everything in a participant's mailbox file (done included), read from SQLite.
    `participant` as on the command line: `scout` is `agent:scout`."""
    path = store_path(state_dir, amqp_url, str(Address.participant(participant)))
    if not path.exists():
        return []
    store = MailStore(path)
    try:
        return store.messages(include_done=True)
    finally:
        store.close()


def mailbox_size(state_dir: Path, amqp_url: str, participant: str) -> int:
    """How many messages a participant's mailbox file holds (done included)."""
    path = store_path(state_dir, amqp_url, str(Address.participant(participant)))
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        except sqlite3.OperationalError:  # created a moment ago, its schema not yet written
            return 0


def mark_all_done(state_dir: Path, amqp_url: str, participant: str) -> None:
    """What `covey done` does, for everything not done yet (so `inbox` lists only new mail)."""
    path = store_path(state_dir, amqp_url, str(Address.participant(participant)))
    if not path.exists():
        return
    store = MailStore(path)
    try:
        store.mark([m.envelope.id for m in store.messages()], MailStatus.DONE)
    finally:
        store.close()


@contextlib.contextmanager
def mailbox_locked(state_dir: Path, amqp_url: str, participant: str) -> Iterator[None]:
    """Hold a mailbox's write lock, as another writer would: a drain then takes its
    deliveries and stalls at its commit (for up to SQLite's 10 s busy timeout)."""
    path = store_path(state_dir, amqp_url, str(Address.participant(participant)))
    MailStore(path).close()  # the file and its schema exist
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")


# -- sending --------------------------------------------------------------------------


async def send_all(covey: Covey, to: str, subjects: list[str], body: str = "") -> list[str]:
    """Send one message per subject, 50 at a time; return their ids. The first goes
    alone: a fresh handle used by many callers at once opens a connection for each
    (see test_concurrent_sends_on_one_handle_share_one_connection_even_after_a_cut)."""
    if not subjects:
        return []
    ids = [(await covey.send(to, subjects[0], body)).id]
    for start in range(1, len(subjects), 50):
        batch = subjects[start : start + 50]
        ids += [e.id for e in await asyncio.gather(*(covey.send(to, s, body) for s in batch))]
    return ids


async def send_until_confirmed(
    covey: Covey, to: str, n: int, outcome: dict[str, str], attempts: int
) -> None:
    """Send message `n` until one attempt is confirmed, as a careful sender would: each
    attempt under its own subject (`mNNNNN.A`), its outcome in `outcome` ("confirmed",
    the exception's class, or "hung" past 60 s, far beyond covey's own 10 s bound)."""
    for attempt in range(attempts):
        subject = f"m{n:05d}.{attempt}"
        try:
            async with asyncio.timeout(60):
                await covey.send(to, subject)
            outcome[subject] = "confirmed"
            return
        except TimeoutError:
            outcome[subject] = "hung"
        except Exception as err:
            outcome[subject] = type(err).__name__
        await asyncio.sleep(0.2)  # a failed send: give the broker a moment
    raise AssertionError(f"message {n} was never confirmed in {attempts} attempts")


def tally_sends(tally: Tally, outcome: dict[str, str], subjects: list[str], dead: int) -> None:
    """Count `send_until_confirmed`'s attempts (`outcome`) against the subjects that
    reached the mailbox, into `tally` (its notes: the failures by kind, failed sends that
    arrived all the same, resent copies, and mail nobody sent)."""
    in_mailbox = set(subjects)
    confirmed = {s for s, how in outcome.items() if how == "confirmed"}
    failed = set(outcome) - confirmed
    tally.sent, tally.confirmed, tally.failed = len(outcome), len(confirmed), len(failed)
    tally.delivered = len(subjects)
    tally.duplicates = copies(subjects)
    tally.lost = len(confirmed - in_mailbox)
    tally.dead = dead
    logical = Counter(s.split(".")[0] for s in subjects)
    tally.notes.update(
        failures=dict(Counter(how for how in outcome.values() if how != "confirmed")),
        failed_but_delivered=len(failed & in_mailbox),
        resent_copies=sum(c - 1 for c in logical.values() if c > 1),
        strangers=len(in_mailbox - set(outcome)),
    )


def assert_sends_whole(
    outcome: dict[str, str], subjects: list[str], total: int, injected: str
) -> None:
    """What a careful sender is promised across a fault: some send failed (else the
    fault, `injected`, never reached it), each failure was BrokerUnavailable (no hang,
    no stray exception), nothing confirmed is lost, nothing is there twice or unsent,
    and every one of the `total` messages made it in the end."""
    in_mailbox = set(subjects)
    confirmed = {s for s, how in outcome.items() if how == "confirmed"}
    failures = Counter(how for how in outcome.values() if how != "confirmed")
    assert failures, f"{injected} never reached the sender: nothing was injected"
    assert set(failures) == {"BrokerUnavailable"}, failures
    assert not confirmed - in_mailbox, sorted(confirmed - in_mailbox)[:10]
    assert copies(subjects) == 0
    assert in_mailbox <= set(outcome)  # delivered ⊆ sent
    assert len({s.split(".")[0] for s in subjects}) == total


# -- processes ------------------------------------------------------------------------


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers until its reaper gets to it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop(process: subprocess.Popen[Any] | None) -> None:
    """SIGKILL a process this test started, if it still runs, and reap it."""
    if process is None:
        return
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)


# An agent for the supervisor tests: drains its mail as itself, says what it is (pid,
# process group, what it drained) in a file written atomically, then works for a long time.
PATIENT_AGENT = """
import json, os, subprocess, sys, time
out = sys.argv[1]
drained = subprocess.run(["covey", "inbox", "--json"], capture_output=True, text=True)
said = {
    "pid": os.getpid(),
    "pgid": os.getpgid(0),
    "drain_exit": drained.returncode,
    "drained": [m["id"] for m in json.loads(drained.stdout or "[]")],
}
with open(out + ".tmp", "w") as f:
    json.dump(said, f)
os.replace(out + ".tmp", out)
time.sleep(300)
"""
