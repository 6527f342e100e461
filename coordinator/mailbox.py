"""The mailbox: a participant's mail as state, in a SQLite file of its own.

Mail is filed here from the participant's queue (drain.py: committed before it is
acked) and read, marked and searched here, by the participant alone. Every write
commits before it returns; a file that cannot take mail (read-only, corrupt, its disk
full) is a `MailboxUnusable` naming the file, the problem and the fix. Standard
library only: the commands that just show mail open it without pydantic or asyncio.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.errors import (
    BadInput,
    ConfigError,
    CoveyError,
    MailboxBusy,
    MailboxUnusable,
    NotFound,
)
from coordinator.home import store_path as store_path  # re-exported

if TYPE_CHECKING:  # built only when asked for: see Mail
    from coordinator.envelope import Envelope

SCHEMA_VERSION = 2  # 2: the search index is brought up to date by search
MAX_PREFETCH = 500  # at most this many deliveries are taken (unacked) at once
SHORT_ID = 12  # characters of an id shown in listings; any unique prefix is accepted back
MIN_PREFIX = 4

# What one message may take on disk at worst, for bounding a drain by the free space.
# Measured (schema 1, which indexed as it filed): a body of unique words took 5.6 times
# its size at the first commit (the row, its full-text index, and both again in the
# WAL before the checkpoint); the other fields and index entries about 1.3 KiB. Filing
# now writes the row alone and a search the index later: the bound stays on the safe
# side for a drain, and a search that finds the disk full says so in one line.
FOOTPRINT_PER_BODY_BYTE = 8
FOOTPRINT_EXTRA = 16 * 1024
RESERVE_BYTES = 1024 * 1024  # left free for SQLite itself (its -shm, a checkpoint)
KEEPS_MAIL = "the broker keeps your mail until then"
BUSY_SECONDS = 10.0  # how long a writer waits for another one's lock (SQLite's busy timeout)

# The full-text index is brought up to date by a search, not by filing: indexing a
# 512-byte body costs about as much as the rest of its commit (17 of 33 ms for a
# 1,000-message drain, alone on the machine; twice that beside the event loop that
# takes the deliveries), and a drain's commit stands between the broker and its ack.
# The index is derived from `messages` and a search first adds what it lacks, in one
# transaction, so search finds everything filed before it either way.
# `search_index.indexed_upto` is the last `seq` indexed; rows are only ever added
# with a higher `seq` (AUTOINCREMENT, one writer at a time), so it says exactly
# which rows the index holds. A row not indexed must never be 'delete'd from an
# external-content index (that corrupts it): hence the trigger's WHEN.
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
CREATE TABLE IF NOT EXISTS search_index (indexed_upto INTEGER NOT NULL);
-- Version 1 indexed every row as it was filed: all that it holds is indexed.
INSERT INTO search_index (indexed_upto)
    SELECT coalesce(max(seq), 0) FROM messages WHERE NOT EXISTS (SELECT 1 FROM search_index);
DROP TRIGGER IF EXISTS messages_ai;
DROP TRIGGER IF EXISTS messages_ad;
CREATE TRIGGER messages_ad AFTER DELETE ON messages
WHEN old.seq <= (SELECT indexed_upto FROM search_index) BEGIN
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


# The envelope's fields, as a Mail carries them (tests/test_mailbox.py holds them to
# Envelope's own).
ENVELOPE_FIELDS = (
    "id",
    "sender",
    "recipient",
    "subject",
    "body",
    "thread",
    "in_reply_to",
    "created_at",
    "expires_at",
)


@dataclass(frozen=True, slots=True)
class Mail:
    """One message in a mailbox, with what the participant did with it.

    It carries the envelope's fields as the mailbox holds them, and makes the envelope
    itself (a pydantic model) only when asked for `envelope`. Showing mail needs just the
    fields, so the commands that only show it (`covey read`, `done`, `search`) never
    import pydantic, a good part of a cold command's start."""

    id: str
    sender: str
    recipient: str
    subject: str
    body: str
    thread: str
    in_reply_to: str | None
    created_at: datetime
    expires_at: datetime | None
    status: MailStatus
    received_at: datetime
    # The envelope this was made of, when it was (a drain's): handed back as it is.
    made_of: Envelope | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, envelope: Envelope, status: MailStatus, received_at: datetime) -> Mail:
        e = envelope  # every filed message comes this way: positional, no dict
        return cls(
            e.id,
            e.sender,
            e.recipient,
            e.subject,
            e.body,
            e.thread,
            e.in_reply_to,
            e.created_at,
            e.expires_at,
            status,
            received_at,
            envelope,
        )

    @property
    def envelope(self) -> Envelope:
        """The message as an Envelope: checked when it was filed, so not again."""
        if self.made_of is not None:
            return self.made_of
        from coordinator.envelope import Envelope

        return Envelope.model_construct(**{name: getattr(self, name) for name in ENVELOPE_FIELDS})

    def to_dict(self, with_body: bool = False) -> dict[str, Any]:
        """As JSON: the envelope's fields (as its model_dump(mode="json") gives them),
        then status and received_at, and the body last when asked for."""
        data: dict[str, Any] = {
            name: getattr(self, name) for name in ENVELOPE_FIELDS if name != "body"
        }
        data["created_at"] = _json_time(self.created_at)
        data["expires_at"] = _json_time(self.expires_at) if self.expires_at else None
        data.update(status=str(self.status), received_at=self.received_at.isoformat())
        if with_body:
            data["body"] = self.body
        return data


def _json_time(moment: datetime) -> str:
    """A timestamp as pydantic writes one in JSON: ISO 8601, with `Z` for UTC."""
    text = moment.isoformat()
    return text[: -len("+00:00")] + "Z" if text.endswith("+00:00") else text


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
                    added.append(Mail.of(env, MailStatus.UNREAD, received_at))
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
        return {mail.id: mail.envelope for mail in self.messages(ids=ids)}

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

    def read(self, id_or_prefix: str) -> Mail:
        """One message, marked read."""
        full_id = self.resolve(id_or_prefix)
        self.mark([full_id], MailStatus.READ)
        return self.get(full_id)

    def done(self, ids_or_prefixes: Iterable[str]) -> list[str]:
        """Archive messages (their full ids are returned): no longer listed, still found
        by `search`."""
        full_ids = [self.resolve(id_or_prefix) for id_or_prefix in ids_or_prefixes]
        self.mark(full_ids, MailStatus.DONE)
        return full_ids

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
        self._index_for_search()
        with self._sql():
            rows = self._db.execute(
                f"SELECT {', '.join('m.' + c.strip() for c in _COLUMNS.split(','))} "
                "FROM messages_fts JOIN messages m ON m.seq = messages_fts.rowid "
                "WHERE messages_fts MATCH ? ORDER BY m.created_at, m.seq",
                (query,),
            ).fetchall()
        return [_mail(row) for row in rows]

    def _index_for_search(self) -> None:
        """Add to the full-text index what was filed since it was last brought up to date
        (see _SCHEMA), in one transaction; nothing to write when nothing was filed."""
        with self._sql():
            (upto,) = self._db.execute("SELECT indexed_upto FROM search_index").fetchone()
            (last,) = self._db.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()
            if last <= upto:
                return
            with self._transaction() as db:  # read again: another searcher may have been first
                (upto,) = db.execute("SELECT indexed_upto FROM search_index").fetchone()
                db.execute(
                    "INSERT INTO messages_fts (rowid, subject, body, sender) "
                    "SELECT seq, subject, body, sender FROM messages WHERE seq > ?",
                    (upto,),
                )
                db.execute("UPDATE search_index SET indexed_upto = (SELECT max(seq) FROM messages)")


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
    return Mail(
        id=mid,
        sender=sender,
        recipient=recipient,
        subject=subject,
        body=body,
        thread=thread,
        in_reply_to=reply_to,
        created_at=datetime.fromisoformat(created),
        expires_at=datetime.fromisoformat(expires) if expires else None,
        status=MailStatus(status),
        received_at=datetime.fromisoformat(received),
    )
