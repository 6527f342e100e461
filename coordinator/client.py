"""`Covey`: one participant's handle on covey — its mailbox, and sending as it.

This is the Python API; the CLI is a thin layer over it. Reading, marking and
searching mail touch only the local mailbox; the broker connection is opened
the first time something needs it.

    async with Covey.open(identity="agent:scout") as covey:
        await covey.send("team:research", "Found it", body="...")
        for mail in await covey.inbox():
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator import topology
from coordinator.envelope import MAX_SUBJECT_CHARS, Envelope, now
from coordinator.errors import BadInput, CoveyError, NoRecipient, NotFound, TopologyMissing
from coordinator.identity import SenderCheck, provisioned_as
from coordinator.logs import get_logger
from coordinator.mailbox import (
    Admission,
    Mail,
    MailStore,
    Status,
    Subscription,
    drain,
    store_path,
)
from coordinator.names import Address
from coordinator.roster import Roster
from coordinator.settings import Settings
from coordinator.topology import CHANGELOG_STREAM

if TYPE_CHECKING:  # aio-pika is the heaviest import: `read` and `done` never need it
    from coordinator.bus import Bus
    from coordinator.changelog import Entry, Logged
    from coordinator.digest import Digest

IDENTITY_VARIABLE = "COVEY_AGENT"

log = get_logger(__name__)


class Covey:
    def __init__(self, settings: Settings, roster: Roster, identity: str | None = None) -> None:
        self.settings = settings
        self.roster = roster
        self._identity = identity
        self._me: Address | None = None
        self._bus: Bus | None = None
        self._store: MailStore | None = None
        self._subscription: Subscription | None = None  # kept while `wait` is used
        self._declared: set[Address] = set()  # participants whose topology this handle applied
        self._declaring = asyncio.Lock()
        self._connecting = asyncio.Lock()

    @classmethod
    def open(
        cls,
        identity: str | None = None,
        home: Path | None = None,
        **settings: Any,
    ) -> Covey:
        """Load settings and roster for `home` (found from the working directory when
        None). `identity` wins over COVEY_AGENT, which wins over the configured default.
        A broken agent is left out, with its problem in `roster.broken`."""
        loaded = Settings.load(home, **settings)
        return cls(loaded, Roster.load(loaded), identity)

    async def __aenter__(self) -> Covey:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(CoveyError):  # the broker went: it redelivers the rest
                await self._subscription.close()
            self._subscription = None
        if self._bus is not None:
            await self._bus.close()
            self._bus = None
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def me(self) -> Address:
        """Who this handle acts as; must be a participant in the roster."""
        if self._me is None:
            text = self._identity or os.environ.get(IDENTITY_VARIABLE) or self.settings.identity
            if not text:
                raise BadInput(
                    "covey does not know who you are: pass --as NAME, set COVEY_AGENT, "
                    "or set identity in covey.toml"
                )
            address = Address.participant(text)
            self.roster.check(address)
            if address not in self.roster:
                raise NotFound(
                    f"{address} is not in the roster: add agents/{address.name}/agent.toml "
                    f"or [humans.{address.name}] in covey.toml"
                )
            self._me = address
        return self._me

    def _who(self) -> str:
        try:
            return str(self.me)
        except CoveyError:  # topology apply and the demo need no identity
            return "(no identity)"

    async def bus(self) -> Bus:
        async with self._connecting:  # concurrent first uses share one connection
            # A connection the broker dropped is not `is_closed` (only close() sets
            # that) but is no longer `connected`: both mean it died (a broker
            # restart, a cut), so open a new one.
            connection = self._bus.connection if self._bus is not None else None
            if connection is not None and (
                connection.is_closed or not connection.connected.is_set()
            ):
                self._bus = None
            if self._bus is None:
                from coordinator.bus import Bus

                self._bus = await Bus.connect(self.settings, name=f"covey {self._who()}")
            return self._bus

    @property
    def store(self) -> MailStore:
        if self._store is None:
            path = store_path(
                self.settings.expanded_state_dir, self.settings.amqp_url, str(self.me)
            )
            self._store = MailStore(path)
        return self._store

    # -- topology -------------------------------------------------------------

    async def apply_topology(self) -> topology.Topology:
        """Declare the core topology and every participant in the roster."""
        plan = topology.for_roster(self.roster, self.settings)
        await (await self.bus()).apply(plan)
        self._declared.update(self.roster.participants())
        return plan

    async def ensure_participants(self, participants: list[Address]) -> None:
        """Declare the core and these participants' queues and bindings, once per handle."""
        if all(p in self._declared for p in participants):
            return
        if provisioned_as(self.settings) is not None:
            return  # a provisioned participant may not declare: `covey provision` did
        async with self._declaring:  # concurrent sends to one recipient declare it once
            todo = [p for p in participants if p not in self._declared]
            if not todo:
                return
            parts = [topology.participant(p, self.roster.teams_of(p), self.settings) for p in todo]
            plan = topology.Topology.combine([topology.core(self.settings.changelog), *parts])
            await (await self.bus()).apply(plan)
            self._declared.update(todo)

    # -- sending --------------------------------------------------------------

    async def send(
        self,
        to: str,
        subject: str,
        body: str = "",
        *,
        reply_to: str | None = None,
        expires_in: timedelta | None = None,
    ) -> Envelope:
        """Send mail; returns once the broker has confirmed it.

        `reply_to` is the id (or unique prefix) of a message in this mailbox; the
        new one joins its thread. An unknown recipient raises NoRecipient after the
        message was kept in covey.unrouted.
        """
        recipient = Address.parse(to)
        self.roster.check(recipient)  # refused before it is sent: nothing to lose
        fields: dict[str, Any] = {
            "sender": str(self.me),
            "recipient": str(recipient),
            "subject": subject,
            "body": body,
        }
        if reply_to is not None:
            original = self.store.get(reply_to).envelope
            fields.update(thread=original.thread, in_reply_to=original.id)
        if expires_in is not None:
            fields["expires_at"] = now() + expires_in
        envelope = Envelope.new(**fields)
        self._check_size(envelope)
        await self._publish(envelope)
        log.info("sent", id=envelope.id, recipient=envelope.recipient)
        if recipient not in self.roster:
            raise NoRecipient(
                f"nobody has the address {recipient} in the roster; the message ({envelope.id}) "
                "was kept in covey.unrouted. Check the address, or add the recipient and run "
                "`covey topology apply`"
            )
        return envelope

    async def reply(self, message_id: str, body: str = "", subject: str | None = None) -> Envelope:
        """Answer the sender of a message in this mailbox, in the same thread."""
        original = self.store.get(message_id).envelope
        if subject is None:
            subject = original.subject
            if not subject.lower().startswith("re:"):
                subject = f"Re: {subject}"[:MAX_SUBJECT_CHARS]
        return await self.send(original.sender, subject, body, reply_to=original.id)

    def _check_size(self, envelope: Envelope) -> None:
        size, limit = envelope.body_size(), self.settings.max_body_bytes
        if size > limit:
            raise BadInput(
                f"body is {size} bytes, over the {limit}-byte limit: send a shorter body, or a "
                "path to a shared file (max_body_bytes in covey.toml sets the limit)"
            )

    async def _publish(self, envelope: Envelope) -> None:
        """Publish, first making sure the recipients' queues exist: an agent added to the
        roster gets its mail even before anyone ran `covey topology apply`. (Not for
        `all`, whose reach is the whole roster: that is `topology apply`'s job.)"""
        bus = await self.bus()
        recipient = envelope.recipient_address
        if recipient.kind != "all" and (reached := self.roster.reached_by(recipient)):
            await self.ensure_participants(reached)
        try:
            await bus.publish(envelope, timeout=self.settings.connect_timeout)
        except TopologyMissing:  # nothing reached, in a namespace nobody has set up yet
            await self.apply_topology()
            await bus.publish(envelope, timeout=self.settings.connect_timeout)

    # -- the mailbox -----------------------------------------------------------

    async def drain(self, wait: float | None = None) -> list[Envelope]:
        """Move waiting mail from the broker into the mailbox; return what is new."""
        subscription = self._subscription
        if (
            subscription is not None
            and subscription.active
            and (filed := await subscription.next(0))
        ):
            return filed  # what `wait`'s consumer filed since
        bus, queue, limits = await self.bus(), self.me.queue, self._admission()
        try:
            new = await drain(bus, self.store, queue, limits, wait)
        except TopologyMissing:  # first use of this participant: its queue exists from now on
            await self.ensure_participants([self.me])
            new = await drain(bus, self.store, queue, limits, wait)
        log.info("drained", queue=queue, new=len(new))
        return new

    async def inbox(self, include_done: bool = False) -> list[Mail]:
        """Drain, then list what is not done (everything with `include_done`), oldest first."""
        await self.drain()
        return self.store.messages(include_done=include_done)

    async def wait(self, timeout: float) -> list[Mail]:
        """Block until new mail arrives (at most `timeout` seconds); return it, or []."""
        deadline = time.monotonic() + timeout
        subscription = await self._subscribe()
        while (left := deadline - time.monotonic()) > 0:
            try:
                new = await subscription.next(left)  # [] too when a delivery was dead-lettered
            except CoveyError:
                self._subscription = None  # a new one next time
                raise
            if new:
                return self.store.messages(include_done=True, ids=[e.id for e in new])
        return []

    async def _subscribe(self) -> Subscription:
        if self._subscription is not None and self._subscription.active:
            return self._subscription
        bus, limits = await self.bus(), self._admission()
        try:
            self._subscription = await Subscription.start(bus, self.store, self.me.queue, limits)
        except TopologyMissing:  # first use of this participant: its queue exists from now on
            await self.ensure_participants([self.me])
            self._subscription = await Subscription.start(bus, self.store, self.me.queue, limits)
        return self._subscription

    def _admission(self) -> Admission:
        return Admission(self.settings.max_body_bytes, SenderCheck.for_settings(self.settings))

    def read(self, message_id: str) -> Mail:
        """One message, marked read."""
        full_id = self.store.resolve(message_id)
        self.store.mark([full_id], Status.READ)
        return self.store.get(full_id)

    def done(self, message_ids: Iterable[str]) -> list[str]:
        """Archive messages: no longer listed by `inbox`, still found by `search`."""
        full_ids = [self.store.resolve(message_id) for message_id in message_ids]
        self.store.mark(full_ids, Status.DONE)
        return full_ids

    def search(self, text: str) -> list[Mail]:
        return self.store.search(text)

    # -- the changelog -----------------------------------------------------------

    async def log_add(self, summary: str, body: str = "", tags: Iterable[str] = ()) -> Entry:
        """Append to the changelog as this participant (with the run id, inside a run)."""
        from coordinator import changelog

        entry = changelog.Entry.new(
            author=str(self.me),
            summary=summary,
            body=body,
            tags=list(tags),
            run_id=os.environ.get("COVEY_RUN_ID"),
        )
        size, limit = len(body.encode()), self.settings.max_body_bytes
        if size > limit:
            raise BadInput(f"body is {size} bytes, over the {limit}-byte limit")
        connection = (await self.bus()).connection
        try:
            await changelog.append(connection, entry, self.settings.connect_timeout)
        except TopologyMissing:
            await self.apply_topology()
            await changelog.append(connection, entry, self.settings.connect_timeout)
        return entry

    async def log(
        self,
        since: int | datetime | None = None,
        author: str | None = None,
        tag: str | None = None,
        limit: int = 20,
    ) -> list[Logged]:
        """Changelog entries, oldest first: the newest `limit`, or the first `limit`
        from `since` (an offset, or a time)."""
        from coordinator import changelog, stream

        who = str(Address.participant(author)) if author else None

        def keep(logged: Logged) -> bool:
            entry = logged.entry
            return (who is None or entry.author == who) and (tag is None or tag in entry.tags)

        connection = (await self.bus()).connection
        try:
            head = await stream.head(connection, CHANGELOG_STREAM)
        except TopologyMissing:
            return []
        if head is None:
            return []
        senders = SenderCheck.for_settings(self.settings)  # is each writer its author?
        if since is None:
            return list(reversed(await changelog.newest(connection, 0, head, limit, keep, senders)))
        found: list[Logged] = []
        async with contextlib.aclosing(changelog.read(connection, since, head, senders)) as entries:
            async for logged in entries:
                if keep(logged):
                    found.append(logged)
                    if len(found) == limit:
                        break
        return found

    async def digest(self, agent: str) -> Digest:
        """What `agent` would be shown if it started now."""
        from coordinator.digest import build as build_digest

        config = self.roster.agent(agent)
        connection = (await self.bus()).connection
        me, senders = str(config.address), SenderCheck.for_settings(self.settings)
        try:
            return await build_digest(connection, agent, config.config.digest, me, senders)
        except TopologyMissing:
            await self.apply_topology()
            return await build_digest(connection, agent, config.config.digest, me, senders)

    async def advance(self, agent: str, offset: int, wait: float = 30.0) -> None:
        """Move `agent`'s cursor to `offset`, under its lock (waiting up to `wait` s for
        a run of it to end), as a run that ended well would."""
        from coordinator import changelog
        from coordinator.lock import Holder, LockSession, LockSpec

        holder = Holder.me(agent, os.environ.get("COVEY_RUN_ID") or "digest")
        async with await LockSession.open(self.settings, holder) as locks:
            await locks.acquire(LockSpec.for_agent(agent), wait=wait)
            await changelog.advance((await self.bus()).connection, agent, offset)
