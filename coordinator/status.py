"""`covey status`: per agent, its pending mail, whether it runs, its lock, its last and next run.

A broken agent (its agent.toml cannot be loaded) is listed too, with its problem:
its queue, its run lock and its run records do not depend on the file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from coordinator.envelope import now
from coordinator.errors import TopologyMissing
from coordinator.gateway import Gateway, in_parallel
from coordinator.lock import Holder, LockSpec, slot_state
from coordinator.names import Address
from coordinator.namespace import Namespace
from coordinator.records import RunRecord, recent_runs
from coordinator.roster import NO_LOCK
from coordinator.runner import configured_lock
from coordinator.schedule import Schedule

RECENT_RUNS = 500  # enough history to find most agents' last run in one read


@dataclass
class AgentStatus:
    name: str
    pending: int | None  # None: its queue does not exist yet
    running: bool
    run_holder: Holder | None  # who runs it; None for a moment while a run starts
    lock: str
    lock_holders: list[Holder | None]  # one per held slot; None: holder not known yet
    last_run: RunRecord | None
    next_run: datetime | None  # when its schedule next fires; only a supervisor acts on it
    schedule: str | None = None
    problem: str | None = None  # why its agent.toml cannot be loaded

    @property
    def broken(self) -> bool:
        return self.problem is not None

    @property
    def next_run_text(self) -> str:
        """The next firing, to the second for a six-field (seconds) schedule."""
        if self.next_run is None:
            return "-"
        seconds = self.schedule is not None and len(self.schedule.split()) == 6
        return self.next_run.isoformat(timespec="seconds" if seconds else "minutes")

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": self.name,
            "pending": self.pending,
            "running": self.running,
            "run": self.run_holder.model_dump(mode="json") if self.run_holder else None,
            "lock": self.lock,
            "lock_holders": [h.model_dump(mode="json") if h else None for h in self.lock_holders],
            "last_run": self.last_run.to_dict() if self.last_run else None,
            "next_run": self.next_run.isoformat() if self.next_run else None,
            "problem": self.problem,
        }


async def pending(namespace: Namespace, participant: Address) -> int | None:
    """How much mail waits in `participant`'s queue; None when it has none yet."""
    gateway = await namespace.gateway()
    try:
        queue = await gateway.queue(participant.queue)
    except TopologyMissing:
        return None
    await queue.channel.close()
    return queue.declaration_result.message_count or 0


PARALLELISM = 16  # held slots' notes read at once for /api/agents
PROBES = 16  # channels asking about queues at once (see `probe` in agent_statuses)


async def agent_statuses(namespace: Namespace) -> list[AgentStatus]:
    """Every agent's status (broken ones too), asked of the broker in parallel.

    Asking about one agent after another — a passive declare for its mail queue, one
    for its own lock slot and one for each slot of its shared lock (the same `global`
    slot once per agent) — is some 9,000 round trips in a row at 1,000 agents. Here
    each queue is asked about once, over
    PROBES channels (gateway.ready_counts for mail, `_held` for lock slots) while the
    run records are read, and the notes of the few held slots are read together."""

    gateway = await namespace.gateway()
    snapshot = namespace.snapshot
    roster = snapshot.roster
    names = sorted({*roster.agents, *roster.broken})
    own = {name: LockSpec.for_agent(name).queues[0] for name in names}
    shared = {
        name: configured_lock(snapshot.settings, agent) for name, agent in roster.agents.items()
    }
    mail = {
        name: (roster.agents[name].address if name in roster.agents else Address("agent", name))
        for name in names
    }
    slots = sorted({*own.values(), *(q for spec in shared.values() if spec for q in spec.queues)})

    async def probe() -> tuple[dict[str, int | None], dict[str, bool]]:
        # On a connection of its own: a probe for a slot nobody holds is answered by the
        # broker closing its channel, a thousand times at 1,000 agents, and a busy
        # connection's (session streams) need not carry that. The channels' close-ok is
        # never dropped (aiormq_fix), so they need not be few: at 1,000 agents, 16 took
        # 0.61-0.73 s, 4 took 0.73-0.87 s, 32 no less than 16 (the client's CPU bounds it).
        prober = await Gateway.connect(namespace.settings, f"{namespace.name} status")
        async with prober:
            counts = await prober.ready_counts([mail[n].queue for n in names], PROBES)
            return counts, await _held(prober, slots)

    # Together: finding the runs stream's head waits for quiet (stream.head), which
    # costs as much as the passive declares for a small roster.
    records, (pending, held) = await asyncio.gather(
        recent_runs(gateway, limit=RECENT_RUNS), probe()
    )
    last: dict[str, RunRecord] = {}
    for record in records:
        last[record.agent] = record
    holders: dict[str, Holder | None] = {}

    async def read_holders(_: int, share: Sequence[str]) -> None:
        for queue in share:
            still_held, holder = await slot_state(gateway, queue)
            held[queue] = still_held
            holders[queue] = holder

    await in_parallel([q for q in slots if held[q]], PARALLELISM, read_holders)
    moment = now()
    statuses = []
    for name in names:
        agent = roster.agents.get(name)
        running = held[own[name]]
        run_holder = holders.get(own[name]) if running else None
        if agent is None:  # broken: what it would lock and when it would run are unknown
            status = AgentStatus(
                name=name,
                pending=pending[mail[name].queue],
                running=running,
                run_holder=run_holder,
                lock="?",
                lock_holders=[],
                last_run=last.get(name),
                next_run=None,
                problem=roster.broken[name],
            )
        else:
            spec = shared[name]
            schedule = agent.config.schedule
            status = AgentStatus(
                name=name,
                pending=pending[mail[name].queue],
                running=running,
                run_holder=run_holder,
                lock=spec.name if spec else NO_LOCK,
                lock_holders=[holders.get(q) for q in (spec.queues if spec else []) if held[q]],
                last_run=last.get(name),
                next_run=Schedule(schedule, snapshot.settings.timezone).next_after(moment)
                if schedule
                else None,
                schedule=schedule,
            )
        statuses.append(status)
    return statuses


async def _held(gateway: Gateway, queues: Sequence[str]) -> dict[str, bool]:
    """Whether each lock slot is held, as `lock.slot_state` judges it (its queue exists,
    ours or another connection's), by passive declares over PROBES channels. A slot
    that is not held closes its channel (NOT_FOUND), so the next one opens another."""
    import aiormq

    held: dict[str, bool] = {}

    async def check(_: int, share: Sequence[str]) -> None:
        channel = await gateway.open_channel()
        try:
            for queue in share:
                if channel.is_closed:
                    channel = await gateway.open_channel()
                try:
                    await channel.declare_queue(queue, passive=True)
                    held[queue] = True
                except aiormq.exceptions.ChannelLockedResource:  # another connection's
                    held[queue] = True
                except aiormq.exceptions.ChannelNotFoundEntity:
                    held[queue] = False
        finally:
            if not channel.is_closed:
                await channel.close()

    await in_parallel(queues, PROBES, check)
    return held
