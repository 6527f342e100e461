"""Reading sessions back: finding a run's session, following it live, listing and watching.

A session's events are in the shared `covey.sessions` stream (see session.py),
each run's among every other run's. A reader attaches at an offset, skips other
runs' messages by their `x-covey-run` header without parsing them, and stops at
its run's `closed`. What it yields are `(id, event)` pairs, one per event though a
message carries a batch of them, the id being `offset * IDS_PER_OFFSET + index` (see
session.py): a reader that saw id N and comes back asks for what is after N, and gets
exactly that. A batch its writer published twice (its confirm lost) shows once: the
reader passes events whose `seq` it has already passed.

Finding where a run starts costs what was written around its start, not what came
after it: a run id begins with the moment it was made (`20261203T062340-ab12cd`,
see runner.new_run_id), and a stream can be attached at a time, so the reader
attaches a little before that moment and reads forward to the run's first event.

Retention is honest. A run whose whole session is gone, though its run record is
still in `covey.runs`, is `NotRetained` (its own exit code); a resume from an id
retention has removed yields an `expired` event naming the ids first, never a
silent jump.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import ValidationError

from coordinator import records, stream
from coordinator.errors import BrokerUnavailable, NotFound, NotRetained
from coordinator.events import Event
from coordinator.gateway import BROKER_ERRORS, RECONNECT_SECONDS, Gateway
from coordinator.logs import get_logger
from coordinator.namespace import Namespace
from coordinator.session import (
    RUN_HEADER,
    STREAM,
    SessionEvent,
    event_id,
    offset_of,
    parse_batch,
)
from coordinator.topology import EVENTS_EXCHANGE

log = get_logger(__name__)

Start = int | Literal["start", "now"]
PREFETCH = 500
# A run id's moment is the runner host's clock; chunk timestamps are the broker's. Attaching
# this much earlier covers a skew between the two, at the cost of skipping (unparsed) what
# other runs wrote in that time.
CLOCK_MARGIN = timedelta(seconds=30)
AGENT_RUNS_SCANNED = 20  # an agent's newest runs, among which its newest that started
LOST_POLL_SECONDS = 0.5  # how often a quiet reader checks its connection is still there
RECONNECT_GIVE_UP_SECONDS = 60.0  # a broker away longer than this ends the attach (exit 4)
OPENING_SECONDS = 5.0  # a run recorded as running whose session has not opened yet


@dataclass(frozen=True, slots=True)
class RunSession:
    """Where one run's session is: its first retained event and what it says."""

    run_id: str
    agent: str
    first_id: int  # the id of its first event still retained
    first_seq: int  # that event's seq: above 0 when retention removed its beginning
    since: datetime  # when that event happened


# -- finding a run -----------------------------------------------------------------------


def run_started_at(run_id: str) -> datetime | None:
    """The moment a run id was made, from its leading `YYYYmmddTHHMMSS`; None if it has none."""
    try:
        return datetime.strptime(run_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


async def find_run(namespace: Namespace, run_or_agent: str) -> RunSession:
    """The session of a run id, or of an agent's live run (else its last).

    NotFound (exit 2) when there is no such run; NotRetained (exit 9) when there was,
    but retention has removed its whole session."""
    gateway = await namespace.gateway()
    run_id, since = run_or_agent, run_started_at(run_or_agent)
    record: records.RunRecord | None = None
    if run_or_agent in namespace.roster.agents:
        # A run skipped (lock busy, preflight) never started: it has no session.
        recent = await records.recent_runs(gateway, run_or_agent, limit=AGENT_RUNS_SCANNED)
        started = [r for r in recent if r.started_at is not None]
        if not started:
            raise NotFound(f"{run_or_agent} has no recorded run yet: `covey sessions` lists runs")
        record = started[-1]
        run_id, since = record.run_id, run_started_at(record.run_id) or record.started_at
    elif since is None:  # no moment in it: only a run record can say when it was
        record = await records.find_record(gateway, run_id)
        since = record.started_at if record else None
    if since is None:
        raise NotFound(f"no run {run_id!r}: `covey sessions` lists live and recent runs")
    deadline = asyncio.get_running_loop().time() + OPENING_SECONDS
    while (found := await _first_event(gateway, run_id, since)) is None:
        record = record or await records.find_record(gateway, run_id)
        if record is None:
            raise NotFound(f"no run {run_id!r}: `covey sessions` lists live and recent runs")
        if record.outcome != records.RUNNING or asyncio.get_running_loop().time() > deadline:
            raise NotRetained(
                f"the session of run {run_id} ({record.agent}) is no longer retained "
                "([sessions] max_age, max_bytes in covey.toml); the run log on "
                f"{record.host} has every line"
            )
        await asyncio.sleep(LOST_POLL_SECONDS)  # started, its session not opened yet
    return found


async def _first_event(gateway: Gateway, run_id: str, since: datetime) -> RunSession | None:
    """The run's first event still in the stream, read forward from just before `since`
    up to the stream's head at the time of asking."""
    top = await stream.head(gateway, STREAM)
    if top is None:
        return None
    items = stream.items_from(gateway, STREAM, since - CLOCK_MARGIN, stop_at=top)
    async with contextlib.aclosing(items):
        async for item in items:
            if _run_of(item.message) != run_id:
                continue
            events = parse_batch(item.body)
            if events:
                one = events[0]
                return RunSession(run_id, one.agent, event_id(item.offset, 0), one.seq, one.at)
    return None


def _run_of(message: AbstractIncomingMessage) -> str | None:
    value = (message.headers or {}).get(RUN_HEADER)
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def expired(run: RunSession, first: int | None, last: int, lost_seqs: int | None) -> SessionEvent:
    """The notice a reader makes when ids `first`..`last` are gone (`first` None: from
    the run's beginning, `lost_seqs` of its events)."""
    if first is None:
        text = f"the first {lost_seqs} events of this run are no longer retained"
    else:
        text = f"{last - first + 1} events (ids {first}-{last}) are no longer retained"
    return SessionEvent(
        run_id=run.run_id,
        agent=run.agent,
        seq=0,
        kind="expired",
        at=run.since,
        text=text,
        data={"from": first, "to": last},
    )


# -- following -----------------------------------------------------------------------------


class _Lost(Exception):
    """The reader's connection or channel went away: reconnect and resume."""


@dataclass
class _Reader:
    """One run's reading position, kept across connections."""

    run: RunSession
    next_id: int  # the first id not yet passed
    stop_at: int | None  # --no-follow: the stream's head (an offset) when it began
    quiet_through: int | None  # "now": events up to this offset are passed, not shown
    last_seq: int = -1  # the run's highest seq passed: a batch published twice shows once
    done: bool = False

    async def read(self, gateway: Gateway) -> AsyncGenerator[tuple[int, SessionEvent], None]:
        """This run's events from `next_id`, on one connection, until the end."""
        channel = await gateway.open_channel(prefetch=PREFETCH)
        try:
            deliveries = await _consume(gateway, channel, offset_of(self.next_id))
            first = True
            while not self.done:
                message = await _next(deliveries, gateway, channel)
                if message is None:  # quiet
                    self.done = self.stop_at is not None and offset_of(self.next_id) > self.stop_at
                    continue
                await message.ack()
                offset = int(message.headers["x-stream-offset"])  # type: ignore[arg-type]
                retained = event_id(offset, 0)
                if first and retained > self.next_id:  # retention took what was asked
                    yield self.next_id, expired(self.run, self.next_id, retained - 1, None)
                first = False
                if offset < offset_of(self.next_id):  # the chunk it started in began earlier
                    continue
                for item in self._passed(message, offset):
                    yield item

        finally:
            if not channel.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):  # closing cancels the consumer
                    await channel.close()

    def _passed(
        self, message: AbstractIncomingMessage, offset: int
    ) -> list[tuple[int, SessionEvent]]:
        """What of the message at `offset` is to be shown, all of it now passed."""
        seen_through = self.next_id - 1  # ids up to here a client has had
        self.next_id = event_id(offset + 1, 0)
        self.done = self.stop_at is not None and offset >= self.stop_at
        if _run_of(message) != self.run.run_id:
            return []
        shown = []
        for index, event in enumerate(parse_batch(message.body) or []):
            repeat = event.seq <= self.last_seq
            self.last_seq = max(self.last_seq, event.seq)
            if repeat or event_id(offset, index) <= seen_through:
                continue
            self.done = self.done or event.final
            if event.final or self.quiet_through is None or offset > self.quiet_through:
                shown.append((event_id(offset, index), event))
            if event.final:
                break
        return shown


async def _consume(
    gateway: Gateway, channel: AbstractChannel, offset: int
) -> asyncio.Queue[AbstractIncomingMessage | None]:
    """Consume the stream from `offset` into a queue (None in it: the channel closed).
    A callback into a queue, not aio-pika's queue iterator, so that closing the channel
    is all it takes to stop."""
    deliveries: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
    queue = await gateway.queue(STREAM, channel)
    channel.close_callbacks.add(lambda *_: deliveries.put_nowait(None))
    await queue.consume(deliveries.put, arguments={"x-stream-offset": offset})
    return deliveries


async def _next(
    deliveries: asyncio.Queue[AbstractIncomingMessage | None],
    gateway: Gateway,
    channel: AbstractChannel,
) -> AbstractIncomingMessage | None:
    """The next delivery; None after LOST_POLL_SECONDS of quiet; _Lost when the channel
    or the connection is gone (checked while quiet too: a cut connection may say nothing)."""
    try:
        message = await asyncio.wait_for(deliveries.get(), LOST_POLL_SECONDS)
    except TimeoutError:
        message = None
        if channel.is_closed or not gateway.alive:
            raise _Lost from None
        return None
    if message is None:
        raise _Lost
    return message


async def follow(
    namespace: Namespace,
    run_id: str,
    start: Start = "start",
    follow: bool = True,
    *,
    found: RunSession | None = None,
) -> AsyncGenerator[tuple[int, SessionEvent], None]:
    """Yield `(id, event)` of a run's session (a run id, or an agent: its live run, else
    its last) from `start` — its beginning, `now`, or after the id given — in order, until
    its `closed`; with `follow=False`, until what the stream held when it began.
    `found`: the run as `find_run` found it already (a caller that had to answer
    "no such run" before it began), so it is not looked for twice.

    A dropped connection is reopened and reading resumes after the last id seen: no
    gap, no repeat. Ids retention removed come first as one `expired` event."""
    run = found if found is not None else await find_run(namespace, run_id)
    reader = await _reader(namespace, run, start, follow)
    if start == "start" and run.first_seq > 0:
        yield run.first_id, expired(run, None, run.first_id - 1, run.first_seq)
    gave_up_at: float | None = None
    while not reader.done:
        try:
            async with contextlib.aclosing(reader.read(await namespace.gateway())) as items:
                async for item in items:
                    gave_up_at = None
                    yield item
        except (_Lost, BrokerUnavailable, *BROKER_ERRORS) as err:
            now_ = asyncio.get_running_loop().time()
            gave_up_at = gave_up_at or now_ + RECONNECT_GIVE_UP_SECONDS
            if now_ > gave_up_at:
                raise BrokerUnavailable(
                    f"lost RabbitMQ while following run {run.run_id}; "
                    f"`covey attach {run.run_id} --from {reader.next_id - 1}` resumes"
                ) from None
            log.info("session reader reconnecting", run_id=run.run_id, error=str(err))
            await asyncio.sleep(RECONNECT_SECONDS)


async def _reader(namespace: Namespace, run: RunSession, start: Start, follow: bool) -> _Reader:
    gateway = await namespace.gateway()
    top = None if follow and start != "now" else await stream.head(gateway, STREAM)
    if isinstance(start, str):  # "start"; "now" reads from the start too, showing nothing
        first = run.first_id  # of what was there already but the `closed` (if it was)
    else:
        # After the id given; an id before the run's first is the run's first, unless
        # retention removed that beginning (then the reader says so).
        first = start + 1 if run.first_seq > 0 else max(start + 1, run.first_id)
    return _Reader(
        run,
        next_id=first,
        stop_at=None if follow else (top if top is not None else -1),
        quiet_through=top if start == "now" else None,
    )


# -- listing and watching ----------------------------------------------------------------------


async def list_sessions(namespace: Namespace, limit: int = 20) -> list[records.RunRecord]:
    """Live and recent sessions, oldest first: the runs that started, from their records.

    Run records (`covey.runs`, two small events a run, with `running`/`lost` judged by
    the agent's lock) are the cheapest correct source: the session stream holds every
    line of every run, and reading it to list runs would cost all of their output."""
    runs = await records.recent_runs(await namespace.gateway(), limit=limit * 2)
    return [r for r in runs if r.started_at is not None][-limit:]


@contextlib.asynccontextmanager
async def watch_sessions(namespace: Namespace) -> AsyncIterator[AsyncIterator[Event]]:
    """Listen for `session.opened` from now on; the iterator yields each as it comes.
    Listening starts before the body runs, so a list made inside misses nothing."""
    gateway = await namespace.gateway()
    opened: asyncio.Queue[Event] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(ValidationError):
            event = Event.model_validate_json(message.body)
            if event.kind == "session.opened":
                opened.put_nowait(event)

    async def each() -> AsyncIterator[Event]:
        while True:
            yield await opened.get()

    channel = await gateway.open_channel()
    try:
        await gateway.listen(channel, EVENTS_EXCHANGE, ["session.opened.*"], on_message)
        yield each()
    finally:
        if not channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()
