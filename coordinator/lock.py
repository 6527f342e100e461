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
  locks, and `LockSession.lost` says so. With several broker nodes (`amqp_urls`)
  it opens on whichever answers first, and when that node goes, the lock goes
  with it: it never moves to another node.
* Attempts, and the slot's notes, use one channel the session keeps, reopened
  after a RESOURCE_LOCKED (a slot someone holds) closes it.
* Who holds a slot is written beside it, in `covey.lock.NAME[.SLOT].holder`
  (a note: newest wins), so that others can say "held by scout run R since T";
  the exclusive queue, not that note, is the lock. The same record goes into
  `….fence`, which only the slot's holders read: someone showing who holds the
  lock has the holder note's copies out for a moment, and the next holder must
  never miss the last fencing token (see Gateway.write_note). Both are written
  at once, so a take costs one confirm round trip for them.
* Waiters retry as soon as a `lock.released.NAME` event arrives on
  `covey.events`, and on a short timer for holders that died without saying.

A lock is also a lease. The broker frees a lock only when it stops hearing from
the holder's connection (two missed heartbeats, ~10–15 s), and a holder that is
merely stalled (SIGSTOP, a VM pause, a long GC) cannot know when that happened.
So while a session holds locks it renews a lease every `RENEW_SECONDS` with a
round trip that also proves ownership (a passive declare of its own exclusive
queue, which only the owning connection may make); the lease lasts
`LEASE_SECONDS` from the moment that round trip was *sent*. A session that finds
its lease past due (it just woke up) counts its locks as lost, and the agent's
guard (coordinator/guard.py) has stopped the agent by then. The bound a new
holder relies on, `TAKEOVER_SECONDS`, is that lease plus the guard's kill grace
plus a margin, counted by the new holder from when it took the lock: the old
holder's last renewal reached the broker before the broker freed the lock, so
its guard stopped the agent at most that long after. It assumes that the two
hosts' clocks run at similar rates (each side measures only its own intervals),
not that they agree; it does not rest on the lease being shorter than the
broker's detection (that only spares a briefly stalled holder its run). When a
whole host pauses (a VM), the guard pauses too, and on waking the agent may get
a few instructions in before its guard stops it: that is what fencing tokens
are for.

Each acquisition carries a fencing token, one more than the slot's previous
one, kept in the holder note and written over the lock connection itself: once
the broker frees a lock it has closed that connection, so a stale holder can
never write a note after the next holder did. A clean release marks the note
`released` before closing the connection; a holder that finds the previous note
not so marked waits out `TAKEOVER_SECONDS` before starting its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import BaseModel, ValidationError

from coordinator.envelope import now
from coordinator.errors import CoveyError, ExitCode
from coordinator.gateway import BROKER_ERRORS, Gateway, newest_copy, take_copies
from coordinator.guard import GRACE_SECONDS
from coordinator.logs import get_logger
from coordinator.settings import Settings
from coordinator.topology import EVENTS_EXCHANGE

log = get_logger(__name__)

LOCK_PREFIX = "covey.lock."
HEARTBEAT_SECONDS = 5  # a silent holder is declared dead after about two of these
RETRY_SECONDS = 1.0  # for holders that died without publishing lock.released
RENEW_SECONDS = 1.0  # how often a holder proves it still owns its locks
LEASE_SECONDS = 5.0  # how long one proof lasts: well under the broker's ~10-15 s detection
TAKEOVER_MARGIN = 1.0  # for scheduling delays in the guard and the holder
TAKEOVER_SECONDS = LEASE_SECONDS + GRACE_SECONDS + TAKEOVER_MARGIN
HOLDER_SUFFIX = ".holder"  # the slot's holder note, for showing who holds it
FENCE_SUFFIX = ".fence"  # the same, read by the slot's holders only: see _previous_holder
NOTE_PATIENCE = 30.0  # how long a hidden holder note (a reader has it out) is waited for
NOTE_RELEASE_TIMEOUT = 5.0  # marking a note released is worth this much of a release


class Holder(BaseModel):
    """Who holds a lock: enough to find the run and the process."""

    agent: str
    run_id: str
    host: str
    pid: int
    since: datetime
    token: int = 0  # the fencing token of this acquisition; 0: written before tokens existed
    released: bool = False  # set by a clean release, before the lock connection closes

    @classmethod
    def me(cls, agent: str, run_id: str, host: str) -> Holder:
        """This process, running `agent`, on `host` (Settings.host)."""
        return cls(agent=agent, run_id=run_id, host=host, pid=os.getpid(), since=now())

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
    holder: Holder  # as written in the slot's note, with this acquisition's fencing token
    taken_at: float  # monotonic, when the broker gave it to us
    takeover: bool  # the previous holder did not release it cleanly: wait out its lease

    @property
    def token(self) -> int:
        return self.holder.token

    def takeover_wait(self) -> float:
        """Seconds still to wait before the previous holder's agent is surely stopped."""
        if not self.takeover:
            return 0.0
        return max(0.0, self.taken_at + TAKEOVER_SECONDS - time.monotonic())


Renewed = Callable[[float], None]


class LockSession:
    """A connection kept only for locks, and the lease on them. When the connection drops
    or the lease lapses unrenewed, every lock on it is lost."""

    def __init__(self, gateway: Gateway, holder: Holder) -> None:
        self._gateway = gateway
        self.holder = holder
        self.held: list[HeldLock] = []
        self.lost = asyncio.Event()
        self.valid_until = 0.0  # monotonic; the lease, once something is held
        self.on_renew: list[Renewed] = []  # told each new `valid_until` (the agent's guard)
        self._closing = False
        self._renewing: asyncio.Task[None] | None = None
        self._kept: AbstractChannel | None = None
        # The fence copies a take read, dropped once its own copy is confirmed.
        self._fence_read: dict[str, list[AbstractIncomingMessage]] = {}
        gateway.on_lost(self._on_close)

    @classmethod
    async def open(cls, settings: Settings, holder: Holder) -> LockSession:
        name = f"covey lock {holder.agent} {holder.run_id}"
        # Never reconnecting: the locks die with this connection, and a new one holds none.
        gateway = await Gateway.connect(
            settings, name, heartbeat=HEARTBEAT_SECONDS, reconnects=False
        )
        return cls(gateway, holder)

    @property
    def gateway(self) -> Gateway:
        """The lock connection: what is written on it is fenced by the locks themselves."""
        return self._gateway

    def _on_close(self) -> None:
        if not self._closing:
            self.lost.set()

    def valid(self) -> bool:
        """Whether the locks are still ours: the connection is up and the lease unexpired.

        A session that was frozen past its lease finds out here, before its renewal
        task has run again, and counts its locks as lost from then on."""
        if self.lost.is_set():
            return False
        if self._renewing is not None and time.monotonic() > self.valid_until:
            log.warning("lock lease lapsed", locks=[h.spec.name for h in self.held])
            self.lost.set()
            return False
        return True

    async def __aenter__(self) -> LockSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release everything: mark each note released (while the locks are surely still
        ours), then close the connection, which deletes its exclusive queues."""
        self._closing = True
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        if self.held and self.valid() and self._gateway.alive:
            try:
                async with asyncio.timeout(NOTE_RELEASE_TIMEOUT):
                    await self._mark_released()
            except (TimeoutError, *BROKER_ERRORS) as err:
                # The next holder then waits out the lease: slower, never unsafe.
                log.warning(
                    "could not mark the locks released", problem=str(err) or type(err).__name__
                )
        await self._gateway.close()
        self.held.clear()

    async def _mark_released(self) -> None:
        for held in self.held:
            await self._write_holder(held.queue, held.holder.model_copy(update={"released": True}))

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
                    asked = time.monotonic()
                    if await self._gateway.take_exclusive(queue, await self._channel()):
                        return await self._took(spec, queue, asked)
                left = deadline - time.monotonic()
                if left <= 0 or released is None:
                    states = [await slot_state(self._gateway, q) for q in spec.queues]
                    raise LockBusy(spec, [holder for held, holder in states if held])
                await _first_of(released, stop or asyncio.Event(), min(left, RETRY_SECONDS))
                if stop is not None and stop.is_set():
                    raise Interrupted(f"told to stop while waiting for lock {spec.name}")
                released.clear()
        finally:
            if watcher is not None and not watcher.is_closed:
                await watcher.close()

    async def _took(self, spec: LockSpec, queue: str, asked: float) -> HeldLock:
        """The slot is ours: give it the next fencing token and start the lease."""
        if self._renewing is None:
            # The exclusive declare was itself a round trip that proved ownership.
            self.valid_until = asked + LEASE_SECONDS
            self._renewing = asyncio.create_task(self._renew(queue))
        previous = await self._previous_holder(queue)
        token = (previous.token if previous else 0) + 1
        takeover = previous is not None and not previous.released
        holder = self.holder.model_copy(update={"since": now(), "token": token})
        await self._write_holder(queue, holder)
        held = HeldLock(spec, queue, holder, asked, takeover)
        self.held.append(held)
        if takeover:
            log.info(
                "took a lock its previous holder did not release; its lease is waited out",
                lock=spec.name,
                previous=previous.describe() if previous else None,
                wait_seconds=TAKEOVER_SECONDS,
            )
        return held

    async def _renew(self, queue: str) -> None:
        """Every RENEW_SECONDS, prove on the lock connection that `queue` (the first lock
        taken; they all live and die with the connection) is still ours; each proof
        extends the lease to LEASE_SECONDS from when it was sent."""
        channel: AbstractChannel | None = None  # kept; it goes with the connection
        # `_closing` as well as the cancel from `close`: a cancel can be lost (see
        # `supervisor.Supervisor.serve`), and `close` waits for this task.
        while not (self.lost.is_set() or self._closing):
            await asyncio.sleep(RENEW_SECONDS)
            if not self.valid():
                return
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self.valid_until - sent):
                    if channel is None or channel.is_closed:
                        channel = await self._gateway.open_channel()
                    await channel.declare_queue(queue, passive=True)
            except (TimeoutError, *BROKER_ERRORS) as err:
                if not self._closing:  # one line: a lost lock is news, not a bug
                    log.warning(
                        "lock lease not renewed; the locks are lost",
                        problem=str(err) or type(err).__name__,
                    )
                    self.lost.set()
                return
            if not self.valid():  # the answer came, but too late to count
                return
            self.valid_until = sent + LEASE_SECONDS
            for listener in self.on_renew:
                listener(self.valid_until)

    # Slots are taken, and their notes read and written, on one kept channel (a take, a
    # read and a confirmed write are then a round trip each, with no channel to open).

    async def _channel(self) -> AbstractChannel:
        if self._kept is None or self._kept.is_closed:
            self._kept = await self._gateway.open_channel(confirms=True)
        return self._kept

    async def _previous_holder(self, queue: str) -> Holder | None:
        """The slot's last holder as it left the fence note (read under the slot's lock,
        so no holder writes it meanwhile, and no other reader has its copies out); None
        when the slot was never taken. The copies read are kept, to be dropped once this
        take's own copy is confirmed (`_write_holder`)."""
        fence_queue = queue + FENCE_SUFFIX
        channel = await self._channel()
        try:
            fence = await channel.get_queue(fence_queue, ensure=False)
            copies = await take_copies(fence)
        except aiormq.exceptions.ChannelNotFoundEntity:
            # No fence (the channel reopens): the slot was never taken, or last taken
            # before fences existed, when its holder note held the token.
            return await _patient_previous_holder(self._gateway, queue + HOLDER_SUFFIX)
        if not copies:
            # Its first writer died between declaring and writing it (a holder's copies
            # out when its connection died are on their way back): wait, as for a note.
            return await _patient_previous_holder(self._gateway, fence_queue)
        self._fence_read[queue] = copies
        return _holder_from(newest_copy(copies).body, fence_queue)

    async def _write_holder(self, queue: str, holder: Holder) -> None:
        """Write `holder` into the slot's fence and holder notes at once, over the lock
        connection (fenced), then drop the fence copies this take read."""
        body = holder.model_dump_json().encode()
        version = holder.token * 2 + holder.released  # a release is newer than its take
        notes = (queue + FENCE_SUFFIX, queue + HOLDER_SUFFIX)
        await self._gateway.publish_notes(await self._channel(), notes, body, version)
        for copy in self._fence_read.pop(queue, []):
            if not copy.channel.is_closed:  # else the broker has put it back: next time
                await copy.ack()

    async def _watch_releases(self, spec: LockSpec) -> tuple[AbstractChannel, asyncio.Event]:
        """Subscribe to `lock.released.NAME`; the caller closes the channel when done."""
        released = asyncio.Event()

        async def on_release(message: AbstractIncomingMessage) -> None:
            released.set()

        channel = await self._gateway.open_channel()
        keys = [f"lock.released.{spec.name}"]
        await self._gateway.listen(channel, EVENTS_EXCHANGE, keys, on_release)
        return channel, released


async def slot_state(gateway: Gateway, queue: str) -> tuple[bool, Holder | None]:
    """Whether the lock slot `queue` is held, and by whom when its note says.

    The holder may be unknown for a moment while a new holder writes its note.
    """
    if await gateway.held(queue) is None:
        return False, None  # no queue, no lock
    return True, await _holder_of(gateway, queue + HOLDER_SUFFIX)


async def _holder_of(gateway: Gateway, note_queue: str) -> Holder | None:
    """Who the slot's note says holds it, for showing; None when the note is missing or
    unreadable (unlike `_holder_from`, which must count an unreadable note as unreleased).
    A person in a provisioned namespace may not read agents' notes: to them the slot is
    held by someone unnamed."""
    try:
        note = await gateway.read_note(note_queue)
    except aiormq.exceptions.ChannelAccessRefused:
        return None
    try:
        return Holder.model_validate_json(note) if note is not None else None
    except ValidationError:
        return None


async def _patient_previous_holder(gateway: Gateway, note_queue: str) -> Holder | None:
    """The slot's note, when its queue looked empty: that is waited out, since answering
    "never written" would start the fencing tokens again from 1. Only a note queue that
    does not exist, or stays empty for NOTE_PATIENCE (its first writer died between
    declaring and writing it), counts as never written.
    """
    deadline = time.monotonic() + NOTE_PATIENCE
    while True:
        note = await gateway.read_note(note_queue)
        if note is not None:
            return _holder_from(note, note_queue)
        if not await gateway.exists(note_queue) or time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)


def _holder_from(note: bytes, note_queue: str) -> Holder:
    try:
        return Holder.model_validate_json(note)
    except ValidationError:
        log.warning("unreadable holder note; counted as unreleased", queue=note_queue)
        return Holder(agent="unknown", run_id="unknown", host="?", pid=0, since=now())
