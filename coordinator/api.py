"""The JSON API's answers: typed views of the core, one function per resource.

Everything here reads through the same core the CLI uses (status, run records,
sessions, the changelog, dead letters) and returns pydantic models, so the web
layer (web.py) only maps paths and errors, and the OpenAPI document is drawn
from these very models. Every text field that came from a participant or an
agent is returned as is: JSON carries it safely, and the page escapes it where
it shows it.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coordinator.errors import NotFound

if TYPE_CHECKING:
    from coordinator.lock import Holder
    from coordinator.namespace import Namespace
    from coordinator.records import RunRecord
    from coordinator.status import AgentStatus

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


class View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorView(View):
    """What every error answers: one line naming the problem and the fix."""

    error: str
    status: int


class HolderView(View):
    """Who holds a lock slot: a run of an agent, on a host, since when."""

    agent: str
    run_id: str
    host: str
    pid: int | None = None
    since: datetime | None = None

    @classmethod
    def of(cls, holder: Holder) -> HolderView:
        return cls(
            agent=holder.agent,
            run_id=holder.run_id,
            host=holder.host,
            pid=holder.pid,
            since=holder.since,
        )


class RunView(View):
    """One run as its record says (`covey runs`): `running` or `lost` when it has not
    reported an end."""

    agent: str
    run_id: str
    trigger: str | None
    host: str
    started_at: datetime | None
    finished_at: datetime | None
    outcome: str
    exit_code: int | None
    duration_seconds: float | None
    reason: str | None
    stopped_by: str | None
    fencing_token: int | None = Field(description="of the agent's own lock")
    fencing_tokens: dict[str, int] | None = Field(description="of every lock it held")
    lease_wait_seconds: float | None = Field(
        description="spent waiting out a previous holder's lease"
    )

    @classmethod
    def of(cls, record: RunRecord) -> RunView:
        return cls(
            agent=record.agent,
            run_id=record.run_id,
            trigger=record.trigger,
            host=record.host,
            started_at=record.started_at,
            finished_at=record.finished_at,
            outcome=record.outcome,
            exit_code=record.exit_code,
            duration_seconds=record.duration_seconds,
            reason=record.reason,
            stopped_by=record.stopped_by,
            fencing_token=record.fencing_token,
            fencing_tokens=record.fencing_tokens,
            lease_wait_seconds=record.lease_wait_seconds,
        )


class AgentView(View):
    """An agent as `covey status` shows it."""

    name: str
    state: Literal["running", "idle", "broken"]
    pending: int | None = Field(description="mail waiting in its queue; null: no queue yet")
    lock: str = Field(description="the shared lock it takes ('none': none)")
    lock_holders: list[HolderView | None]
    run: HolderView | None = Field(description="the run holding its own lock, when running")
    last_run: RunView | None
    next_run: datetime | None
    schedule: str | None
    problem: str | None = Field(description="why its agent.toml cannot be loaded")

    @classmethod
    def of(cls, status: AgentStatus) -> AgentView:
        state: Literal["running", "idle", "broken"] = (
            "broken" if status.broken else "running" if status.running else "idle"
        )
        return cls(
            name=status.name,
            state=state,
            pending=status.pending,
            lock=status.lock,
            lock_holders=[HolderView.of(h) if h else None for h in status.lock_holders],
            run=HolderView.of(status.run_holder) if status.run_holder else None,
            last_run=RunView.of(status.last_run) if status.last_run else None,
            next_run=status.next_run,
            schedule=status.schedule,
            problem=status.problem,
        )


class LockView(View):
    """A shared lock (`global`, covey.toml's `[locks.*]`): its slots and who holds them."""

    name: str
    slots: int
    holders: list[HolderView | None] = Field(description="one per held slot; null: not known yet")


class EntryView(View):
    """A changelog entry, with its offset and whether the broker vouches for its author."""

    offset: int
    author: str
    created_at: datetime
    summary: str
    body: str
    tags: list[str]
    run_id: str | None
    signed_by: str | None
    verified: bool


class DeadLetterView(View):
    """A dead or unroutable letter: why it died, where it was going, who signed it."""

    id: str
    queue: str
    reason: str
    detail: str
    routing_key: str
    replay_to: str
    signed_by: str | None
    verified: bool
    dead_at: datetime | None
    reported_by: str | None = None
    claimed_signer: str | None = None
    warning: str | None = None


# -- answers ------------------------------------------------------------------------------


async def agents(namespace: Namespace) -> list[AgentView]:
    from coordinator.status import agent_statuses

    return [AgentView.of(status) for status in await agent_statuses(namespace)]


async def locks(namespace: Namespace) -> list[LockView]:
    from coordinator.lock import LockSpec, slot_state
    from coordinator.roster import GLOBAL_LOCK

    settings = namespace.settings
    specs = [LockSpec(GLOBAL_LOCK, 1)] + [
        LockSpec(name, config.slots)
        for name, config in sorted(settings.locks.items())
        if name != GLOBAL_LOCK
    ]
    gateway = await namespace.gateway()
    views = []
    for spec in specs:
        holders: list[HolderView | None] = []
        for queue in spec.queues:
            held, holder = await slot_state(gateway, queue)
            if held:
                holders.append(HolderView.of(holder) if holder else None)
        views.append(LockView(name=spec.name, slots=spec.slots, holders=holders))
    return views


async def runs(
    namespace: Namespace,
    agent: str | None = None,
    outcome: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[RunView]:
    """The newest `limit` runs (of `agent`, with `outcome`, when given), oldest first."""
    from coordinator.records import recent_runs

    if agent is not None and agent not in namespace.roster.agents:
        known = ", ".join(sorted(namespace.roster.agents)) or "none"
        raise NotFound(f"no agent {agent!r} in the roster (known: {known})")
    gateway = await namespace.gateway()
    # An outcome filter reads further back, as an agent filter does, to fill `limit`.
    scan = limit * (10 if outcome else 1)
    records = await recent_runs(gateway, agent, min(scan, MAX_LIMIT * 10))
    chosen = [r for r in records if outcome is None or r.outcome == outcome]
    return [RunView.of(record) for record in chosen[-limit:]]


async def run(namespace: Namespace, run_id: str) -> RunView:
    from coordinator.records import find_record

    record = await find_record(await namespace.gateway(), run_id)
    if record is None:
        raise NotFound(f"no run {run_id!r} among the recent ones: /api/runs lists them")
    return RunView.of(record)


async def sessions(namespace: Namespace, limit: int = DEFAULT_LIMIT) -> list[RunView]:
    """Live and recent sessions: the runs that started, oldest first."""
    from coordinator.session_reader import list_sessions

    return [RunView.of(record) for record in await list_sessions(namespace, limit)]


async def changelog(
    namespace: Namespace, since: int | datetime | None = None, limit: int = DEFAULT_LIMIT
) -> list[EntryView]:
    """The newest `limit` entries, or the first `limit` from `since`, oldest first."""
    found = await namespace.changelog(since=since, limit=limit)
    return [EntryView.model_validate(logged.to_dict()) for logged in found]


async def dead_letters(namespace: Namespace) -> list[DeadLetterView]:
    from coordinator import dead

    letters = await dead.everything(await namespace.gateway(), namespace.settings.user_prefix)
    return [DeadLetterView.model_validate(letter.to_dict()) for letter in letters]


async def dead_letter(namespace: Namespace, letter_id: str) -> DeadLetterView:
    """One letter, by its id or a unique prefix of it (at least 4 characters)."""
    from coordinator import dead

    letters = await dead.everything(await namespace.gateway(), namespace.settings.user_prefix)
    (letter, *_) = dead.by_ids([letter_id])(letters)  # NotFound, or BadInput if ambiguous
    return DeadLetterView.model_validate(letter.to_dict())


def as_json(views: View | list[Any]) -> Any:
    """Views as JSON-ready data (datetimes as ISO text)."""
    if isinstance(views, list):
        return [view.model_dump(mode="json") for view in views]
    return views.model_dump(mode="json")
