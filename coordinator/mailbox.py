"""The mailbox: a participant's mail as state (SQLite), filled from its queue (the transport).

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
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.envelope import Envelope
from coordinator.errors import (
    BadInput,
    BrokerUnavailable,
    ConfigError,
    CoveyError,
    InvalidEnvelope,
    MailboxBusy,
    MailboxUnusable,
    NotFound,
)
from coordinator.home import store_path as store_path  # re-exported
from coordinator.logs import get_logger

if TYPE_CHECKING:  # the store works without the broker; only `drain` needs it
    from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

    from coordinator.gateway import Gateway
    from coordinator.identity import SenderCheck

log = get_logger(__name__)

SCHEMA_VERSION = 1
SHORT_ID = 12  # characters of an id shown in listings; any unique prefix is accepted back
MIN_PREFIX = 4

# What one message may take on disk at worst, for bounding a drain by the free space.
# Measured: a body of unique words takes 5.6 times its size at the first commit (the
# row, its full-text index, and both again in the WAL before the checkpoint); the
# other fields and index entries about 1.3 KiB.
FOOTPRINT_PER_BODY_BYTE = 8
FOOTPRINT_EXTRA = 16 * 1024
RESERVE_BYTES = 1024 * 1024  # left free for SQLite itself (its -shm, a checkpoint)
KEEPS_MAIL = "the broker keeps your mail until then"
BUSY_SECONDS = 10.0  # how long a writer waits for another one's lock (SQLite's busy timeout)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    thread TEXT NOT NULL,
    in_reply_to TEXT,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    received_at TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'unread' CHECK (status IN ('unread', 'read', 'done'))
);
CREATE INDEX IF NOT EXISTS messages_status ON messages (status, created_at);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts
    USING fts5(subject, body, sender, content='messages', content_rowid='seq');
CREATE TRIGGER IF NOT EXISTS messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, subject, body, sender)
    VALUES (new.seq, new.subject, new.body, new.sender);
END;
CREATE TRIGGER IF NOT EXISTS messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, subject, body, sender)
    VALUES ('delete', old.seq, old.subject, old.body, old.sender);
END;
"""

_COLUMNS = (
    "id, sender, recipient, subject, body, thread, in_reply_to, created_at, expires_at, "
    "received_at, status"
)


class MailStatus(StrEnum):
    """What the participant did with a message. The values are what the store keeps
    (its `status` column): never change them."""

    UNREAD = "unread"
    READ = "read"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Mail:
    """One message in a mailbox, with what the participant did with it."""

    envelope: Envelope
    status: MailStatus
    received_at: datetime

    def to_dict(self, with_body: bool = False) -> dict[str, Any]:
        data = self.envelope.model_dump(mode="json", exclude={"body"})
        data.update(status=str(self.status), received_at=self.received_at.isoformat())
        if with_body:
            data["body"] = self.envelope.body
        return data


class MailStore:
    """One participant's mailbox file. Every write commits before it returns.

    Its methods are blocking (a commit waits for an fsync, a write for another
    process's lock) and safe to call from any thread: the sync API calls them
    directly, and async code (a drain, a subscription) through `asyncio.to_thread`
    so that the event loop never waits on the disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection, usable from any thread, and one lock that every use of it
        # holds (see `_sql`), rather than a single-thread executor owning it: the sync
        # API (`Covey.read`, `done`, `search`) then stays a plain call on the caller's
        # thread, async code needs nothing more than `asyncio.to_thread`, and a method
        # calling another (`stored` calls `messages`; tests wrap `add`) cannot deadlock
        # on a queue it is itself running on. The lock also keeps a transaction whole:
        # statements of two threads never interleave within one BEGIN ... COMMIT.
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False
            )
            self._into_wal()
            # FULL: a commit is on disk before the broker hears the ack, even if the
            # machine, not just the process, goes down right after.
            self._db.execute("PRAGMA synchronous=FULL")
            if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                # IMMEDIATE: a second process creating it too waits, then finds it made.
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
        except (OSError, sqlite3.Error) as err:
            if isinstance(err, sqlite3.Error) and (unusable := self._unusable(err)):
                raise unusable from None  # corrupt, or no space even to open it
            raise ConfigError(
                f"cannot open the mailbox {path} ({err}): check state_dir (COVEY_STATE_DIR)"
            ) from None

    def close(self) -> None:
        with self._lock:  # after a commit still running in a thread (its drain cancelled)
            self._db.close()

    def _into_wal(self) -> None:
        """Put the file in WAL mode (it stays so). Turning a new file to WAL needs it to
        itself, and SQLite says "locked" at once to a second process opening it at the
        same moment (two drains on first use), without its busy wait: wait here."""
        deadline = time.monotonic() + BUSY_SECONDS
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                busy = getattr(err, "sqlite_errorname", "").startswith("SQLITE_BUSY")
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextlib.contextmanager
    def _sql(self) -> Iterator[None]:
        """Hold the connection (the lock) for one statement or transaction, and turn
        SQLite's failures that the user can fix into one line that says how; the rest
        (a bug in covey's SQL) stays what it is."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as err:
                if self._db.in_transaction:  # a failed COMMIT can leave it open
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                if unusable := self._unusable(err):
                    raise unusable from None
                raise

    def _unusable(self, err: sqlite3.Error) -> CoveyError | None:
        name = getattr(err, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return MailboxBusy(
                f"the mailbox {self.path} stayed locked by another process ({err}): "
                "another covey command may be writing to it; try again"
            )
        free = self._free()
        if name == "SQLITE_FULL" or (
            name.startswith("SQLITE_IOERR") and free is not None and free < RESERVE_BYTES
        ):
            return self._no_space()  # a full disk shows as an I/O error at times (opening)
        if name.startswith("SQLITE_READONLY"):
            return MailboxUnusable(
                f"the mailbox {self.path} is read-only ({err}): make it and its folder "
                f"writable (permissions; `lsattr`, `chattr -i`), then try again; {KEEPS_MAIL}"
            )
        if name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB":
            return self._corrupt(str(err))
        if name.startswith(("SQLITE_IOERR", "SQLITE_PERM")):
            return MailboxUnusable(
                f"cannot write the mailbox {self.path} ({err}): check the disk and the "
                f"file, then try again; {KEEPS_MAIL}"
            )
        return None

    def _corrupt(self, detail: str) -> MailboxUnusable:
        return MailboxUnusable(
            f"the mailbox {self.path} is corrupt ({detail}): move it aside (`sqlite3 FILE "
            f".recover` may save what it held) and try again; {KEEPS_MAIL}"
        )

    def _no_space(self, footprint: int = 0) -> MailboxUnusable:
        free = self._free()
        have = "" if free is None else f"{free} bytes free"
        need = f", {footprint + RESERVE_BYTES} needed for one message" if footprint else ""
        return MailboxUnusable(
            f"no space left on the device holding the mailbox {self.path} ({have}{need}): "
            f"free some space, then try again; {KEEPS_MAIL}"
        )

    def _free(self) -> int | None:
        """Bytes an unprivileged writer may still use on the mailbox's device (not the
        blocks reserved for root: covey leaves those to the system); None if unknown."""
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    def room(self, max_body_bytes: int) -> int:
        """How many messages surely fit on the device now, at their worst case (bodies of
        `max_body_bytes`), keeping RESERVE_BYTES free; MailboxUnusable when not one.
        Unknown free space bounds nothing (SQLite's own error then speaks)."""
        footprint = FOOTPRINT_PER_BODY_BYTE * max_body_bytes + FOOTPRINT_EXTRA
        if (free := self._free()) is None:
            return MAX_PREFETCH
        fits = (free - RESERVE_BYTES) // footprint
        if fits < 1:
            raise self._no_space(footprint)
        return fits

    def check_sound(self) -> None:
        """MailboxUnusable unless SQLite finds the file's structure sound.

        `PRAGMA quick_check` reads every page once: about 25 ms for a 10,000-message
        mailbox of 1.3 KB bodies (18 MB), 190 ms at 13 KB bodies (143 MB) with the file
        in the page cache; about 95 and 580 ms from a cold cache. So a drain runs it
        only when it is about to take deliveries, not on every `covey inbox`."""
        with self._sql():
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(1)")]
        if problems != ["ok"]:
            raise self._corrupt(" ".join(" ".join(problems).split()))  # one line

    def _transaction(self) -> sqlite3.Connection:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:  # locked past the busy timeout
            raise MailboxBusy(
                f"the mailbox {self.path} stayed locked by another process ({err}): "
                "another covey command may be writing to it; try again"
            ) from None
        return self._db

    def check_writable(self) -> None:
        """Return once a write could commit now (waiting as SQLite does); else MailboxBusy.

        A drain checks before it takes deliveries, so that a mailbox it cannot write
        to leaves the mail with the broker, rather than in the hands of a drain that
        may die before it commits (each such hand-back counts towards the delivery
        limit). SQLite opens a file it may not write (immutable, a read-only mount)
        read-only and still grants the lock, so a write it must refuse is tried too."""
        with self._sql(), self._transaction() as db:
            db.execute("DELETE FROM messages WHERE 0")

    def add(self, envelopes: Sequence[Envelope]) -> list[Mail]:
        """Store envelopes in one transaction; return those not already present, as
        the mailbox now holds them (unread, received now)."""
        if not envelopes:
            return []
        received_at = datetime.now(UTC)
        received = received_at.isoformat()
        added = []
        with self._sql(), self._transaction() as db:
            for env in envelopes:
                cursor = db.execute(
                    f"INSERT OR IGNORE INTO messages ({_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'unread')",
                    (
                        env.id,
                        env.sender,
                        env.recipient,
                        env.subject,
                        env.body,
                        env.thread,
                        env.in_reply_to,
                        env.created_at.isoformat(),
                        env.expires_at.isoformat() if env.expires_at else None,
                        received,
                    ),
                )
                if cursor.rowcount:
                    added.append(Mail(env, MailStatus.UNREAD, received_at))
        return added

    def messages(self, include_done: bool = False, ids: Iterable[str] | None = None) -> list[Mail]:
        """Mail oldest first, newest last (where a model's attention is); only `ids`
        when given (done or not)."""
        if ids is None:
            where, params = ("1", []) if include_done else ("status != 'done'", [])
        else:
            params = list(ids)
            if not params:
                return []
            where = f"id IN ({', '.join('?' * len(params))})"
        with self._sql():
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY created_at, seq", params
            ).fetchall()
        return [_mail(row) for row in rows]

    def stored(self, ids: Iterable[str]) -> dict[str, Envelope]:
        """The envelopes among `ids` that this mailbox already holds."""
        return {mail.envelope.id: mail.envelope for mail in self.messages(ids=ids)}

    def get(self, id_or_prefix: str) -> Mail:
        return self.messages(ids=[self.resolve(id_or_prefix)])[0]

    def resolve(self, id_or_prefix: str) -> str:
        """The full id for an id or a unique prefix of one (as short as 4 characters)."""
        prefix = id_or_prefix.strip().lower()
        if len(prefix) < MIN_PREFIX:
            raise BadInput(f"message id {id_or_prefix!r} is too short: give at least 4 characters")
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._sql():
            matches: list[str] = [
                row[0]
                for row in self._db.execute(
                    "SELECT id FROM messages WHERE id LIKE ? ESCAPE '\\' LIMIT 2", (escaped + "%",)
                )
            ]
        if not matches:
            raise NotFound(f"no message {id_or_prefix!r} in this mailbox (see `covey inbox --all`)")
        if len(matches) > 1:
            raise BadInput(f"message id {id_or_prefix!r} is ambiguous: give more characters")
        return matches[0]

    def mark(self, ids: Iterable[str], status: MailStatus) -> None:
        """Set the status of messages; `read` never undoes `done`."""
        with self._sql(), self._transaction() as db:
            for message_id in ids:
                db.execute(
                    "UPDATE messages SET status = ? "
                    "WHERE id = ? AND NOT (? = 'read' AND status = 'done')",
                    (str(status), message_id, str(status)),
                )

    def search(self, text: str) -> list[Mail]:
        """Full-text search over subject, body and sender, done messages included."""
        words = text.split()
        if not words:
            raise BadInput("search text is empty")
        # Each word becomes a quoted phrase, so FTS5 operators in the text are just words.
        query = " ".join('"' + word.replace('"', '""') + '"' for word in words)
        with self._sql():
            rows = self._db.execute(
                f"SELECT {', '.join('m.' + c.strip() for c in _COLUMNS.split(','))} "
                "FROM messages_fts JOIN messages m ON m.seq = messages_fts.rowid "
                "WHERE messages_fts MATCH ? ORDER BY m.created_at, m.seq",
                (query,),
            ).fetchall()
        return [_mail(row) for row in rows]


def _mail(row: tuple[Any, ...]) -> Mail:
    (
        mid,
        sender,
        recipient,
        subject,
        body,
        thread,
        reply_to,
        created,
        expires,
        received,
        status,
    ) = row
    envelope = Envelope.model_construct(
        id=mid,
        sender=sender,
        recipient=recipient,
        subject=subject,
        body=body,
        thread=thread,
        in_reply_to=reply_to,
        created_at=datetime.fromisoformat(created),
        expires_at=datetime.fromisoformat(expires) if expires else None,
    )
    return Mail(envelope, MailStatus(status), datetime.fromisoformat(received))


# -- draining the queue into the store ----------------------------------------

MAX_PREFETCH = 500
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
                async with asyncio.timeout(COMMIT_SECONDS if arrived else timeout):
                    delivery = await deliveries.get()
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
        return sorted(new, key=lambda mail: mail.envelope.created_at)

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
