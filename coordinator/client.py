"""`Covey`: one participant's handle on covey — its mailbox, and sending as it.

This is the Python API; the CLI is a thin layer over it. Reading, marking and
searching mail touch only the local mailbox; the broker connection is opened
the first time something needs it (`Covey.connect` opens it at once).

    async with await Covey.connect(identity="agent:scout") as covey:
        await covey.send("team:research", "Found it", body="...")
        for mail in await covey.inbox():
            ...
        async for mail in covey.mail():  # follow new mail as it comes
            ...
        async with covey.session() as s:  # inside `covey run`: the run's session
            await s.progress(0.5, "halfway")

A handle is built on a `Namespace` (namespace.py), which owns the configuration
and the broker connection; operations that need no identity live there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.envelope import MAX_SUBJECT_CHARS, Envelope, now
from coordinator.errors import BadInput, CoveyError, NoRecipient, NotFound
from coordinator.logs import get_logger
from coordinator.names import Address
from coordinator.namespace import Namespace
from coordinator.roster import Roster
from coordinator.settings import Settings

if TYPE_CHECKING:  # aio-pika is the heaviest import: `read` and `done` never need it
    from coordinator.changelog import Entry, Logged
    from coordinator.drain import Admission, Subscription
    from coordinator.emit import Emitter
    from coordinator.events import Event
    from coordinator.gateway import Gateway
    from coordinator.mailbox import Mail, MailStore
    from coordinator.session import SessionEvent
    from coordinator.session_reader import Start

IDENTITY_VARIABLE = "COVEY_AGENT"

log = get_logger(__name__)


class Covey:
    """One participant's handle: who it acts as, its mailbox, and the namespace it is in."""

    def __init__(
        self, namespace: Namespace, identity: str | None = None, *, owns_namespace: bool = True
    ) -> None:
        self.namespace = namespace
        self._owns_namespace = owns_namespace  # closed with this handle
        self._identity = identity
        self._me: Address | None = None
        self._store: MailStore | None = None
        self._subscription: Subscription | None = None  # kept while `wait` is used

    @classmethod
    def open(
        cls,
        identity: str | None = None,
        home: Path | None = None,
        **settings: Any,
    ) -> Covey:
        """Load settings and roster for `home` (found from the working directory when
        None); connect on first use. `identity` wins over COVEY_AGENT, which wins over
        the configured default. A broken agent is left out, with its problem in
        `roster.broken`."""
        namespace = Namespace.load(home, **settings)
        text = identity or os.environ.get(IDENTITY_VARIABLE) or namespace.settings.identity
        try:  # the broker shows who a connection is for; fault tests cut it by this name
            named = str(Address.participant(text)) if text else "(no identity)"
        except CoveyError:
            named = text or "(no identity)"  # reported when it is used, not here
        namespace.name = f"covey {named}"
        return cls(namespace, identity)

    @classmethod
    async def connect(
        cls,
        identity: str | None = None,
        home: Path | None = None,
        **settings: Any,
    ) -> Covey:
        """As `open`, but connect now: BrokerUnavailable at once when the broker cannot
        be reached, BadInput or NotFound when the identity is not a participant."""
        covey = cls.open(identity, home, **settings)
        try:
            covey.me  # noqa: B018 - checked now rather than at the first send
            await covey.gateway()
        except BaseException:
            await covey.close()
            raise
        return covey

    async def __aenter__(self) -> Covey:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(CoveyError):  # the broker went: it redelivers the rest
                await self._subscription.close()
            self._subscription = None
        if self._owns_namespace:
            await self.namespace.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def settings(self) -> Settings:
        return self.namespace.settings

    @property
    def roster(self) -> Roster:
        return self.namespace.roster

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

    async def gateway(self) -> Gateway:
        """The namespace's connection to the broker."""
        return await self.namespace.gateway()

    @property
    def store(self) -> MailStore:
        if self._store is None:
            # The mailbox (and SQLite) is imported when first used: `covey send` never is.
            from coordinator.mailbox import MailStore, store_path

            path = store_path(
                self.settings.expanded_state_dir, self.settings.amqp_url, str(self.me)
            )
            self._store = MailStore(path)
        return self._store

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
        original = self.store.get(reply_to).envelope if reply_to is not None else None
        return await self._send(recipient, subject, body, original, expires_in)

    async def _send(
        self,
        recipient: Address,
        subject: str,
        body: str,
        original: Envelope | None,
        expires_in: timedelta | None,
    ) -> Envelope:
        self.roster.check(recipient)  # refused before it is sent: nothing to lose
        expires_at = now() + expires_in if expires_in is not None else None
        envelope = Envelope.compose(
            self.me, recipient, subject, body, original=original, expires_at=expires_at
        )
        self._check_size(envelope.body_size())
        await self._publish(envelope)
        log.info("sent", id=envelope.id, recipient=envelope.recipient)
        if recipient not in self.roster:
            raise NoRecipient(
                f"nobody has the address {recipient} in the roster; the message ({envelope.id}) "
                "was kept in covey.unrouted. Check the address, or add the recipient and run "
                "`covey topology apply`"
            )
        return envelope

    async def reply(
        self,
        message_id: str,
        subject: str | None = None,
        body: str = "",
        *,
        expires_in: timedelta | None = None,
    ) -> Envelope:
        """Answer the sender of a message in this mailbox, in the same thread; the
        subject is the original's with `Re: ` unless given. Arguments as for `send`."""
        original = self.store.get(message_id).envelope
        if subject is None:
            subject = original.subject
            if not subject.lower().startswith("re:"):
                subject = f"Re: {subject}"[:MAX_SUBJECT_CHARS]
        # The original in hand: no second look-up of it in the store.
        return await self._send(Address.parse(original.sender), subject, body, original, expires_in)

    def _check_size(self, size: int) -> None:
        """Refuse a body over `max_body_bytes` before anything is sent or logged."""
        limit = self.settings.max_body_bytes
        if size > limit:
            raise BadInput(
                f"body is {size} bytes, over the {limit}-byte limit: send a shorter body, or a "
                "path to a shared file (max_body_bytes in covey.toml sets the limit)"
            )

    async def _publish(self, envelope: Envelope) -> None:
        """Publish, first making sure the recipients' queues exist: an agent added to the
        roster gets its mail even before anyone ran `covey topology apply`. (Not for
        `all`, whose reach is the whole roster: that is `topology apply`'s job.)"""
        gateway = await self.gateway()
        recipient = envelope.recipient_address
        if recipient.kind != "all" and (reached := self.roster.reached_by(recipient)):
            await self.namespace.ensure_participants(reached, assume_core=True)
        # Nothing reached, in a namespace nobody has set up yet: the whole topology.
        await self.namespace.with_topology(
            lambda: gateway.publish(envelope, timeout=self.settings.connect_timeout)
        )

    # -- the mailbox -----------------------------------------------------------

    async def drain(self, wait: float | None = None) -> list[Envelope]:
        """Move waiting mail from the broker into the mailbox; return what is new."""
        subscription = self._subscription
        if (
            subscription is not None
            and subscription.active
            and (filed := await subscription.next(0))
        ):
            return [mail.envelope for mail in filed]  # what `wait`'s consumer filed since
        from coordinator.drain import drain

        gateway, queue, limits = await self.gateway(), self.me.queue, self._admission()
        # On a participant's first use its queue is declared, and exists from then on.
        new = await self.namespace.with_topology(
            lambda: drain(gateway, self.store, queue, limits, wait), [self.me]
        )
        log.info("drained", queue=queue, new=len(new))
        return new

    async def inbox(self, include_done: bool = False) -> list[Mail]:
        """Drain, then list what is not done (everything with `include_done`), oldest first."""
        await self.drain()
        # In a thread, as all the store's work from async code (see MailStore).
        return await asyncio.to_thread(self.store.messages, include_done)

    async def wait(self, timeout: float) -> list[Mail]:
        """Block until new mail arrives (at most `timeout` seconds); return it, or []."""
        deadline = time.monotonic() + timeout
        subscription = await self._subscribe()
        while (left := deadline - time.monotonic()) > 0:
            try:
                new = await subscription.next(left)  # [] too when a delivery was dead-lettered
            except CoveyError:
                self._subscription = None  # a new one next time
                with contextlib.suppress(CoveyError):
                    await subscription.close()
                raise
            if new:  # as filed: no second read of the store
                return new
        return []

    async def mail(self, poll: float = 60.0) -> AsyncIterator[Mail]:
        """Follow the mailbox: yield what waits, then each new message as it is filed
        (`poll` only bounds each wait). Mail is filed before it is yielded, so breaking
        out of the loop loses nothing."""
        while True:
            for mail in await self.wait(poll):
                yield mail

    async def _subscribe(self) -> Subscription:
        if self._subscription is not None and self._subscription.active:
            return self._subscription
        from coordinator.drain import Subscription

        gateway, limits = await self.gateway(), self._admission()
        self._subscription = await self.namespace.with_topology(
            lambda: Subscription.start(gateway, self.store, self.me.queue, limits), [self.me]
        )
        return self._subscription

    def _admission(self) -> Admission:
        from coordinator.drain import Admission

        return Admission(self.settings.max_body_bytes, self.namespace.snapshot.senders)

    def read(self, message_id: str) -> Mail:
        """One message, marked read."""
        return self.store.read(message_id)

    def done(self, message_ids: Iterable[str]) -> list[str]:
        """Archive messages: no longer listed by `inbox`, still found by `search`."""
        return self.store.done(message_ids)

    def search(self, text: str) -> list[Mail]:
        return self.store.search(text)

    # -- the run's session ---------------------------------------------------------

    def session(self) -> Emitter:
        """Inside `covey run`: `async with covey.session() as s: await s.emit(...)` adds
        the agent's own events (progress, token, tool, status, result) to its run's
        session, over one connection to the run for the context's life. The run, not
        this handle, publishes them: no broker connection is needed."""
        from coordinator.emit import Emitter

        return Emitter()

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
        self._check_size(len(body.encode()))
        gateway, timeout = await self.gateway(), self.settings.connect_timeout
        await self.namespace.with_topology(lambda: changelog.append(gateway, entry, timeout))
        return entry

    async def log(
        self,
        since: int | datetime | None = None,
        author: str | None = None,
        tag: str | None = None,
        limit: int = 20,
    ) -> list[Logged]:
        """Changelog entries, oldest first: the newest `limit`, or the first `limit`
        from `since` (an offset, or a time); see Namespace.changelog."""
        return await self.namespace.changelog(since, author, tag, limit)

    async def stop(
        self, run_or_agent: str, reason: str | None = None, wait: float | None = None
    ) -> Event:
        """Stop a live run (a run id, or an agent: its live run) as this participant, and
        return its `run.finished` once it has ended; see stopping.request_stop. `wait`
        defaults to the agent's grace plus 30 s."""
        from coordinator.stopping import request_stop

        try:
            asker: str | None = str(self.me)
        except CoveyError:  # nobody named (no --as, COVEY_AGENT or identity): still a stop
            asker = None
        return await request_stop(self.namespace, run_or_agent, asker, reason, wait)

    def attach(
        self, run_or_agent: str, start: Start = "start", follow: bool = True
    ) -> AsyncGenerator[tuple[int, SessionEvent], None]:
        """A run's session as `(id, event)`, as `Namespace.attach` (needs no identity)."""
        return self.namespace.attach(run_or_agent, start, follow)
