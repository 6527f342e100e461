"""Locks: who may run now, enforced by the broker, with nothing to go stale.

A lock is an exclusive queue, `covey.lock.NAME` (a semaphore of N slots is N
of them, `covey.lock.NAME.0` … `.N-1`). RabbitMQ lets only the connection that
declared an exclusive queue use it; a second declare fails with
RESOURCE_LOCKED. When the holder's connection closes — released, crashed,
killed with -9, or cut off (heartbeats notice within seconds) — the broker
deletes the queue and the lock is free. There is no lock file and no TTL to
guess.

Rules that keep it honest:

* The lock connection is kept only for locks and never reconnects by itself:
  a reconnecting client would re-declare the queue and could "hold" a lock that
  someone else took in between. A holder whose connection drops has lost its
  locks, and `LockSession.lost` says so.
* Each attempt uses a throwaway channel, since RESOURCE_LOCKED closes it.
* Who holds a slot is written beside it, in `covey.lock.NAME[.SLOT].holder`
  (one message, newest wins), so that others can say "held by scout run R
  since T"; the exclusive queue, not that note, is the lock.
* Waiters retry as soon as a `lock.released.NAME` event arrives on
  `covey.events`, and on a short timer for holders that died without saying.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pydantic import BaseModel, ValidationError

from coordinator.bus import open_connection, read_note, write_note
from coordinator.envelope import now
from coordinator.errors import CoveyError, ExitCode
from coordinator.settings import Settings
from coordinator.topology import EVENTS_EXCHANGE

LOCK_PREFIX = "covey.lock."
HEARTBEAT_SECONDS = 5  # a silent holder is declared dead after about two of these
RETRY_SECONDS = 1.0  # for holders that died without publishing lock.released


class Holder(BaseModel):
    """Who holds a lock: enough to find the run and the process."""

    agent: str
    run_id: str
    host: str
    pid: int
    since: datetime

    @classmethod
    def me(cls, agent: str, run_id: str) -> Holder:
        return cls(
            agent=agent, run_id=run_id, host=socket.gethostname(), pid=os.getpid(), since=now()
        )

    def describe(self) -> str:
        return (
            f"{self.agent} run {self.run_id} on {self.host} (pid {self.pid}) "
            f"since {self.since.isoformat(timespec='seconds')}"
        )


@dataclass(frozen=True, slots=True)
class LockSpec:
    """A lock by name; with `slots` > 1, a semaphore."""

    name: str
    slots: int = 1

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"lock {self.name}: a semaphore needs at least 1 slot")

    @classmethod
    def for_agent(cls, agent: str) -> LockSpec:
        """The lock that keeps one agent from running twice at once, anywhere."""
        return cls(f"agent.{agent}")

    @property
    def queues(self) -> list[str]:
        base = LOCK_PREFIX + self.name
        return [base] if self.slots == 1 else [f"{base}.{slot}" for slot in range(self.slots)]


class LockBusy(CoveyError):
    """Every slot of the lock is held; the message says by whom."""

    exit_code = ExitCode.SKIPPED_BUSY

    def __init__(self, spec: LockSpec, holders: list[Holder | None]) -> None:
        described = "; ".join(h.describe() if h else "a holder still starting" for h in holders)
        super().__init__(f"lock {spec.name} is busy, held by {described or 'nobody we could see'}")
        self.spec = spec
        self.holders = holders


class Interrupted(Exception):
    """A stop was asked for while waiting for a lock."""


async def _first_of(one: asyncio.Event, other: asyncio.Event, timeout: float) -> None:
    """Wait until either event is set, or `timeout` seconds pass."""
    waits = [asyncio.create_task(one.wait()), asyncio.create_task(other.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


@dataclass(frozen=True, slots=True)
class HeldLock:
    spec: LockSpec
    queue: str
    holder: Holder


class LockSession:
    """A connection kept only for locks. When it drops, every lock on it is lost."""

    def __init__(self, connection: AbstractConnection, holder: Holder) -> None:
        self._connection = connection
        self.holder = holder
        self.held: list[HeldLock] = []
        self.lost = asyncio.Event()
        self._closing = False
        connection.close_callbacks.add(self._on_close)

    @classmethod
    async def open(cls, settings: Settings, holder: Holder) -> LockSession:
        name = f"covey lock {holder.agent} {holder.run_id}"
        return cls(await open_connection(settings, name, heartbeat=HEARTBEAT_SECONDS), holder)

    def _on_close(self, *_: object) -> None:
        if not self._closing:
            self.lost.set()

    async def __aenter__(self) -> LockSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release everything: closing the connection deletes its exclusive queues."""
        self._closing = True
        if not self._connection.is_closed:
            await self._connection.close()
        self.held.clear()

    async def acquire(
        self, spec: LockSpec, wait: float = 0.0, stop: asyncio.Event | None = None
    ) -> HeldLock:
        """Take a free slot of `spec`, waiting up to `wait` seconds; else raise LockBusy.
        A `stop` set while waiting raises Interrupted."""
        deadline = time.monotonic() + wait
        watcher, released = await self._watch_releases(spec) if wait > 0 else (None, None)
        try:
            while True:
                for queue in spec.queues:
                    if await self._try(queue):
                        holder = self.holder.model_copy(update={"since": now()})
                        await self._note_holder(queue, holder)
                        held = HeldLock(spec, queue, holder)
                        self.held.append(held)
                        return held
                left = deadline - time.monotonic()
                if left <= 0 or released is None:
                    states = [await slot_state(self._connection, q) for q in spec.queues]
                    raise LockBusy(spec, [holder for held, holder in states if held])
                await _first_of(released, stop or asyncio.Event(), min(left, RETRY_SECONDS))
                if stop is not None and stop.is_set():
                    raise Interrupted(f"told to stop while waiting for lock {spec.name}")
                released.clear()
        finally:
            if watcher is not None and not watcher.is_closed:
                await watcher.close()

    async def _try(self, queue: str) -> bool:
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(queue, exclusive=True, durable=False)
        except aiormq.exceptions.ChannelLockedResource:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()
        return True

    async def _note_holder(self, queue: str, holder: Holder) -> None:
        await write_note(self._connection, queue + ".holder", holder.model_dump_json().encode())

    async def _watch_releases(self, spec: LockSpec) -> tuple[AbstractChannel, asyncio.Event]:
        """Subscribe to `lock.released.NAME`; the caller closes the channel when done."""
        released = asyncio.Event()
        channel = await self._connection.channel()
        events = await channel.declare_queue(exclusive=True, auto_delete=True)
        await events.bind(EVENTS_EXCHANGE, f"lock.released.{spec.name}")

        async def on_release(message: AbstractIncomingMessage) -> None:
            released.set()

        await events.consume(on_release, no_ack=True)
        return channel, released


async def slot_state(connection: AbstractConnection, queue: str) -> tuple[bool, Holder | None]:
    """Whether the lock slot `queue` is held, and by whom when its note says.

    The holder may be unknown for a moment while a new holder writes its note.
    """
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)  # succeeds only for our own slot
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False, None  # no queue, no lock
    except aiormq.exceptions.ChannelLockedResource:
        pass  # held by another connection
    finally:
        if not channel.is_closed:
            await channel.close()
    return True, await _read_note(connection, queue + ".holder")


async def _read_note(connection: AbstractConnection, note_queue: str) -> Holder | None:
    note = await read_note(connection, note_queue)
    try:
        return Holder.model_validate_json(note) if note is not None else None
    except ValidationError:
        return None
