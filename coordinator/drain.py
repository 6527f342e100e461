"""Filling the mailbox (mailbox.py, the state) from the participant's queue (the transport).

AMQP has no peek and no "keep this one for later", so covey uses the inbox
pattern: `drain` moves deliveries from the participant's queue into a local
SQLite file, committing them *before* acking them to the broker. A crash
between the two makes the broker deliver again, and the store drops the
duplicate by message id, so nothing is lost and nothing shows twice.

A delivery that is not a valid envelope is copied to `covey.dead` with the
reason (confirmed) and only then acked: it never reaches the mailbox, never
stops the drain, and is never lost.

A mailbox that cannot be written (read-only, corrupt, its disk full) must not
cost mail delivery attempts: a drain checks what it can before it takes any
delivery, bounds what it takes by the free space, and stops at the first
failed write, handing back only what it had not filed. Each of these is a
`MailboxUnusable` naming the file, the problem and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator.errors import (
    BrokerUnavailable,
    CoveyError,
    InvalidEnvelope,
    MailboxBusy,
    MailboxUnusable,
)
from coordinator.logs import get_logger
from coordinator.mailbox import MAX_PREFETCH, Mail, MailStore

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

    from coordinator.envelope import Envelope
    from coordinator.gateway import Gateway
    from coordinator.identity import SenderCheck

log = get_logger(__name__)

IDLE_SECONDS = 2.0  # how long a drain waits for deliveries it expects before giving up
CALLBACK_SECONDS = 0.05  # for the callbacks of deliveries that came before a cancel-ok
COMMIT_BATCH = 100  # a drain commits this many at once (one fsync) ...
COMMIT_SECONDS = 0.02  # ... or what came before a pause this long


async def drain(
    gateway: Gateway,
    store: MailStore,
    queue_name: str,
    limits: Admission,
    wait: float | None = None,
) -> list[Envelope]:
    """Move the messages waiting in `queue_name` into `store`; return the new ones.
    What `limits` does not admit goes to `covey.dead` instead, with the reason.

    With `wait`, block up to that many seconds for a first message when the queue
    is empty, then take what is waiting by the time it came (the rest of a
    burst). A drain takes what was waiting, not mail that keeps arriving
    meanwhile (the next drain gets that).

    It works in rounds with a full window, because a consumer cancelled while the
    broker still has deliveries in flight to it gets them put back (on quorum
    queues some can even follow the cancel-ok), and every return counts towards
    the delivery limit (RabbitMQ before 4.3): innocent mail would creep towards
    `covey.dead`. So a round asks for exactly as many messages as are ready (at
    most MAX_PREFETCH) and cancels only when the window is full and nothing can
    be in flight. Within the round each delivery is committed to the store as it
    comes, and the acks go at the end: a drain killed mid-round hands back
    deliveries the store already holds (they come back once, recognised), and
    mail that no store holds is exposed only for the moment it takes to commit.
    The store's work runs in a thread, so the event loop never waits on the disk.
    """
    from coordinator.gateway import translated  # the broker is only needed here

    await asyncio.to_thread(store.check_writable)
    filing = _Filing(gateway, store, queue_name, limits)
    target: int | None = None  # how many this drain takes in all: what was waiting
    first_wait = wait  # only a first round may wait for mail to come
    with translated(f"fetch mail from {queue_name}"):
        async with gateway.operation_channel() as channel:  # one for every round
            while target is None or filing.taken < target:
                queue = await gateway.queue(queue_name, channel)
                ready = queue.declaration_result.message_count or 0
                if ready == 0 and first_wait is None:
                    # Nothing waiting: none came, or another drain of this mailbox took
                    # what was (it files it). A consumer waiting for nothing never returns.
                    break
                if target is None:
                    target = filing.taken + max(ready, 1)
                window = await _window(store, limits, ready, first=filing.taken == 0)
                timeout = IDLE_SECONDS if ready or first_wait is None else first_wait
                batch = await _take(queue, window, timeout, filing)
                await filing.settle(batch)
                if filing.failure is not None:
                    # Stop at the first failed write: what was filed is acked; closing the
                    # channel hands the rest back, once.
                    raise filing.failure
                if len(batch) < window:
                    break  # waited long enough, or another consumer took some
                if ready == 0:  # the first round, waiting (any other stops when none is ready)
                    target = None  # mail came while we waited: take what is waiting now, too
                first_wait = None
    return [mail.envelope for mail in filing.added]


async def _window(store: MailStore, limits: Admission, ready: int, first: bool) -> int:
    """How many deliveries a round takes: those `ready` (or one to wait for), at most
    MAX_PREFETCH, and no more than the free space holds at worst: a write that fails
    hands back every delivery still in the window (a count each towards the limit).
    The `first` round checks that the file is sound before it takes any (in a thread:
    that reads every page)."""
    if first:
        await asyncio.to_thread(store.check_sound)
    return min(max(ready, 1), MAX_PREFETCH, store.room(limits.max_body_bytes))


async def _take(
    queue: AbstractQueue, window: int, first_timeout: float, filing: _Filing
) -> list[AbstractIncomingMessage]:
    """Consume up to `window` deliveries: wait `first_timeout` for the first, then
    IDLE_SECONDS for each next one. They are committed as they come, COMMIT_BATCH
    at a time or after COMMIT_SECONDS without more (see `_Filing.commit`; what comes
    meanwhile waits in `deliveries`); none is acked yet, so the window stays full.
    Returns what was committed; at the first commit that fails it stops
    (`filing.failure` says why)."""
    deliveries: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()

    # A closed channel (broker gone, connection cut) ends the wait at once.
    def on_close(*_: object) -> None:
        deliveries.put_nowait(None)

    queue.channel.close_callbacks.add(on_close)
    await queue.channel.set_qos(prefetch_count=window)
    consumer_tag = await queue.consume(deliveries.put, no_ack=False)
    batch: list[AbstractIncomingMessage] = []
    arrived: list[AbstractIncomingMessage] = []  # not committed yet
    timeout = first_timeout
    try:
        while len(batch) + len(arrived) < window:
            try:
                if deliveries.empty():
                    async with asyncio.timeout(COMMIT_SECONDS if arrived else timeout):
                        delivery = await deliveries.get()
                else:  # they pile up during a commit: no timer each (~5 µs of ~100)
                    delivery = deliveries.get_nowait()
            except TimeoutError:
                if not arrived:
                    break
                delivery = None  # a pause: commit what came
            else:
                if delivery is None:
                    raise ConnectionError("the channel closed")
                arrived.append(delivery)
                timeout = IDLE_SECONDS
            if delivery is None or len(arrived) >= COMMIT_BATCH:
                if not await filing.commit(arrived):
                    return batch
                batch, arrived = batch + arrived, []
        if not await filing.commit(arrived):
            return batch
        batch += arrived
    finally:
        queue.channel.close_callbacks.discard(on_close)  # the channel serves more rounds
        if not queue.channel.is_closed:
            await queue.cancel(consumer_tag)
    if len(batch) < window:
        # A partial window: deliveries sent before the cancel may still be in their
        # callbacks; take them now rather than hand them back.
        await asyncio.sleep(CALLBACK_SECONDS)
        late: list[AbstractIncomingMessage] = []
        while not deliveries.empty():
            if (delivery := deliveries.get_nowait()) is not None:
                late.append(delivery)
        if await filing.commit(late):
            batch += late
    return batch


@dataclass(frozen=True, slots=True)
class Admission:
    """What a mailbox admits: bodies up to `max_body_bytes`, from genuine senders."""

    max_body_bytes: int
    senders: SenderCheck


class Subscription:
    """A consumer kept on a participant's queue while its handle waits for mail.

    Each delivery is filed as it arrives (committed, then acked), so a wait
    returns as soon as mail is in the mailbox, rather than setting a consumer up
    and tearing it down per wait. Deliveries are filed one batch at a time, in
    order; `close` cancels the consumer and files what was still on its way.
    A quorum queue may still send a delivery after the cancel-ok; that one goes
    back to the queue (one count towards its delivery limit) and comes again.
    """

    def __init__(self, filing: _Filing, queue: AbstractQueue) -> None:
        self._filing, self._queue = filing, queue
        self._consumer_tag: str | None = None
        self._waiting: list[AbstractIncomingMessage] = []  # delivered, not yet filed
        self._filing_one_batch = asyncio.Lock()
        self._news = asyncio.Event()  # filed something, or failed
        self._failure: CoveyError | None = None

    @classmethod
    async def start(
        cls, gateway: Gateway, store: MailStore, queue_name: str, limits: Admission
    ) -> Subscription:
        """Subscribe; raises TopologyMissing when the queue does not exist."""
        from coordinator.gateway import translated

        await asyncio.to_thread(store.check_writable)  # see there and at `drain`
        window = await _window(store, limits, MAX_PREFETCH, first=True)
        with translated(f"subscribe to {queue_name}"):
            channel = await gateway.open_channel(prefetch=window)
            queue = await gateway.queue(queue_name, channel)
            subscription = cls(_Filing(gateway, store, queue_name, limits), queue)
            channel.close_callbacks.add(subscription._on_close)
            subscription._consumer_tag = await queue.consume(subscription._on_delivery)
        return subscription

    @property
    def active(self) -> bool:
        return self._failure is None and not self._queue.channel.is_closed

    async def next(self, timeout: float) -> list[Mail]:
        """What was filed since the last call, as filed (unread), oldest first; waits up
        to `timeout` s for something."""
        if not self._filing.added and self._failure is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._news.wait()
        self._news.clear()
        new, self._filing.added = self._filing.added, []
        if not new and self._failure is not None:
            raise self._failure  # what was filed before it is returned first
        # In the store's order (see `MailStore.messages`): by creation, then as filed.
        return sorted(new, key=lambda mail: mail.created_at)

    async def close(self) -> None:
        """Cancel, file what was delivered meanwhile, and close the channel."""
        channel = self._queue.channel
        try:
            if self._consumer_tag is not None and not channel.is_closed:
                await self._queue.cancel(self._consumer_tag)
                await asyncio.sleep(CALLBACK_SECONDS)  # deliveries before the cancel-ok
                await self._file_waiting()
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _on_delivery(self, delivery: AbstractIncomingMessage) -> None:
        self._waiting.append(delivery)
        await self._file_waiting()

    async def _file_waiting(self) -> None:
        from coordinator.gateway import translated

        async with self._filing_one_batch:
            batch, self._waiting = self._waiting, []
            if not batch or self._failure is not None:
                return  # after a failure the channel goes: the broker redelivers
            try:
                with translated("file mail"):
                    await self._filing.file(batch)
            except CoveyError as err:
                self._failure = err
            self._news.set()

    def _on_close(self, *_: object) -> None:
        if self._failure is None:
            self._failure = BrokerUnavailable("lost RabbitMQ while waiting for mail")
        self._news.set()


class _Filing:
    """Files batches of deliveries: valid envelopes into the store, the rest to covey.dead."""

    def __init__(
        self, gateway: Gateway, store: MailStore, queue_name: str, limits: Admission
    ) -> None:
        self.gateway, self.store, self.queue_name = gateway, store, queue_name
        self.limits = limits
        self.taken = 0
        self.added: list[Mail] = []
        self.failure: CoveyError | None = None  # the store's, at the first commit it refused
        self._rejected: list[tuple[AbstractIncomingMessage, InvalidEnvelope]] = []

    async def file(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        """Commit, dead-letter what is not fit, then ack: the whole of filing a batch."""
        if not await self.commit(batch) and self.failure is not None:
            raise self.failure  # nothing acked: the batch goes back with the channel
        await self.settle(batch)

    async def commit(self, batch: Sequence[AbstractIncomingMessage]) -> bool:
        """Commit the valid envelopes to the store; keep the rest for `settle`.
        From here on, a crash costs a redelivery that the store recognises.
        False, with `failure` set, when the store refuses: then and ever after (a
        drain stops at the first failed write), and nothing of `batch` is kept.
        The store's part runs in a thread, one hop and one fsync per batch, while the
        event loop goes on serving the broker and everything else; parsing stays
        here, as CPU work holds the interpreter wherever it runs."""
        if self.failure is not None:
            return False
        if not batch:
            return True
        from coordinator.envelope import Envelope  # the mailbox alone does without it

        rejected: list[tuple[AbstractIncomingMessage, InvalidEnvelope]] = []
        parsed: list[tuple[AbstractIncomingMessage, Envelope]] = []
        for delivery in batch:
            try:
                parsed.append((delivery, Envelope.from_delivery(delivery)))
            except InvalidEnvelope as invalid:
                rejected.append((delivery, invalid))
        try:
            added, refused = await asyncio.to_thread(self._check_and_add, parsed)
        except (MailboxUnusable, MailboxBusy) as err:
            self.failure = err
            return False
        self.added += added
        self._rejected += rejected + refused  # dead-lettered by `settle`, once committed
        return True

    def _check_and_add(
        self, parsed: Sequence[tuple[AbstractIncomingMessage, Envelope]]
    ) -> tuple[list[Mail], list[tuple[AbstractIncomingMessage, InvalidEnvelope]]]:
        """The store's part of `commit`, in a thread: check each envelope against what
        the store holds and the limits, and add those that pass in one transaction.
        Returns what was new and what was refused; changes nothing of this object
        (the loop does, with what it returns), and reads of a delivery only its
        properties, never its channel."""
        stored = self.store.stored(envelope.id for _, envelope in parsed)
        valid: list[Envelope] = []
        refused: list[tuple[AbstractIncomingMessage, InvalidEnvelope]] = []
        for delivery, envelope in parsed:
            try:
                valid.append(self._check(delivery, envelope, stored.get(envelope.id)))
            except InvalidEnvelope as invalid:
                refused.append((delivery, invalid))
        return self.store.add(valid), refused

    async def settle(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        """Dead-letter what `commit` refused (confirmed), then ack the whole batch."""
        if not batch:
            return
        rejected, self._rejected = self._rejected, []
        for delivery, problem in rejected:
            await self.gateway.dead_letter(
                delivery, self.queue_name, problem.reason, problem.detail
            )
            log.warning(
                "dead-lettered a delivery",
                queue=self.queue_name,
                reason=problem.reason,
                detail=problem.detail,
                message_id=delivery.message_id,
            )
        await batch[-1].ack(multiple=True)
        self.taken += len(batch)

    def _check(
        self, delivery: AbstractIncomingMessage, envelope: Envelope, stored: Envelope | None
    ) -> Envelope:
        if stored is not None:
            # A redelivery of what the mailbox holds is fine as it is (the store drops
            # it); another message under the same id would be silently lost, so it is not.
            if stored.model_dump() != envelope.model_dump():
                raise InvalidEnvelope("invalid", f"id {envelope.id} is already another message's")
            return envelope
        if spoofed := self.limits.senders.problem(envelope.sender, delivery.user_id):
            raise InvalidEnvelope("spoofed", spoofed)
        limit = self.limits.max_body_bytes
        if envelope.body_size() > limit:
            raise InvalidEnvelope("invalid", f"body is {envelope.body_size()} bytes, over {limit}")
        if envelope.is_expired():
            raise InvalidEnvelope("expired", f"expired at {envelope.expires_at}")
        return envelope
