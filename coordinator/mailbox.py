"""The mailbox: a participant's mail as state (SQLite), filled from its queue (the transport).

AMQP has no peek and no "keep this one for later", so covey uses the inbox
pattern: `drain` moves deliveries from the participant's queue into a local
SQLite file, committing them *before* acking them to the broker. A crash
between the two makes the broker deliver again, and the store drops the
duplicate by message id, so nothing is lost and nothing shows twice.

A delivery that is not a valid envelope is copied to `covey.dead` with the
reason (confirmed) and only then acked: it never reaches the mailbox, never
stops the drain, and is never lost.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog

from coordinator.envelope import Envelope
from coordinator.errors import BadInput, InvalidEnvelope, NotFound

if TYPE_CHECKING:  # the store works without the broker; only `drain` needs it
    from aio_pika.abc import AbstractIncomingMessage

    from coordinator.bus import Bus

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
SHORT_ID = 12  # characters of an id shown in listings; any unique prefix is accepted back
MIN_PREFIX = 4

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


class Status(StrEnum):
    UNREAD = "unread"
    READ = "read"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Mail:
    """One message in a mailbox, with what the participant did with it."""

    envelope: Envelope
    status: Status
    received_at: datetime

    def to_dict(self, with_body: bool = False) -> dict[str, Any]:
        data = self.envelope.model_dump(mode="json", exclude={"body"})
        data.update(status=str(self.status), received_at=self.received_at.isoformat())
        if with_body:
            data["body"] = self.envelope.body
        return data


def store_path(state_dir: Path, amqp_url: str, participant: str) -> Path:
    """Where a participant's mailbox lives: one folder per namespace (vhost)."""
    from yarl import URL  # yarl comes with aio-pika; only this path needs it

    vhost = URL(amqp_url).path.lstrip("/") or "default"
    return state_dir / quote(vhost, safe="") / "mail" / f"{participant.replace(':', '.')}.sqlite3"


class MailStore:
    """One participant's mailbox file. Every write commits before it returns."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes (WAL)
        if self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with self._transaction():
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def add(self, envelopes: Sequence[Envelope]) -> list[Envelope]:
        """Store envelopes in one transaction; return those not already present."""
        if not envelopes:
            return []
        received = datetime.now(UTC).isoformat()
        added = []
        with self._transaction() as db:
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
                    added.append(env)
        return added

    def list(self, include_done: bool = False, ids: Iterable[str] = ()) -> list[Mail]:
        """Mail oldest first, newest last (where a model's attention is)."""
        wanted = list(ids)
        where, params = ("status != 'done'", []) if not include_done else ("1", [])
        if wanted:
            where = f"id IN ({', '.join('?' * len(wanted))})"
            params = wanted
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY created_at, seq", params
        )
        return [_mail(row) for row in rows]

    def get(self, id_or_prefix: str) -> Mail:
        return self.list(ids=[self.resolve(id_or_prefix)])[0]

    def resolve(self, id_or_prefix: str) -> str:
        """The full id for an id or a unique prefix of one (as short as 4 characters)."""
        prefix = id_or_prefix.strip().lower()
        if len(prefix) < MIN_PREFIX:
            raise BadInput(f"message id {id_or_prefix!r} is too short: give at least 4 characters")
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        matches = [
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

    def mark(self, ids: Iterable[str], status: Status) -> None:
        """Set the status of messages; `read` never undoes `done`."""
        with self._transaction() as db:
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
        rows = self._db.execute(
            f"SELECT {', '.join('m.' + c.strip() for c in _COLUMNS.split(','))} "
            "FROM messages_fts JOIN messages m ON m.seq = messages_fts.rowid "
            "WHERE messages_fts MATCH ? ORDER BY m.created_at, m.seq",
            (query,),
        )
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
    return Mail(envelope, Status(status), datetime.fromisoformat(received))


# -- draining the queue into the store ----------------------------------------

MAX_PREFETCH = 500
IDLE_SECONDS = 2.0  # how long a drain waits for deliveries it expects before giving up


async def drain(
    bus: Bus, store: MailStore, queue_name: str, max_body_bytes: int, wait: float | None = None
) -> list[Envelope]:
    """Move the messages waiting in `queue_name` into `store`; return the new ones.

    With `wait`, block up to that many seconds for the first message when the
    queue is empty. Only deliveries this drain has filed are acked; deliveries
    still in flight when it stops are filed too, rather than handed back, so a
    drain never inflates a message's delivery count (which would push innocent
    mail towards the delivery limit).
    """
    queue = await bus.queue(queue_name)
    try:
        ready = queue.declaration_result.message_count or 0
        if ready == 0 and wait is None:
            return []
        target = max(ready, 1)
        await queue.channel.set_qos(prefetch_count=min(target, MAX_PREFETCH))
        deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        consumer_tag = await queue.consume(deliveries.put, no_ack=False)
        filing = _Filing(bus, store, queue_name, max_body_bytes)
        try:
            first_timeout = wait if ready == 0 and wait is not None else IDLE_SECONDS
            while filing.taken < target:
                timeout = first_timeout if filing.taken == 0 else IDLE_SECONDS
                batch = await _next_batch(deliveries, timeout)
                if not batch:
                    break  # waited long enough, or another consumer took the rest
                await filing.file(batch)
        finally:
            await queue.cancel(consumer_tag)
        # After cancel-ok no more deliveries come; any that came before are ours to file.
        await filing.file(_take_ready(deliveries))
        return filing.added
    finally:
        await queue.channel.close()


class _Filing:
    """Files batches of deliveries: valid envelopes into the store, the rest to covey.dead."""

    def __init__(self, bus: Bus, store: MailStore, queue_name: str, max_body_bytes: int) -> None:
        self.bus, self.store, self.queue_name = bus, store, queue_name
        self.max_body_bytes = max_body_bytes
        self.taken = 0
        self.added: list[Envelope] = []

    async def file(self, batch: Sequence[AbstractIncomingMessage]) -> None:
        if not batch:
            return
        valid: list[Envelope] = []
        rejected: list[tuple[AbstractIncomingMessage, InvalidEnvelope]] = []
        for delivery in batch:
            try:
                valid.append(self._check(Envelope.from_delivery(delivery)))
            except InvalidEnvelope as problem:
                rejected.append((delivery, problem))
        self.added += self.store.add(valid)  # committed: from here on a crash is harmless
        for delivery, problem in rejected:
            await self.bus.dead_letter(delivery, self.queue_name, problem.reason, problem.detail)
            log.warning(
                "dead-lettered a delivery",
                queue=self.queue_name,
                reason=problem.reason,
                detail=problem.detail,
                message_id=delivery.message_id,
            )
        await batch[-1].ack(multiple=True)
        self.taken += len(batch)

    def _check(self, envelope: Envelope) -> Envelope:
        if envelope.body_size() > self.max_body_bytes:
            raise InvalidEnvelope(
                "invalid", f"body is {envelope.body_size()} bytes, over {self.max_body_bytes}"
            )
        if envelope.is_expired():
            raise InvalidEnvelope("expired", f"expired at {envelope.expires_at}")
        return envelope


async def _next_batch(
    deliveries: asyncio.Queue[AbstractIncomingMessage], timeout: float
) -> list[AbstractIncomingMessage]:
    """Wait up to `timeout` for one delivery, then take every one already here."""
    try:
        first = await asyncio.wait_for(deliveries.get(), timeout)
    except TimeoutError:
        return []
    return [first, *_take_ready(deliveries)]


def _take_ready(
    deliveries: asyncio.Queue[AbstractIncomingMessage],
) -> list[AbstractIncomingMessage]:
    taken = []
    while not deliveries.empty():
        taken.append(deliveries.get_nowait())
    return taken
