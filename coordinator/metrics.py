"""Prometheus metrics for `covey supervise`, on a registry of its own (no global state).

Two kinds of figures:

* what this supervisor did — runs, durations, lock waits and holds, preflight
  failures — counted from its runs' events as they happen;
* what the broker holds — mail waiting per participant, dead and unrouted
  letters, who holds each lock, the changelog's head and each agent's lag —
  gathered by a background refresh every REFRESH_SECONDS over a few parallel
  channels, so a scrape only reads the latest snapshot and stays fast however
  large the roster (`covey_broker_figures_age_seconds` says how fresh it is).
  A refresh that took long spaces the next one out (never more than a third
  of the time is spent refreshing), and cursors, which move only when a run
  ends, are read again every CURSOR_REFRESH_SECONDS, or at once after a run
  of this supervisor ended: at 1,000 agents a cursor read per agent every
  5 s kept a core a quarter busy.

Where each quorum queue and stream keeps its replicas (its leader, its members, how
many are online) comes from RabbitMQ's management API, where it answers (see
replicas.py), every REPLICAS_REFRESH_SECONDS: `covey_queue_online_members` below
`covey_queue_members` is what the under-replication alert watches.

Message rates per queue are RabbitMQ's own job: its `rabbitmq_prometheus`
plugin (port 15692) exports them, and the dashboard reads them from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator import __version__, changelog, stream
from coordinator.changelog import Cursor
from coordinator.errors import CoveyError
from coordinator.events import Event
from coordinator.gateway import Gateway, in_parallel
from coordinator.lock import LockSpec, slot_state
from coordinator.logs import get_logger
from coordinator.namespace import Namespace
from coordinator.outcome import Outcome
from coordinator.records import recent_runs
from coordinator.replicas import QueueReplicas, replicas
from coordinator.roster import GLOBAL_LOCK
from coordinator.schedule import Schedule
from coordinator.topology import CHANGELOG_STREAM, DEAD, UNROUTED

log = get_logger(__name__)

REFRESH_SECONDS = 5.0
CURSOR_REFRESH_SECONDS = 60.0
REPLICAS_REFRESH_SECONDS = 15.0
PARALLEL_CHANNELS = 8


@dataclass
class BrokerFigures:
    """One snapshot of what the broker holds."""

    taken_at: float = 0.0
    pending: dict[str, int] = field(default_factory=dict)  # participant -> ready messages
    dead_letters: int | None = None
    unrouted: int | None = None
    holders: list[tuple[str, str, datetime | None]] = field(default_factory=list)
    changelog_head: int | None = None
    lag: dict[str, int] = field(default_factory=dict)  # agent -> entries after its cursor


class Metrics:
    def __init__(self, namespace: Namespace) -> None:
        self.namespace = namespace
        self.registry = CollectorRegistry()
        r = self.registry
        Info("covey_build", "covey's version", registry=r).info({"version": __version__})
        self.up = Gauge("covey_up", "1 while the supervisor runs", registry=r)
        self.up.set(1)
        self.roster_agents = Gauge("covey_roster_agents", "agents in the roster", registry=r)
        self.runs = Counter(
            "covey_runs", "runs by outcome", ["agent", "outcome", "trigger"], registry=r
        )
        self.run_duration = Histogram(
            "covey_run_duration_seconds",
            "how long runs took",
            ["agent"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
            registry=r,
        )
        self.running = Gauge("covey_agent_running", "1 while the agent runs", ["agent"], registry=r)
        self.last_run = Gauge(
            "covey_last_run_timestamp_seconds",
            "when the agent last finished a run, by outcome",
            ["agent", "outcome"],
            registry=r,
        )
        self.failures_in_a_row = Gauge(
            "covey_agent_consecutive_failures",
            "failed, timed-out or lock-lost runs since the agent's last ok run",
            ["agent"],
            registry=r,
        )
        self.schedule_interval = Gauge(
            "covey_agent_schedule_interval_seconds",
            "the time between two firings of the agent's schedule",
            ["agent"],
            registry=r,
        )
        self.lock_wait = Histogram(
            "covey_lock_wait_seconds",
            "how long runs waited for a lock",
            ["lock"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300),
            registry=r,
        )
        self.lock_held = Histogram(
            "covey_lock_held_seconds",
            "how long runs held a lock",
            ["lock"],
            buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200),
            registry=r,
        )
        self.lock_lost = Counter(
            "covey_lock_lost", "runs stopped because their lock was lost", ["agent"], registry=r
        )
        self.preflight_failures = Counter(
            "covey_preflight_failures",
            "runs skipped by a failing preflight check",
            ["agent", "hook"],
            registry=r,
        )
        self.figures = BrokerFigures()
        self.replicas: list[QueueReplicas] = []  # none known: the management API is silent
        self._cursors: dict[str, Cursor | None] = {}  # the last read of each agent's cursor
        self._cursors_moved: set[str] = set()  # agents whose run ended since
        r.register(_BrokerCollector(self))
        self.describe_roster()

    def describe_roster(self) -> None:
        """Figures that follow from the roster alone; again after a reload."""
        self.roster_agents.set(len(self.namespace.roster.agents))
        self.schedule_interval.clear()  # an agent removed, or unscheduled, loses its series
        zone = self.namespace.settings.timezone
        for name, agent in self.namespace.roster.agents.items():
            if agent.config.schedule:
                schedule = Schedule(agent.config.schedule, zone)
                first = schedule.next_after(datetime.now(schedule.zone))
                second = schedule.next_after(first)
                self.schedule_interval.labels(name).set((second - first).total_seconds())

    def observe(self, event: Event) -> None:
        """Count one of this supervisor's run events (the runner's observer)."""
        agent = event.agent or "unknown"
        if event.kind == "run.started":
            self.running.labels(agent).set(1)
        elif event.kind == "lock.acquired" and event.wait_seconds is not None:
            self.lock_wait.labels(event.lock).observe(event.wait_seconds)
        elif event.kind == "lock.released" and event.held_seconds is not None:
            self.lock_held.labels(event.lock).observe(event.held_seconds)
        elif event.kind == "run.finished":
            self._finished(agent, event)
            self._cursors_moved.add(agent)

    def _finished(self, agent: str, event: Event) -> None:
        label = event.outcome or "unknown"
        outcome = event.run_outcome  # None for one this version does not know
        self.running.labels(agent).set(0)
        self.runs.labels(agent, label, event.trigger or "unknown").inc()
        self.last_run.labels(agent, label).set(event.at.timestamp())
        skipped = outcome is not None and outcome.is_skip
        if event.duration_seconds is not None and not skipped:
            self.run_duration.labels(agent).observe(event.duration_seconds)
        if outcome is Outcome.OK:
            self.failures_in_a_row.labels(agent).set(0)
        elif outcome is not None and outcome.is_failure:
            self.failures_in_a_row.labels(agent).inc()
        if outcome is Outcome.LOCK_LOST:
            self.lock_lost.labels(agent).inc()
        if outcome is Outcome.SKIPPED_PREFLIGHT:
            self.preflight_failures.labels(agent, event.hook or "unknown").inc()

    async def remember_last_runs(self) -> None:
        """Seed the last-run times from the run records, so that a restarted supervisor
        does not look as if no agent had ever run."""
        try:
            records = await recent_runs(await self.namespace.gateway(), limit=1000)
        except CoveyError as err:
            log.warning("could not read past runs for the metrics", error=str(err))
            return
        for record in records:
            if record.finished_at is not None and record.agent in self.namespace.roster.agents:
                self.last_run.labels(record.agent, record.outcome).set(
                    record.finished_at.timestamp()
                )

    async def refresh_until(self, stop: asyncio.Event) -> None:
        """Refresh the broker figures every REFRESH_SECONDS until `stop` is set. The loop
        watches `stop` rather than trusting a cancel alone: see `supervisor.Supervisor.serve`."""
        cursors_read_at = replicas_read_at = float("-inf")
        while not stop.is_set():
            started = time.monotonic()
            if started - replicas_read_at >= REPLICAS_REFRESH_SECONDS:
                replicas_read_at = started
                try:
                    self.replicas = await replicas(self.namespace.settings) or []
                except Exception as err:  # as below: the metrics outlive a bad refresh
                    log.warning("could not read the queues' replicas", error=str(err))
            if started - cursors_read_at >= CURSOR_REFRESH_SECONDS:
                stale, cursors_read_at = set(self.namespace.roster.agents), started
            else:
                stale = self._cursors_moved
            self._cursors_moved = set()
            try:
                self.figures = await gather(self.namespace, self._cursors, stale)
            except Exception as err:  # the metrics must outlive any one bad refresh
                log.warning("could not gather broker figures", error=str(err))
                self._cursors_moved |= stale
            took = time.monotonic() - started
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(REFRESH_SECONDS, 2 * took)):
                    await stop.wait()


class _BrokerCollector(Collector):
    """Hands the latest broker snapshot to each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        f = self.metrics.figures
        age = time.time() - f.taken_at if f.taken_at else float("nan")
        yield _gauge(
            "covey_broker_figures_age_seconds", "how old the broker figures are", [((), age)]
        )
        yield _gauge(
            "covey_mailbox_pending",
            "messages waiting in the participant's queue (not yet fetched)",
            [((p,), n) for p, n in sorted(f.pending.items())],
            ["participant"],
        )
        for name, doc, value in (
            ("covey_dead_letters", "messages in covey.dead", f.dead_letters),
            ("covey_unrouted_messages", "messages in covey.unrouted", f.unrouted),
            ("covey_changelog_head_offset", "the newest changelog offset", f.changelog_head),
        ):
            yield _gauge(name, doc, [((), value)] if value is not None else [])
        yield _gauge(
            "covey_lock_holder",
            "1 for the agent holding each lock",
            [((lock, agent), 1) for lock, agent, _ in f.holders],
            ["lock", "agent"],
        )
        yield _gauge(
            "covey_lock_held_since_seconds",
            "when the holder took the lock (Unix time)",
            [((lock, agent), t.timestamp()) for lock, agent, t in f.holders if t is not None],
            ["lock", "agent"],
        )
        yield _gauge(
            "covey_changelog_lag_entries",
            "changelog entries after the agent's cursor",
            [((agent,), n) for agent, n in sorted(f.lag.items())],
            ["agent"],
        )
        queues = self.metrics.replicas
        yield _gauge(
            "covey_queue_members",
            "the replicas a quorum queue or stream has (from the management API)",
            [((q.name, q.type), len(q.members)) for q in queues],
            ["queue", "type"],
        )
        yield _gauge(
            "covey_queue_online_members",
            "the replicas of a quorum queue or stream that are online",
            [((q.name, q.type), len(q.online)) for q in queues],
            ["queue", "type"],
        )
        yield _gauge(
            "covey_queue_leader",
            "1 for the node that leads each quorum queue or stream",
            [((q.name, q.leader), 1) for q in queues if q.leader],
            ["queue", "node"],
        )


def _gauge(
    name: str,
    doc: str,
    samples: Iterable[tuple[Sequence[str], float]],
    labels: Sequence[str] = (),
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


async def gather(
    namespace: Namespace, cursors: dict[str, Cursor | None], stale: Iterable[str]
) -> BrokerFigures:
    """One snapshot of the broker-side figures for the roster. `cursors` holds what
    was read before; those of `stale` agents (and of any not read yet) are read again."""
    gateway = await namespace.gateway()
    snapshot = namespace.snapshot
    roster = snapshot.roster
    participants = [str(p) for p in roster.participants()]
    queue_names = [p.queue for p in roster.participants()]
    counts = await gateway.ready_counts([*queue_names, DEAD, UNROUTED], PARALLEL_CHANNELS)
    figures = BrokerFigures(
        taken_at=time.time(),
        pending={
            p: count
            for p, q in zip(participants, queue_names, strict=True)
            if (count := counts[q]) is not None
        },
        dead_letters=counts[DEAD],
        unrouted=counts[UNROUTED],
    )
    locks = [LockSpec(GLOBAL_LOCK)] + [
        LockSpec(name, config.slots) for name, config in snapshot.settings.locks.items()
    ]
    for spec in locks:
        for queue in spec.queues:
            held, holder = await slot_state(gateway, queue)
            if held:
                figures.holders.append(
                    (
                        spec.name,
                        holder.agent if holder else "unknown",
                        holder.since if holder else None,
                    )
                )
    try:
        figures.changelog_head = await stream.head(gateway, CHANGELOG_STREAM)
    except CoveyError:
        figures.changelog_head = None
    if figures.changelog_head is not None:
        unread = set(stale) | (set(roster.agents) - set(cursors))
        cursors.update(await _cursors(gateway, [a for a in roster.agents if a in unread]))
        for agent in roster.agents:
            cursor = cursors.get(agent)
            seen = cursor.offset if cursor is not None else -1
            figures.lag[agent] = max(0, figures.changelog_head - seen)
    return figures


async def _cursors(gateway: Gateway, agents: Sequence[str]) -> dict[str, Cursor | None]:
    results: dict[str, Cursor | None] = {}

    async def read(_: int, share: Sequence[str]) -> None:
        for agent in share:
            results[agent] = await changelog.cursor_of(gateway, agent)

    await in_parallel(agents, PARALLEL_CHANNELS, read)
    return results
