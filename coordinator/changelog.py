"""The changelog: what changed, written by agents and people, kept in a RabbitMQ stream.

Appends are cheap and reads start at any offset; retention (age and size) is
the broker's job. Each agent has a cursor — the offset of the last entry it
has been shown — kept on the broker in `covey.cursor.NAME`, a note (a quorum
queue, newest wins; the offset is its version: see Gateway.write_note), so it
survives a supervisor restart, a move to another host and, in a cluster, the
loss of a node. The cursor moves only under the agent's own lock, so two supervisors
racing cannot move it backwards or past what the agent saw; and only when a
run ends `ok`, so a failed run sees the same news again next time.

An entry's `author` is what its writer typed; who wrote it is the stream
message's `user_id`, which RabbitMQ validated on append. A reader checks the one
against the other with the same rule as mail (identity.SenderCheck), and an
entry that fails is still shown — it is news all the same — but as unverified,
with who really wrote it (`Logged.byline`, `verified: false` in JSON), never
silently under the author it claims. Appending through covey cannot fail the
check; a participant that bypasses covey can, so the check is on the read side.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

import aio_pika
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from coordinator import stream
from coordinator.envelope import MAX_SUBJECT_CHARS, now, participant_text
from coordinator.errors import (
    BadInput,
    BrokerUnavailable,
    NoRecipient,
    TopologyMissing,
    first_problem,
)
from coordinator.gateway import Gateway
from coordinator.identity import SenderCheck
from coordinator.names import valid_names
from coordinator.topology import CHANGELOG_EXCHANGE, CHANGELOG_STREAM

ENTRY_TYPE = "covey.changelog.v1"
CURSOR_PREFIX = "covey.cursor."


def _summary(text: str) -> str:
    text = text.strip()
    if not text or "\n" in text or len(text) > MAX_SUBJECT_CHARS:
        raise ValueError(f"the summary must be one line of 1 to {MAX_SUBJECT_CHARS} characters")
    return text


def _tags(tags: list[str]) -> list[str]:
    return valid_names(tags, "tag")


class Entry(BaseModel):
    """One changelog entry; the stream message body (type `covey.changelog.v1`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    author: Annotated[str, AfterValidator(participant_text)]
    created_at: datetime = Field(default_factory=now)
    summary: Annotated[str, AfterValidator(_summary)]
    body: str = ""
    tags: Annotated[list[str], AfterValidator(_tags)] = Field(default_factory=list)
    run_id: str | None = None

    @classmethod
    def new(cls, **fields: object) -> Entry:
        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            field, problem = first_problem(err)
            raise BadInput(f"{field}: {problem}") from None


@dataclass(frozen=True, slots=True)
class Logged:
    """An entry as read back, with its place in the stream and who wrote it."""

    offset: int
    entry: Entry
    signed_by: str | None = None  # the broker-validated user_id of the append
    problem: str | None = None  # why `signed_by` may not speak for the author; None: it may

    @property
    def verified(self) -> bool:
        return self.problem is None

    @property
    def byline(self) -> str:
        """The author, and when the entry's writer is not the author's own user, who is."""
        if self.verified:
            return self.entry.author
        written = f"written by {self.signed_by}" if self.signed_by else "unsigned"
        return f"{self.entry.author} (unverified: {written})"

    def to_dict(self) -> dict[str, object]:
        return {
            "offset": self.offset,
            **self.entry.model_dump(mode="json"),
            "signed_by": self.signed_by,
            "verified": self.verified,
        }


async def append(gateway: Gateway, entry: Entry, timeout: float) -> None:
    """Append `entry`; returns once the stream has confirmed it."""
    # Through its own exchange, not the default one: see the note on Gateway.write_note.
    message = aio_pika.Message(
        entry.model_dump_json(exclude_defaults=True).encode(),
        content_type="application/json",
        type=ENTRY_TYPE,
        timestamp=entry.created_at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        user_id=gateway.user,
    )
    try:
        await gateway.publish_message(
            CHANGELOG_EXCHANGE, message, "", "the changelog entry", timeout=timeout
        )
    except (NoRecipient, TopologyMissing):  # returned unrouted, or no exchange at all
        raise TopologyMissing(
            f"the {CHANGELOG_STREAM} stream does not exist; run `covey topology apply`"
        ) from None


def logged_from(item: stream.Item, senders: SenderCheck) -> Logged | None:
    """The entry in a stream item, judged by `senders`; None for anything that is not
    one (skipped, not fatal)."""
    try:
        entry = Entry.model_validate_json(item.body)
    except ValidationError:
        return None
    user_id = item.message.user_id
    return Logged(item.offset, entry, user_id, senders.problem(entry.author, user_id))


async def entries_from(
    gateway: Gateway, start: int | datetime, stop_at: int, senders: SenderCheck
) -> AsyncGenerator[Logged, None]:
    """Entries from `start` (an offset, or a time) up to offset `stop_at`, oldest first."""
    async for item in stream.items_from(gateway, CHANGELOG_STREAM, start, stop_at):
        logged = logged_from(item, senders)
        if logged is None:
            continue
        if isinstance(start, int) and logged.offset < start:
            continue  # the broker starts at the chunk that holds `start`
        if isinstance(start, datetime) and logged.entry.created_at < start:
            continue
        yield logged


async def newest_entries(
    gateway: Gateway,
    floor: int,
    head: int,
    limit: int,
    keep: Callable[[Logged], bool],
    senders: SenderCheck,
) -> list[Logged]:
    """Up to `limit` kept entries in [floor, head], newest first. Reads back from the
    head in windows, so it costs what `limit` needs, not the whole range: the first
    is `limit` entries, and each next one twice the last (for when `keep` drops some)."""
    found: list[Logged] = []
    window = max(limit, 1)
    end = head
    while end >= floor and len(found) < limit:
        start = max(floor, end - window + 1)
        batch, seen = [], -1
        async for item in stream.items_from(gateway, CHANGELOG_STREAM, start, end):
            seen = max(seen, item.offset)
            if item.offset >= start and (logged := logged_from(item, senders)) is not None:
                batch.append(logged)
        if seen < end:
            # The read stopped short (a slow broker): better no digest, and no cursor
            # moved, than a digest that silently skips what it did not get to read.
            raise BrokerUnavailable(f"the changelog stopped answering before offset {end}")
        for logged in reversed(batch):
            if logged.offset <= end and keep(logged):
                found.append(logged)
                if len(found) == limit:
                    break
        end, window = start - 1, 2 * window
    return found


# -- cursors -------------------------------------------------------------------


class Cursor(BaseModel):
    offset: int  # the newest entry the agent has been shown
    at: datetime = Field(default_factory=now)


async def cursor_of(gateway: Gateway, agent: str) -> Cursor | None:
    """The agent's cursor, or None before its first successful run."""
    note = await gateway.read_note(CURSOR_PREFIX + agent)
    try:
        return Cursor.model_validate_json(note) if note is not None else None
    except ValidationError:
        return None


async def advance(gateway: Gateway, agent: str, offset: int) -> Cursor:
    """Move the agent's cursor forward to `offset` (never back). Call it holding the
    agent's lock: that is what makes the read-then-write safe."""
    current = await cursor_of(gateway, agent)
    if current is not None and current.offset >= offset:
        return current
    cursor = Cursor(offset=offset)
    await gateway.write_note(CURSOR_PREFIX + agent, cursor.model_dump_json().encode(), offset)
    return cursor
