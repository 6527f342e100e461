"""Stopping a run from anywhere: `covey stop`, and how the run that is asked hears it.

A stop is a request on the control channel, `stop.requested.AGENT` on
`covey.events`, naming the run. The `covey run` (or `covey supervise`) that runs
it listens for that key from just before it records `run.started` to the end of
the run, so a run that `covey runs` shows as running is one that hears it. It
stops the agent as SIGTERM does (the process group, then SIGKILL after the
agent's `grace`) and records the outcome `stopped`, with who asked and why, in
`run.finished` and in the session's `closed` event.

Who may stop which run is the broker's decision, not this module's: in a
provisioned namespace people may publish `stop.requested.*` and agents may not
publish it at all (topic permissions, see provision.py), so no agent can stop
another's run. Who asked is taken from the message's `user_id`, which the broker
vouches for, not from what the request claims (`SenderCheck`, as for mail): a
claim the signer may not make is recorded as that broker user instead.

The asker publishes `mandatory`, so a run that nobody runs any more is told
apart at once from one that is stopping; then it waits for the run's
`run.finished`, which it listens for before it asks, so the end is never missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coordinator.errors import CoveyError, NoRecipient, NotFound, NotRunning
from coordinator.events import Event
from coordinator.logs import get_logger

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from coordinator.identity import SenderCheck
    from coordinator.namespace import Namespace
    from coordinator.records import RunRecord

log = get_logger(__name__)

REASON_LIMIT = 500  # characters of a stop's reason kept (it lands in the run record)
BIND_WAIT_SECONDS = 5.0  # a run waits this long at most for its listener to be bound
WAIT_MARGIN_SECONDS = 30.0  # beyond the agent's grace: recording, a slow broker
AGENT_RUNS_SCANNED = 20  # an agent's newest runs looked at to find its live one


@dataclass(frozen=True, slots=True)
class StopRequest:
    """Who asked a run to stop (a participant the broker vouched for, else the broker
    user that asked), and why, if they said."""

    by: str
    reason: str | None = None

    def describe(self) -> str:
        """The run's reason for its outcome: `stopped by human:ada: wrong branch`."""
        return f"stopped by {self.by}" + (f": {self.reason}" if self.reason else "")


class StopSignal:
    """A run's own stop: set once, by the first request that reaches it."""

    def __init__(self) -> None:
        self.request: StopRequest | None = None
        self._set = asyncio.Event()

    def ask(self, request: StopRequest) -> None:
        if self.request is None:
            self.request = request
            self._set.set()

    async def wait(self) -> None:
        await self._set.wait()


# -- the asker --------------------------------------------------------------------------


async def live_run(namespace: Namespace, run_or_agent: str) -> RunRecord:
    """The record of a run id, or of an agent's live run, if it is running now.

    NotFound (exit 2) for a run id covey.runs does not know; NotRunning (exit 10) for a
    run that has ended, or an agent that is not running."""
    from coordinator.display import printable
    from coordinator.records import RUNNING, find_record, recent_runs

    gateway = await namespace.gateway()
    if run_or_agent in namespace.roster.agents:
        runs = await recent_runs(gateway, run_or_agent, limit=AGENT_RUNS_SCANNED)
        live = [r for r in runs if r.started_at is not None and r.outcome == RUNNING]
        if not live:
            last = next((r for r in reversed(runs) if r.started_at is not None), None)
            ended = f" (its last run, {last.run_id}, ended {last.outcome})" if last else ""
            raise NotRunning(f"{run_or_agent} is not running{printable(ended)}: nothing to stop")
        return live[-1]
    record = await find_record(gateway, run_or_agent)
    if record is None:
        raise NotFound(
            f"no run {printable(run_or_agent)!r}: `covey sessions` lists live and recent runs"
        )
    if record.outcome != RUNNING:
        raise NotRunning(
            f"run {record.run_id} of {record.agent} is not running (it ended "
            f"{printable(record.outcome)}): nothing to stop"
        )
    return record


async def request_stop(
    namespace: Namespace,
    run_or_agent: str,
    requested_by: str | None,
    reason: str | None = None,
    wait: float | None = None,
) -> Event:
    """Ask a live run (a run id, or an agent: its live run) to stop, and return its
    `run.finished` once it has ended (its outcome is `stopped`, unless it ended by
    itself first). A run still going after `wait` seconds (default: the agent's grace,
    which SIGKILL ends, plus WAIT_MARGIN) is CoveyError (exit 1)."""
    from coordinator import topology

    record = await live_run(namespace, run_or_agent)
    if wait is None:
        agent = namespace.roster.agents.get(record.agent)
        wait = (agent.config.grace if agent else 0.0) + WAIT_MARGIN_SECONDS
    gateway = await namespace.gateway()
    finished: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

    async def on_finished(message: AbstractIncomingMessage) -> None:
        event = _event(message.body)
        if event is not None and event.run_id == record.run_id and not finished.done():
            finished.set_result(event)

    channel = await gateway.open_channel()
    try:
        # Listening before asking: a run that stops at once is still heard ending.
        key = f"run.finished.{record.agent}"
        await gateway.listen(channel, topology.EVENTS_EXCHANGE, [key], on_finished)
        request = Event(
            kind="stop.requested",
            host=namespace.settings.host,
            agent=record.agent,
            run_id=record.run_id,
            requested_by=requested_by,
            reason=reason[:REASON_LIMIT] if reason else None,
        )
        try:
            await gateway.publish_event(request, mandatory=True)
        except NoRecipient:
            raise NotRunning(
                f"run {record.run_id} of {record.agent} is not listening for a stop: it has "
                f"just ended, or the covey that ran it is gone (`covey runs {record.agent}`)"
            ) from None
        try:
            async with asyncio.timeout(wait):
                return await finished
        except TimeoutError:
            raise CoveyError(
                f"asked run {record.run_id} of {record.agent} to stop; it has not ended "
                f"after {wait:g} s (`covey runs {record.agent}` shows when it does)"
            ) from None
    finally:
        from coordinator.gateway import BROKER_ERRORS

        if not channel.is_closed:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()


# -- the run ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def listening(
    namespace: Namespace, agent: str, run_id: str, signal: StopSignal, senders: SenderCheck
) -> AsyncIterator[None]:
    """While the block runs, a stop request for this run sets `signal`. The listener
    follows the namespace's connection: dropped, it listens again on the next one.

    The block starts once the listener is bound (or after BIND_WAIT_SECONDS, with the
    broker away: the run goes on, and the listener binds when it can), so a `covey
    stop` sent as soon as `run.started` is recorded is heard, not refused."""
    bound = asyncio.Event()
    task = asyncio.create_task(_listen(namespace, agent, run_id, signal, senders, bound))
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BIND_WAIT_SECONDS):
                await bound.wait()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _listen(
    namespace: Namespace,
    agent: str,
    run_id: str,
    signal: StopSignal,
    senders: SenderCheck,
    bound: asyncio.Event,
) -> None:
    from coordinator import topology

    async def on_request(message: AbstractIncomingMessage) -> None:
        event = _event(message.body)
        if event is None or event.kind != "stop.requested" or event.run_id != run_id:
            return  # another run of this agent's (an old request), or junk
        signal.ask(_request_of(event, message.user_id, senders))
        log.info("asked to stop", by=signal.request.by if signal.request else None)

    await namespace.keep_listening(
        topology.EVENTS_EXCHANGE,
        [f"stop.requested.{agent}"],
        on_request,
        what="stop requests",
        on_bound=bound.set,
    )


def _request_of(event: Event, user_id: str | None, senders: SenderCheck) -> StopRequest:
    """Who asked, as far as the broker vouches: the claimed participant when the
    signer may speak for it, else the signing broker user."""
    claimed = event.requested_by
    if claimed is not None and senders.problem(claimed, user_id) is None:
        by = claimed
    else:
        by = f"broker user {user_id!r}" if user_id else "an unnamed broker user"
    # Kept as sent, bounded: whatever shows it neutralises it, as every event field.
    return StopRequest(by, event.reason[:REASON_LIMIT] if event.reason else None)


def _event(body: bytes) -> Event | None:
    from pydantic import ValidationError

    try:
        return Event.model_validate_json(body)
    except ValidationError:
        return None
