"""`Namespace`: one covey namespace as a process sees it — configuration, broker, topology.

A namespace is a covey home (covey.toml and its roster of agents and people)
and the RabbitMQ vhost it names. The `Namespace` object owns, for one process:

* the configuration, as one immutable `Snapshot` of settings and roster. A
  reload builds a whole new snapshot and swaps it in one assignment, so a run
  that took the snapshot when it started keeps it to the end, whatever reloads
  happen meanwhile;
* the gateway to the broker (one connection, opened on first use, replaced when
  the broker dropped it);
* what this process has declared, so each participant's queues are declared at
  most once, and an operation that finds the topology missing declares it and
  tries once more (`with_topology`).

The supervisor, the runner, metrics, status, provision and the servers depend
on this. `Covey`, a participant's handle, is built on it too, and adds only who
it acts as and its mailbox. Operations that need no identity (applying the
topology, an agent's digest, moving a cursor) live here, not on `Covey`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from coordinator import topology
from coordinator.errors import TopologyMissing
from coordinator.identity import SenderCheck, provisioned_as
from coordinator.names import Address
from coordinator.roster import Roster
from coordinator.settings import Settings

if TYPE_CHECKING:  # aio-pika is the heaviest import: reading mail never needs it
    from aio_pika.abc import AbstractIncomingMessage

    from coordinator.changelog import Logged
    from coordinator.client import Covey
    from coordinator.digest import Digest
    from coordinator.gateway import Gateway
    from coordinator.session import SessionEvent
    from coordinator.session_reader import Start

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Settings and roster read together; never changed, only replaced."""

    settings: Settings
    roster: Roster

    @property
    def senders(self) -> SenderCheck:
        """Who may write as whom, under these settings."""
        return SenderCheck.for_settings(self.settings)


class Namespace:
    """One covey namespace for this process. Use `async with`, or `close()`."""

    def __init__(self, settings: Settings, roster: Roster, name: str = "covey") -> None:
        self.snapshot = Snapshot(settings, roster)
        self.name = name  # the broker shows it as the connection's name
        self._overrides: dict[str, Any] = {}
        self._gateway: Gateway | None = None
        self._connecting = asyncio.Lock()  # concurrent first uses share one connection
        self._declared: set[Address] = set()  # participants declared from here
        self._declaring = asyncio.Lock()

    @classmethod
    def load(cls, home: Path | None = None, name: str = "covey", **overrides: Any) -> Namespace:
        """Settings and roster for `home` (found from the working directory when None).
        A broken agent is left out, with its problem in `roster.broken`."""
        settings = Settings.load(home, **overrides)
        namespace = cls(settings, Roster.load(settings), name)
        namespace._overrides = overrides
        return namespace

    @property
    def settings(self) -> Settings:
        return self.snapshot.settings

    @property
    def roster(self) -> Roster:
        return self.snapshot.roster

    def read_again(self, problems: dict[str, str] | None = None) -> Snapshot:
        """A new snapshot from the files as they are now (not yet in use: see `swap`)."""
        settings = Settings.load(self.settings.home, **self._overrides)
        return Snapshot(settings, Roster.load(settings, problems))

    def swap(self, snapshot: Snapshot) -> Snapshot:
        """Use `snapshot` from now on; return the one it replaces. What runs keeps
        the snapshot it took. The gateway stays: a new broker address needs a restart."""
        old, self.snapshot = self.snapshot, snapshot
        return old

    async def __aenter__(self) -> Namespace:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._gateway is not None:
            await self._gateway.close()
            self._gateway = None

    def handle(self, identity: str) -> Covey:
        """A participant's handle in this namespace, sharing its connection (closing the
        handle closes its mailbox, not the namespace)."""
        from coordinator.client import Covey

        return Covey(self, identity, owns_namespace=False)

    # -- the broker ---------------------------------------------------------------------

    async def gateway(self) -> Gateway:
        """The gateway, connected on first use and again when the broker dropped it (to
        another of `amqp_urls`' nodes if one answers); BrokerUnavailable (one line) when
        no node can be reached."""
        async with self._connecting:
            lost: str | None = None
            if self._gateway is not None and not self._gateway.alive:
                lost, self._gateway = self._gateway.url, None
            if self._gateway is None:
                from coordinator.gateway import Gateway

                # Another node first, when there are several: this one just went away.
                self._gateway = await Gateway.connect(self.settings, self.name, avoid=lost)
            return self._gateway

    async def keep_listening(
        self,
        exchange: str,
        keys: list[str],
        on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
        *,
        what: str,
        on_bound: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """Call `on_message` with a copy of each message routed through `exchange` with
        any of `keys`, for as long as the calling task lives (cancel it to stop): on a
        channel of this namespace's connection, bound again every RECONNECT_SECONDS after
        the connection or the channel went. `on_bound` is told each time it is bound (from
        then on nothing is missed), `on_lost` each time it was lost; `what` names it in
        the log."""
        from coordinator.errors import CoveyError
        from coordinator.gateway import BROKER_ERRORS, RECONNECT_SECONDS
        from coordinator.logs import get_logger

        while True:
            try:
                await self._listen_until_closed(exchange, keys, on_message, on_bound)
            except (*BROKER_ERRORS, CoveyError) as err:
                get_logger("covey").warning(
                    f"cannot listen for {what}; trying again", problem=str(err)
                )
            if on_lost is not None:
                on_lost()
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen_until_closed(
        self,
        exchange: str,
        keys: list[str],
        on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
        on_bound: Callable[[], None] | None,
    ) -> None:
        """One listener, until its channel closes (with its connection, whoever closed
        it); its channel closed when cancelled."""
        import contextlib

        from coordinator.gateway import BROKER_ERRORS

        gateway = await self.gateway()
        channel = await gateway.open_channel()
        # The channel's callback, not the connection's: those would pile up on a
        # long-lived connection, one for every listener it ever had.
        closed = asyncio.Event()
        channel.close_callbacks.add(lambda *_: closed.set())
        try:
            await gateway.listen(channel, exchange, keys, on_message)
            if on_bound is not None:
                on_bound()
            if not channel.is_closed:
                await closed.wait()
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await channel.close()

    # -- topology -----------------------------------------------------------------------

    async def apply_topology(self) -> topology.Topology:
        """Declare the core topology and every participant in the roster."""
        snapshot = self.snapshot
        plan = topology.for_roster(snapshot.roster, snapshot.settings)
        await (await self.gateway()).apply(plan)
        self._declared.update(snapshot.roster.participants())
        return plan

    async def ensure_participants(
        self, participants: list[Address], *, assume_core: bool = False
    ) -> None:
        """Declare the core and these participants' queues and bindings, once each.
        `assume_core` (a send's way) declares the participants' part alone first, as the
        core is there in any namespace set up before: a cold `covey send` made 22 round
        trips declaring both, 5 for its recipient's part. Binding to an exchange that is
        not there raises TopologyMissing, and then the core is declared too."""
        if all(p in self._declared for p in participants):
            return
        snapshot = self.snapshot
        if provisioned_as(snapshot.settings) is not None:
            return  # a provisioned participant may not declare: `covey provision` did
        async with self._declaring:  # concurrent sends to one recipient declare it once
            todo = [p for p in participants if p not in self._declared]
            if not todo:
                return
            roster, settings = snapshot.roster, snapshot.settings
            parts = [topology.for_participant(p, roster.teams_of(p), settings) for p in todo]
            gateway = await self.gateway()
            if assume_core:
                try:
                    await gateway.apply(topology.Topology.combine(parts))
                    self._declared.update(todo)
                    return
                except TopologyMissing:
                    pass  # a namespace nobody has set up yet: the core too
            core = topology.core(settings.changelog, settings.sessions, settings.replicas)
            await gateway.apply(topology.Topology.combine([core, *parts]))
            self._declared.update(todo)

    async def with_topology(
        self, operation: Callable[[], Awaitable[T]], participants: list[Address] | None = None
    ) -> T:
        """Run `operation`; if it finds covey's topology missing (a namespace nobody has
        set up, a participant's first use), declare it — just `participants`' part when
        given, else everything — and run it once more."""
        try:
            return await operation()
        except TopologyMissing:
            if participants:
                await self.ensure_participants(participants)
            else:
                await self.apply_topology()
            return await operation()

    # -- the changelog, for any agent ---------------------------------------------------

    async def digest(self, agent: str) -> Digest:
        """What `agent` would be shown if it started now."""
        from coordinator.digest import build

        snapshot = self.snapshot
        config = snapshot.roster.agent(agent)
        gateway = await self.gateway()
        me, budget = str(config.address), config.config.digest
        return await self.with_topology(lambda: build(gateway, agent, budget, me, snapshot.senders))

    async def advance(
        self, agent: str, offset: int, run_id: str = "digest", wait: float = 30.0
    ) -> None:
        """Move `agent`'s cursor to `offset` as a run that ended well would: under its
        lock (waiting up to `wait` s for a run of it to end), over the lock's own
        connection, so the broker fences the write."""
        from coordinator import changelog
        from coordinator.lock import Holder, LockSession, LockSpec

        holder = Holder.me(agent, run_id, self.settings.host)
        async with await LockSession.open(self.settings, holder) as locks:
            await locks.acquire(LockSpec.for_agent(agent), wait=wait)
            await changelog.advance(locks.gateway, agent, offset)

    async def changelog(
        self,
        since: int | datetime | None = None,
        author: str | None = None,
        tag: str | None = None,
        limit: int = 20,
    ) -> list[Logged]:
        """Changelog entries, oldest first: the newest `limit`, or the first `limit`
        from `since` (an offset, or a time); of `author` and with `tag`, when given.
        Each says whether the broker vouches for its author (`Logged.verified`)."""
        from coordinator import changelog, stream
        from coordinator.topology import CHANGELOG_STREAM

        who = str(Address.participant(author)) if author else None

        def keep(logged: Logged) -> bool:
            entry = logged.entry
            return (who is None or entry.author == who) and (tag is None or tag in entry.tags)

        gateway = await self.gateway()
        try:
            head = await stream.head(gateway, CHANGELOG_STREAM)
        except TopologyMissing:
            return []
        if head is None:
            return []
        senders = self.snapshot.senders  # is each writer its author?
        if since is None:
            newest = await changelog.newest_entries(gateway, 0, head, limit, keep, senders)
            return list(reversed(newest))
        found: list[Logged] = []
        entries = changelog.entries_from(gateway, since, head, senders)
        try:
            async for logged in entries:
                if keep(logged):
                    found.append(logged)
                    if len(found) == limit:
                        break
        finally:
            await entries.aclose()  # a stream consumer must be cancelled, not left
        return found

    # -- runs, for any agent -------------------------------------------------------------

    async def request_run(self, agent: str, requested_by: str | None = None) -> None:
        """Ask a running supervisor to run `agent` now; returns once the broker has the
        request. NoRecipient when no supervisor listens: nobody would ever run it."""
        from coordinator.errors import NoRecipient
        from coordinator.events import Event

        name = self.roster.agent(agent).name  # an unknown or broken agent is refused here
        request = Event(
            kind="run.requested", host=self.settings.host, agent=name, requested_by=requested_by
        )
        try:
            await (await self.gateway()).publish_event(request, mandatory=True)
        except NoRecipient:
            raise NoRecipient(
                "no supervisor is listening for run requests: start `covey supervise`, "
                f"or run it here with `covey run {name}`"
            ) from None

    # -- sessions, of any run ----------------------------------------------------------

    def attach(
        self, run_or_agent: str, start: Start = "start", follow: bool = True
    ) -> AsyncGenerator[tuple[int, SessionEvent], None]:
        """`(id, event)` of a run's session (a run id, or an agent: its live run, else its
        last) from `start` (`start`, `now`, or after an id seen) until it closes; see
        session_reader.follow."""
        from coordinator.session_reader import follow as following

        return following(self, run_or_agent, start, follow)
