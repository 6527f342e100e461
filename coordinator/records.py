"""Run records: what ran, when, and how it ended, read back from the `covey.runs` stream.

A run whose `run.started` has no `run.finished` is `running` while its agent's
lock is held by that run, and `lost` once it is not: its supervisor died
without a word, and the broker freed the lock when its connection closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from coordinator import stream
from coordinator.events import Event
from coordinator.gateway import Gateway
from coordinator.lock import LockSpec, slot_state
from coordinator.topology import RUNS_STREAM

RUNNING = "running"
LOST = "lost"
EVENTS_PER_RUN = 2
SCAN_FACTOR = 10  # with an agent filter, read this many times more events
RECORDS_SCANNED = 1000  # runs looked at to find one by its id


@dataclass
class RunRecord:
    agent: str
    run_id: str
    trigger: str | None
    host: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: str = RUNNING
    exit_code: int | None = None
    duration_seconds: float | None = None
    reason: str | None = None
    stopped_by: str | None = None  # who asked it to stop (`covey stop`), as the broker vouched
    fencing_token: int | None = None  # of the agent's own lock
    fencing_tokens: dict[str, int] | None = None  # of every lock the run held
    lease_wait_seconds: float | None = None  # waited for a previous holder's lease to lapse
    # Seq ranges its session writer could not publish (the run log has them): what a
    # session reader announces when the writer's own notice never reached the broker.
    session_missing: list[list[int]] | None = None

    @property
    def at(self) -> datetime:
        moment = self.started_at or self.finished_at
        assert moment is not None
        return moment

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "run_id": self.run_id,
            "trigger": self.trigger,
            "host": self.host,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "duration_seconds": self.duration_seconds,
            "reason": self.reason,
            "stopped_by": self.stopped_by,
            "fencing_token": self.fencing_token,
            "fencing_tokens": self.fencing_tokens,
            "lease_wait_seconds": self.lease_wait_seconds,
        }


async def recent_runs(
    gateway: Gateway, agent: str | None = None, limit: int = 20
) -> list[RunRecord]:
    """The newest `limit` runs (of `agent`, when given), oldest first."""
    scan = limit * EVENTS_PER_RUN * (SCAN_FACTOR if agent else 1)
    records: dict[str, RunRecord] = {}
    for item in await stream.newest_items(gateway, RUNS_STREAM, scan):
        try:
            event = Event.model_validate_json(item.body)
        except ValidationError:
            continue  # not ours to judge here; the stream keeps it
        if event.agent is None or event.run_id is None or (agent and event.agent != agent):
            continue
        record = records.setdefault(
            event.run_id, RunRecord(event.agent, event.run_id, event.trigger, event.host)
        )
        if event.kind in ("run.started", "run.finished") and event.fencing_token is not None:
            record.fencing_token = event.fencing_token
            record.fencing_tokens = event.fencing_tokens
            record.lease_wait_seconds = event.lease_wait_seconds
        if event.kind == "run.started":
            record.started_at = event.at
        elif event.kind == "run.finished":
            record.finished_at = event.at
            record.outcome = event.outcome or "unknown"
            record.exit_code = event.exit_code
            record.duration_seconds = event.duration_seconds
            record.reason = event.reason
            record.stopped_by = event.stopped_by
            record.session_missing = event.session_missing
    newest = sorted(records.values(), key=lambda r: r.at)[-limit:]
    for record in newest:
        if record.outcome == RUNNING and not await _still_running(gateway, record):
            record.outcome = LOST
    return newest


async def find_record(gateway: Gateway, run_id: str) -> RunRecord | None:
    """The record of run `run_id`, if it is among the newest RECORDS_SCANNED runs."""
    runs = await recent_runs(gateway, limit=RECORDS_SCANNED)
    return next((r for r in runs if r.run_id == run_id), None)


async def _still_running(gateway: Gateway, record: RunRecord) -> bool:
    held, holder = await slot_state(gateway, LockSpec.for_agent(record.agent).queues[0])
    return held and (holder is None or holder.run_id == record.run_id)
