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

A finished run gets nothing more, so a reader never waits on one: asked to resume
at or after its `closed`, it shows that `closed` again; when its writer could not
publish the end of its session, the outcome and the seqs it lacks come from the
run's record (`run.finished`). Watching for new sessions survives a lost
connection as following one does, and lists what started while it was away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import ValidationError

from coordinator import records, stream
from coordinator.errors import (
    BrokerUnavailable,
    CoveyError,
    NotFound,
    NotRetained,
)
from coordinator.events import Event
from coordinator.gateway import BROKER_ERRORS, RECONNECT_SECONDS, Gateway, close_channel
from coordinator.logs import get_logger
from coordinator.namespace import Namespace
from coordinator.session import (
    READ_PREFETCH,
    RUN_HEADER,
    STREAM,
    Kind,
    SessionEvent,
    event_id,
    offset_of,
    parse_batch,
)
from coordinator.topology import EVENTS_EXCHANGE

log = get_logger(__name__)

Start = int | Literal["start", "now"]
PREFETCH = READ_PREFETCH  # batches of up to 1,000 events each: see session.py
# A run id's moment is the runner host's clock; chunk timestamps are the broker's. Attaching
# this much earlier covers a skew between the two, at the cost of skipping (unparsed) what
# other runs wrote in that time.
CLOCK_MARGIN = timedelta(seconds=30)
AGENT_RUNS_SCANNED = 20  # an agent's newest runs, among which its newest that started
LOST_POLL_SECONDS = 0.5  # how often a quiet reader checks its connection is still there
RECONNECT_GIVE_UP_SECONDS = 60.0  # a broker away longer than this ends the attach (exit 4)
OPENING_SECONDS = 5.0  # a run recorded as running whose session has not opened yet
# A run's `closed` is confirmed before its record's `run.finished`, by at most the end of
# its writer's close (a stall bound, `session.opened`, `session.closed`) and the lock's
# release: looking this much earlier finds it.
CLOSING_MARGIN = timedelta(seconds=30)
# A watcher back from a lost connection lists the runs that started since shortly before
# it last knew it was listening: a run's record says when it started, its session opens
# a little later (its `session.opened` waits for the id of its first event), and clocks
# differ. Those it printed already are printed once (deduped by run id).
MISSED_MARGIN = timedelta(minutes=2)
MISSED_RUNS = 50  # the newest runs listed first; more while all are that recent


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
    items = stream.items_from(gateway, STREAM, since - CLOCK_MARGIN, stop_at=top, prefetch=PREFETCH)
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
    """One run's reading position, kept across connections.

    A run that has finished gets nothing more, so a reader that has not met its `closed`
    by then does not wait for one: past the stream's head as it was when reading began
    (`top`), it looks at the run's record once. If the run finished, reading ends at the
    stream's head as it is now, and how the run ended is shown all the same: its `closed`
    event, found behind where the client asked to start (it had it, or asked from later),
    or, when its writer could never publish it, made from the record — with the seqs the
    record names as missing first, so the gap is never silent."""

    run: RunSession
    next_id: int  # the first id not yet passed
    stop_at: int | None  # --no-follow: the stream's head (an offset) when it began
    quiet_through: int | None  # "now": events up to this offset are passed, not shown
    top: int | None  # the stream's head when reading began
    last_seq: int = -1  # the run's highest seq passed: a batch published twice shows once
    done: bool = False
    closed_shown: bool = False
    looked_up: bool = False  # the run's record, looked at once past `top`
    finished: records.RunRecord | None = None  # that record, if it said the run finished
    ending: list[tuple[int, SessionEvent]] | None = None  # its end, once found or made

    async def read(self, gateway: Gateway) -> AsyncGenerator[tuple[int, SessionEvent], None]:
        """This run's events from `next_id`, on one connection, until the end."""
        channel, deliveries = await _consume(gateway, offset_of(self.next_id))
        try:
            first = True
            while not self.done:
                message = await _next(deliveries, gateway, channel)
                if message is None:  # quiet
                    self.done = self.stop_at is not None and offset_of(self.next_id) > self.stop_at
                else:
                    offset = int(message.headers["x-stream-offset"])  # type: ignore[arg-type]
                    retained = event_id(offset, 0)
                    if first and retained > self.next_id:  # retention took what was asked
                        yield self.next_id, expired(self.run, self.next_id, retained - 1, None)
                    first = False
                    if offset >= offset_of(self.next_id):  # the chunk may have begun earlier
                        for item in self._passed(message, offset):
                            yield item
                    # Acked once shown, not before: an ack only gives the broker credit for
                    # one more message, and waiting for it to be written held each event up
                    # by some 0.3 ms on its way to a live watcher.
                    await message.ack()
                if not (self.looked_up or self.ending or self.closed_shown) and self._past_top():
                    await self._look_up(gateway)
                if self.done and not self.closed_shown:
                    self.done = await self._ends_here(gateway)
            if not self.closed_shown:
                self.closed_shown = True
                for item in self.ending or []:
                    yield item
        finally:
            await close_channel(channel, quiet=True)  # closing cancels the consumer

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
            if repeat:
                continue
            if event_id(offset, index) <= seen_through:
                if event.final:  # the client had it, and nothing follows: said again at the end
                    self.ending, self.done = [(event_id(offset, index), event)], True
                    break
                continue
            self.done = self.done or event.final
            if event.final or self.quiet_through is None or offset > self.quiet_through:
                shown.append((event_id(offset, index), event))
            if event.final:
                self.closed_shown = True
                break
        return shown

    def _past_top(self) -> bool:
        return self.top is not None and offset_of(self.next_id) > self.top

    async def _look_up(self, gateway: Gateway) -> None:
        """Whether the run has finished, from its record: then read to the head, no further."""
        self.looked_up = True
        record = await records.find_record(gateway, self.run.run_id)
        if record is None or record.finished_at is None:  # running, lost, or too old
            return
        self.finished = record
        if self.stop_at is None:
            self.stop_at = await stream.head(gateway, STREAM)
        self.done = self.stop_at is None or offset_of(self.next_id) > self.stop_at

    async def _ends_here(self, gateway: Gateway) -> bool:
        """Reading has reached its stop: whether it ends here. Not if the run finished and
        its `closed` is still ahead (a head found under load may be a little short): then
        reading goes on to it."""
        if self.finished is None or self.ending is not None:
            return True
        found = await _closing_of(gateway, self.run, self.finished)
        if found is not None and found[0] >= self.next_id:
            self.stop_at = offset_of(found[0])
            return False
        self.ending = [found] if found else _recorded_ending(self.run, self.finished, self)
        return True


async def _closing_of(
    gateway: Gateway, run: RunSession, record: records.RunRecord
) -> tuple[int, SessionEvent] | None:
    """A finished run's `closed` event and its id, read from a little before the run's
    record says it finished (its writer closes the session before that) up to the stream's
    head; None if it is not there (its writer could not publish it)."""
    assert record.finished_at is not None
    top = await stream.head(gateway, STREAM)
    if top is None:
        return None
    since = max(run.since, record.finished_at - CLOSING_MARGIN) - CLOCK_MARGIN
    items = stream.items_from(gateway, STREAM, since, stop_at=top, prefetch=PREFETCH)
    async with contextlib.aclosing(items):
        async for item in items:
            if _run_of(item.message) != run.run_id:
                continue
            for index, event in enumerate(parse_batch(item.body) or []):
                if event.final:
                    return event_id(item.offset, index), event
    return None


def _recorded_ending(
    run: RunSession, record: records.RunRecord, reader: _Reader
) -> list[tuple[int, SessionEvent]]:
    """How a run ended, made from its record when its `closed` never reached the stream:
    the seqs its writer could not publish (the record names them), then the outcome. Their
    ids are where the reader stopped; resuming from them shows this ending again."""
    assert record.finished_at is not None
    missing = record.session_missing or []
    seq = max([reader.last_seq + 1, *(last for _, last in missing)])
    ending = []
    if missing:
        notice = {"seqs": missing, "log": f"the run log on {record.host}"}
        ending.append(_made(run, max(seq - 1, 0), "missing", record.finished_at, notice))
    outcome = {"outcome": record.outcome, "exit_code": record.exit_code, "reason": record.reason}
    ending.append(_made(run, seq, "closed", record.finished_at, outcome))
    return [(reader.next_id + n, event) for n, event in enumerate(ending)]


def _made(
    run: RunSession, seq: int, kind: Kind, at: datetime, data: dict[str, Any]
) -> SessionEvent:
    return SessionEvent(run_id=run.run_id, agent=run.agent, seq=seq, kind=kind, at=at, data=data)


async def _consume(
    gateway: Gateway, offset: int
) -> tuple[AbstractChannel, asyncio.Queue[AbstractIncomingMessage | None]]:
    """Consume the stream from `offset` into a queue (None in it: the channel closed), on
    a channel of its own (on a node with a replica of it: Gateway.consume_stream). A
    callback into a queue, not aio-pika's queue iterator, so that closing the channel is
    all it takes to stop."""
    deliveries: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
    channel = (await gateway.consume_stream(STREAM, offset, deliveries.put, PREFETCH)).channel
    # Quiet, the reader checks `channel.is_closed` too: a close before this is not missed.
    channel.close_callbacks.add(lambda *_: deliveries.put_nowait(None))
    return channel, deliveries


async def _next(
    deliveries: asyncio.Queue[AbstractIncomingMessage | None],
    gateway: Gateway,
    channel: AbstractChannel,
) -> AbstractIncomingMessage | None:
    """The next delivery; None after LOST_POLL_SECONDS of quiet; _Lost when the channel
    or the connection is gone (checked while quiet too: a cut connection may say nothing)."""
    try:
        async with asyncio.timeout(LOST_POLL_SECONDS):
            message = await deliveries.get()
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
    gap, no repeat. Ids retention removed come first as one `expired` event. A run that
    has finished ends with its `closed` even when resumed at or after it (see _Reader)."""
    run = found if found is not None else await find_run(namespace, run_id)
    reader: _Reader | None = None  # made on the first connection that answers
    gave_up_at: float | None = None
    while reader is None or not reader.done:
        try:
            if reader is None:
                reader = await _reader(namespace, run, start, follow)
                if start == "start" and run.first_seq > 0:
                    yield run.first_id, expired(run, None, run.first_id - 1, run.first_seq)
            async with contextlib.aclosing(reader.read(await namespace.gateway())) as items:
                async for item in items:
                    gave_up_at = None
                    yield item
        except (_Lost, BrokerUnavailable, *BROKER_ERRORS) as err:
            if (task := asyncio.current_task()) is not None and task.cancelling():
                # Not a lost connection but a cancel (Ctrl-C) that landed in a call to
                # the broker: aiormq then closes the channel, and the call may fail with
                # the channel's error instead. Reconnecting would swallow the cancel.
                raise asyncio.CancelledError from err
            now_ = asyncio.get_running_loop().time()
            gave_up_at = gave_up_at or now_ + RECONNECT_GIVE_UP_SECONDS
            if now_ > gave_up_at:
                resume = f" --from {reader.next_id - 1}" if reader is not None else ""
                raise BrokerUnavailable(
                    f"lost RabbitMQ while following run {run.run_id}; "
                    f"`covey attach {run.run_id}{resume}` resumes"
                ) from None
            log.info("session reader reconnecting", run_id=run.run_id, error=str(err))
            await asyncio.sleep(RECONNECT_SECONDS)


async def _reader(namespace: Namespace, run: RunSession, start: Start, follow: bool) -> _Reader:
    gateway = await namespace.gateway()
    top = await stream.head(gateway, STREAM)
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
        top=top,
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
    Listening starts before the body runs, so a list made inside misses nothing.

    A lost connection is reopened (every RECONNECT_SECONDS; BrokerUnavailable, exit 4,
    after RECONNECT_GIVE_UP_SECONDS) and listening resumes; then the runs that started
    while nobody listened come too, their `session.opened` made from their records (with
    the outcome, if they have already ended). A run may come twice: a caller that prints
    each once dedupes by run id."""
    watch = _Watch(namespace)
    await watch.listen()
    try:
        yield watch.each()
    finally:
        await watch.stop_listening()


class _Watch:
    """One `session.opened` listener, listening again after a lost connection."""

    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self.opened: asyncio.Queue[Event | None] = asyncio.Queue()  # None: a channel closed
        self.gateway: Gateway | None = None
        self.channel: AbstractChannel | None = None
        self.heard_at = datetime.now(UTC)  # the last moment it was surely listening

    async def listen(self) -> None:
        self.gateway = gateway = await self.namespace.gateway()
        self.channel = channel = await gateway.open_channel()
        channel.close_callbacks.add(lambda *_: self.opened.put_nowait(None))
        await gateway.listen(channel, EVENTS_EXCHANGE, ["session.opened.*"], self._on_message)
        self.heard_at = datetime.now(UTC)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(ValidationError):
            event = Event.model_validate_json(message.body)
            if event.kind == "session.opened":
                self.opened.put_nowait(event)

    def _listening(self) -> bool:
        """Checked while quiet too: a cut connection may say nothing."""
        return (
            self.channel is not None
            and not self.channel.is_closed
            and self.gateway is not None
            and self.gateway.alive
        )

    async def each(self) -> AsyncIterator[Event]:
        while True:
            try:
                async with asyncio.timeout(LOST_POLL_SECONDS):
                    event = await self.opened.get()
            except TimeoutError:
                event = None
            if event is not None:
                yield event
            elif self._listening():  # quiet, or an old channel's closing
                self.heard_at = datetime.now(UTC)
            else:
                for record in await self._listen_again():
                    yield _opened(record)

    async def _listen_again(self) -> list[records.RunRecord]:
        """Listen again, then list the runs that started while nobody listened."""
        lost_at = self.heard_at
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + RECONNECT_GIVE_UP_SECONDS
        log.info("session watcher reconnecting")
        while True:
            await self.stop_listening()
            try:
                await self.listen()
                return await _started_since(self.namespace, lost_at - MISSED_MARGIN)
            except (CoveyError, *BROKER_ERRORS) as err:
                if loop.time() > give_up_at:
                    raise BrokerUnavailable(
                        "lost RabbitMQ while following sessions, and it did not come back "
                        f"within {RECONNECT_GIVE_UP_SECONDS:g} s; `covey sessions` lists them"
                    ) from None
                log.info("session watcher reconnecting", error=str(err))
                await asyncio.sleep(RECONNECT_SECONDS)

    async def stop_listening(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            await close_channel(channel, quiet=True)


def _opened(record: records.RunRecord) -> Event:
    """The `session.opened` of a run that started while nobody listened, from its record."""
    return Event(
        kind="session.opened",
        at=record.at,
        host=record.host,
        agent=record.agent,
        run_id=record.run_id,
        trigger=record.trigger,
        outcome=None if record.outcome == records.RUNNING else record.outcome,
        stream=STREAM,
        since=record.started_at,
    )


async def _started_since(namespace: Namespace, since: datetime) -> list[records.RunRecord]:
    """The sessions that started at `since` or later, oldest first: the newest runs,
    looked at further back until the oldest of them is older than that."""
    limit = MISSED_RUNS
    while True:
        runs = await list_sessions(namespace, limit)
        if len(runs) < limit or runs[0].at < since or limit >= records.RECORDS_SCANNED:
            return [r for r in runs if r.at >= since]
        limit *= 4
