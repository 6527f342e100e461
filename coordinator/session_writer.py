"""Writing a run's session: what `covey run` publishes to `covey.sessions` as its agent runs.

The agent must never wait for the broker. `write` is synchronous and O(1): it numbers
the event (`seq`) and appends it to a queue in memory. One background task publishes
that queue in batches (whatever is queued, up to MAX_BATCH_EVENTS or MAX_BATCH_BYTES,
as one stream message, its confirm awaited before the next) over a connection of the
writer's own, which it opens again whenever the
broker drops it (every RECONNECT_SECONDS, the outage logged once, not per attempt).

The queue is bounded (MAX_EVENTS, MAX_BYTES). When the broker is gone or blocks
publishers for long enough to fill it, the *oldest* unsent events are dropped and
their seqs remembered: the end of a run (its last lines, its `result`) is what a
watcher needs most, and what comes when the broker is back is current at once. The
run log on disk keeps every line regardless.

At close the writer waits, a bounded time, for the queue to drain. Whatever it could
not publish is announced in a `missing` event (seq ranges and the run log's path),
published before `closed` if the broker allows; what not even that reached is in the
summary `close` returns, for the run's record (`run.finished`'s `session_missing`).
A session therefore never has a silent gap.

In the background too, the writer finds the id of its own `opened` event (the
session's first id) by reading the stream from just before it, and announces the
session with `session.opened.AGENT` on `covey.events`; `close` ends with
`session.closed.AGENT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from coordinator import stream
from coordinator.errors import CoveyError
from coordinator.events import Event, EventKind
from coordinator.gateway import BROKER_ERRORS, RECONNECT_SECONDS, Gateway
from coordinator.logs import get_logger
from coordinator.session import (
    EMITTED_KINDS,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_TEXT_CHARS,
    READ_PREFETCH,
    RUN_HEADER,
    STREAM,
    Kind,
    Pending,
    SessionBatch,
    event_id,
    parse_batch,
)
from coordinator.settings import Settings

log = get_logger(__name__)

# The bound on unsent events is their memory: 32 MiB is some 130,000 short lines (a
# backlog a fast agent makes in a second, and a healthy broker clears in seconds).
MAX_EVENTS = 200_000  # unsent events kept in memory, at most ...
MAX_BYTES = 32 * 1024 * 1024  # ... and about this many bytes of them
EVENT_BYTES = 200  # what an event costs beyond its text, roughly (model, JSON, AMQP)
# Closing: the writer waits for the queue to drain while batches keep being confirmed;
# FLUSH_STALL_SECONDS without one (the broker gone, or blocking) and it gives up, as it
# does after FLUSH_MAX_SECONDS in all. FINAL_SECONDS is for `missing` and `closed` after
# such a give-up: the broker has just shown it is not taking anything.
FLUSH_STALL_SECONDS = 5.0
FLUSH_MAX_SECONDS = 60.0
FINAL_SECONDS = 2.0
# On a cluster (several `amqp_urls`), a batch not confirmed in this time is published
# again, on a fresh channel (see Gateway._confirmed: a publish in flight when the
# stream's leader stopped is never confirmed). Generous for a healthy broker, which
# confirms a batch in milliseconds; short enough that a batch given up on is published
# again, and confirmed, well within FLUSH_STALL_SECONDS at close. A timeout that was only
# slowness costs a repeat, which readers pass by. On one node no leader moves, and a
# publish waits as long as it takes: under an alarm the broker stops reading the
# connection, and the batch in flight goes through the moment the alarm clears, where
# a timeout would spend that moment reopening a channel.
CONFIRM_SECONDS = 3.0
FIRST_ID_SECONDS = 30.0  # how long the background search for the `opened` offset may take
LOOKBACK = timedelta(seconds=1)  # clocks differ: start that search a little early
LAST_OFFSET = 2**63 - 1


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """What a closed writer tells the run's record."""

    first_id: int | None  # the id of the `opened` event, when it was found
    since: datetime  # when the session opened
    missing: list[list[int]]  # seq ranges [first, last] never confirmed by the broker

    @property
    def session_missing(self) -> list[list[int]] | None:
        return self.missing or None


def ranges(seqs: Iterable[list[int]]) -> list[list[int]]:
    """Seq ranges sorted and merged where they touch or overlap."""
    merged: list[list[int]] = []
    for first, last in sorted(seqs):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return merged


class SessionWriter:
    """Publishes one run's session. Make it with `open` (inside the event loop), feed it
    with `write`, end it with `close`. Nothing it does raises into the run."""

    def __init__(
        self,
        settings: Settings,
        agent: str,
        run_id: str,
        log_path: Path,
        *,
        max_events: int = MAX_EVENTS,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.agent, self.run_id, self.log_path = agent, run_id, log_path
        self._settings = settings
        self._max_events, self._max_bytes = max_events, max_bytes
        self._queue: deque[Pending] = deque()  # written, not yet taken into a batch
        self._bytes = 0  # of the queue, roughly
        self._batch: list[Pending] = []  # being published, or to be published again
        self._next_seq = 0
        self._dropped: list[list[int]] = []  # seq ranges dropped from a full queue
        self._wake = asyncio.Event()  # something was written
        self._progress = asyncio.Event()  # a batch was confirmed
        self._opened = asyncio.Event()  # seq 0 is on the broker
        self._gateway: Gateway | None = None
        self._connecting = asyncio.Lock()
        self._outage_since: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: asyncio.Future[None] | None = None  # see abandon
        self.since = datetime.now(UTC)
        self.first_id: int | None = None
        self.published = 0  # events the broker confirmed
        self.dropped = 0  # events dropped from a full queue
        self.failures = 0  # publishing attempts that failed

    @classmethod
    def open(
        cls,
        settings: Settings,
        agent: str,
        run_id: str,
        log_path: Path,
        *,
        command: list[str],
        trigger: str,
        **bounds: int,
    ) -> SessionWriter:
        """Queue the `opened` event and start publishing in the background; returns at once."""
        writer = cls(settings, agent, run_id, log_path, **bounds)
        writer.write("opened", data={"command": command, "trigger": trigger}, at=writer.since)
        writer._start()
        return writer

    def _start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name=f"session {self.run_id}"),
            asyncio.create_task(self._announce(), name=f"session {self.run_id} announce"),
        ]

    # -- writing -------------------------------------------------------------

    def write(
        self,
        kind: Kind,
        text: str = "",
        data: dict[str, Any] | None = None,
        at: datetime | None = None,
    ) -> int:
        """Queue one event and return its seq; never waits, never raises for the broker."""
        seq = self._next_seq
        self._next_seq += 1
        text = text[:MAX_TEXT_CHARS]  # the run log keeps it whole
        self._queue.append((seq, kind, at or datetime.now(UTC), text, data))
        self._bytes += len(text) + EVENT_BYTES
        self._keep_bound()
        self._wake.set()
        return seq

    def emitted(self, kind: str, text: str, data: dict[str, Any] | None) -> None:
        """What the agent emitted itself (`covey emit`; the run's socket checked it)."""
        if kind in EMITTED_KINDS:
            self.write(cast(Kind, kind), text, data)

    def lines(self, texts: Iterable[str], at: datetime) -> None:
        """Queue lines the agent printed, that arrived together at `at`: as `write` does,
        all at once (a fast agent's lines come hundreds to a chunk of its output)."""
        first = self._next_seq
        lines: list[Pending] = [
            (first + n, "line", at, text[:MAX_TEXT_CHARS], None) for n, text in enumerate(texts)
        ]
        self._next_seq += len(lines)
        self._queue.extend(lines)
        self._bytes += sum(len(line[3]) for line in lines) + EVENT_BYTES * len(lines)
        self._keep_bound()
        self._wake.set()

    def _keep_bound(self) -> None:
        while len(self._queue) > self._max_events or self._bytes > self._max_bytes:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        seq, _, _, text, _ = self._queue.popleft()
        self._bytes -= len(text) + EVENT_BYTES
        self.dropped += 1
        if self._dropped and self._dropped[-1][1] == seq - 1:
            self._dropped[-1][1] = seq
        else:
            self._dropped.append([seq, seq])

    # -- publishing ----------------------------------------------------------

    async def _publish_forever(self) -> None:
        """Publish the queue as it fills, batch by batch, until cancelled. A batch that
        fails is published again, whole, once the broker answers."""
        while True:
            if not self._batch:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._take_batch()
            try:
                await self._publish(self._batch)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # whatever it is, the run goes on
                self._trouble(err)
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            self.published += len(self._batch)
            if self._batch[0][0] == 0:
                self._opened.set()
            self._batch = []
            self._recovered()
            self._progress.set()
            # Let the run read its agent's output before the next batch is built.
            await asyncio.sleep(0)

    def _take_batch(self) -> None:
        """The next message's events: what is queued, up to MAX_BATCH_EVENTS and about
        MAX_BATCH_BYTES (at least one event, however long). Taken whole, then what is over
        the bytes given back: short lines, the usual case, never go one by one."""
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH_EVENTS))]
        size = sum(len(event[3]) for event in batch) + EVENT_BYTES * len(batch)
        while size > MAX_BATCH_BYTES and len(batch) > 1:
            event = batch.pop()
            queue.appendleft(event)
            size -= len(event[3]) + EVENT_BYTES
        self._batch = batch
        self._bytes -= size

    async def _publish(self, batch: list[Pending]) -> None:
        gateway = await self._connected()
        events = SessionBatch.of(self.run_id, self.agent, batch)
        several = len(self._settings.broker_urls) > 1
        await gateway.publish_session(events, timeout=CONFIRM_SECONDS if several else None)

    async def _connected(self) -> Gateway:
        """The writer's own gateway: it reconnects by itself once it has connected."""
        async with self._connecting:  # the publisher and the announcer share it
            if self._gateway is None:
                self._gateway = await Gateway.connect(
                    self._settings, f"covey session {self.agent} {self.run_id}", reconnects=True
                )
            return self._gateway

    def _trouble(self, err: Exception) -> None:
        self.failures += 1
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "session events not published; retrying (the run log keeps every line)",
                run_id=self.run_id,
                error=str(err) or type(err).__name__,
            )

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.info(
                "session events published again",
                run_id=self.run_id,
                after_seconds=round(time.monotonic() - self._outage_since, 1),
                dropped=self.dropped,
            )
            self._outage_since = None

    # -- the session's first id, and the control events ------------------------

    async def _announce(self) -> None:
        """Once `opened` is on the broker: find its offset, then say `session.opened`."""
        await self._opened.wait()
        self.first_id = await self._find_first_id()
        await self._control("session.opened", self._settings.connect_timeout)

    async def _find_first_id(self) -> int | None:
        """The id of this run's `opened` event, read from the stream from just
        before it was written (a time, not an offset: the cost is what was written
        since, whatever the stream's length). None if it cannot be found in time."""
        deadline = time.monotonic() + FIRST_ID_SECONDS
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    return await self._search_first_id()
            except TimeoutError:
                break
            except (CoveyError, *BROKER_ERRORS) as err:
                log.info("session's first id not found yet", run_id=self.run_id, error=str(err))
                await asyncio.sleep(RECONNECT_SECONDS)
        return None

    async def _search_first_id(self) -> int | None:
        gateway = await self._connected()
        items = stream.items_from(
            gateway, STREAM, self.since - LOOKBACK, stop_at=LAST_OFFSET, prefetch=READ_PREFETCH
        )
        async with contextlib.aclosing(items):
            async for item in items:
                run = (item.message.headers or {}).get(RUN_HEADER)
                if isinstance(run, bytes):
                    run = run.decode(errors="replace")
                if run != self.run_id:
                    continue
                for index, event in enumerate(parse_batch(item.body) or []):
                    if event.seq == 0:
                        return event_id(item.offset, index)
        return None

    async def _control(self, kind: EventKind, timeout: float, **fields: Any) -> None:
        """Publish a `session.*` event, waiting `timeout` seconds at most; a broker that is
        away costs the event, not the run."""
        event = Event(
            kind=kind,
            host=self._settings.host,
            agent=self.agent,
            run_id=self.run_id,
            stream=STREAM,
            first_id=self.first_id,
            since=self.since,
            **fields,
        )
        try:
            async with asyncio.timeout(timeout):
                gateway = await self._connected()
                await gateway.publish_event(event)
        except (TimeoutError, CoveyError, *BROKER_ERRORS) as err:
            log.warning("could not publish event", kind=kind, error=str(err))

    # -- closing -------------------------------------------------------------

    async def close(
        self, outcome: str, exit_code: int | None, reason: str | None
    ) -> SessionSummary:
        """Flush (bounded), announce what could not be published, write `closed`, say
        `session.closed`, and disconnect. Returns what the run's record needs."""
        try:
            return await self._close(outcome, exit_code, reason)
        except Exception as err:  # a bug here must not cost the run its record
            log.warning("session not closed cleanly", run_id=self.run_id, error=repr(err))
            return SessionSummary(self.first_id, self.since, [[0, self._next_seq - 1]])
        finally:
            await self._stop_tasks()
            if self._gateway is not None:
                with contextlib.suppress(Exception):
                    await self._gateway.close()

    async def _close(
        self, outcome: str, exit_code: int | None, reason: str | None
    ) -> SessionSummary:
        flushed = await self._drained(FLUSH_STALL_SECONDS)
        missing = ranges(self._dropped)
        if not flushed:  # what is still queued is given up: announced as missing instead
            missing = ranges([*missing, *(await self._take_unsent())])
        if missing:
            self.write("missing", data={"seqs": missing, "log": str(self.log_path)})
        ending = {"outcome": outcome, "exit_code": exit_code, "reason": reason}
        self.write("closed", data=ending)
        if not await self._drained(FLUSH_STALL_SECONDS if flushed else FINAL_SECONDS):
            missing = ranges([*missing, *(await self._take_unsent())])
        # `session.opened` (and the first id) before `session.closed`, if it comes soon.
        await asyncio.wait({self._tasks[1]}, timeout=FLUSH_STALL_SECONDS if flushed else 0)
        self._tasks[1].cancel()
        summary = SessionSummary(self.first_id, self.since, missing)
        timeout = FLUSH_STALL_SECONDS if flushed else FINAL_SECONDS
        await self._control(
            "session.closed", timeout, session_missing=summary.session_missing, **ending
        )
        if missing:
            log.warning(
                "session incomplete: some events were not published; the run log has its lines",
                run_id=self.run_id,
                missing=missing,
                log=str(self.log_path),
            )
        return summary

    async def _drained(self, stall: float) -> bool:
        """Wait until everything written is confirmed: True, or False once no batch has
        been confirmed for `stall` seconds (or FLUSH_MAX_SECONDS have passed)."""
        deadline = time.monotonic() + FLUSH_MAX_SECONDS
        while True:
            self._progress.clear()
            if not (self._queue or self._batch):
                return True
            wait = min(stall, deadline - time.monotonic())
            try:
                async with asyncio.timeout(max(wait, 0)):
                    await self._progress.wait()
            except TimeoutError:
                return False

    async def _take_unsent(self) -> list[list[int]]:
        """Stop publishing; what was queued or in flight is given up (as seq ranges), and
        a new publisher starts for what is written next. Something in flight may still
        land: then it is both in the session and announced missing, never neither."""
        self._tasks[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks[0]
        unsent = [[item[0], item[0]] for item in (*self._batch, *self._queue)]
        self._batch, self._bytes = [], 0
        self._queue.clear()
        self._tasks[0] = asyncio.create_task(self._publish_forever(), name=f"session {self.run_id}")
        return ranges(unsent)

    def abandon(self) -> None:
        """Stop at once, publishing nothing more (the run is being cancelled)."""
        for task in self._tasks:
            task.cancel()
        if self._gateway is not None:
            # Nobody may await this any more: the connection closes in the background.
            self._closing = asyncio.ensure_future(self._gateway.close())

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
