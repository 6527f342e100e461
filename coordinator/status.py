"""`covey status`: per agent, its pending mail, whether it runs, its lock, its last and next run.

A broken agent (its agent.toml cannot be loaded) is listed too, with its problem:
its queue, its run lock and its run records do not depend on the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from coordinator.envelope import now
from coordinator.errors import TopologyMissing
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


async def agent_statuses(namespace: Namespace) -> list[AgentStatus]:
    gateway = await namespace.gateway()
    snapshot = namespace.snapshot
    last: dict[str, RunRecord] = {}
    for record in await recent_runs(gateway, limit=RECENT_RUNS):
        last[record.agent] = record
    statuses = []
    moment = now()
    roster = snapshot.roster
    for name in sorted({*roster.agents, *roster.broken}):
        held, holder = await slot_state(gateway, LockSpec.for_agent(name).queues[0])
        agent = roster.agents.get(name)
        if agent is None:  # broken: what it would lock and when it would run are unknown
            statuses.append(
                AgentStatus(
                    name=name,
                    pending=await pending(namespace, Address("agent", name)),
                    running=held,
                    run_holder=holder if held else None,
                    lock="?",
                    lock_holders=[],
                    last_run=last.get(name),
                    next_run=None,
                    problem=roster.broken[name],
                )
            )
            continue
        spec = configured_lock(snapshot.settings, agent)
        holders = []
        for queue in spec.queues if spec else []:
            slot_held, slot_holder = await slot_state(gateway, queue)
            if slot_held:
                holders.append(slot_holder)
        schedule = agent.config.schedule
        statuses.append(
            AgentStatus(
                name=name,
                pending=await pending(namespace, agent.address),
                running=held,
                run_holder=holder if held else None,
                lock=spec.name if spec else NO_LOCK,
                lock_holders=holders,
                last_run=last.get(name),
                next_run=Schedule(schedule, snapshot.settings.timezone).next_after(moment)
                if schedule
                else None,
                schedule=schedule,
            )
        )
    return statuses
