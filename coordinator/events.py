"""Control events on `covey.events`: runs requested, started, stopped and finished; locks; sessions.

Routing keys are `KIND.SUBJECT` — `run.started.scout`, `lock.released.global` —
so a dashboard subscribes to `#`, a waiter to one lock, a supervisor to
`run.requested.*`. Run events are also kept in the `covey.runs` stream (bound
in the topology), where they outlive the processes that published them.

`stop.requested.AGENT` asks the run it names to stop (`covey stop`, see stopping.py).

`session.opened.AGENT` and `session.closed.AGENT` say where a run's session is (its
stream and its first id), so that a client that did not start the run can find it
and attach; `run.finished` says the same once the run is over.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coordinator.envelope import now
from coordinator.outcome import Outcome

EVENT_TYPE = "covey.event.v1"

EventKind = Literal[
    "run.requested",
    "run.started",
    "run.finished",
    "lock.acquired",
    "lock.released",
    "session.opened",
    "session.closed",
    "stop.requested",
]


class Event(BaseModel):
    """One control event. Fields that do not apply to a kind stay empty."""

    model_config = ConfigDict(extra="ignore")  # newer publishers may add fields

    kind: EventKind
    at: datetime = Field(default_factory=now)
    host: str  # the publisher's Settings.host (see settings.py)
    agent: str | None = None
    run_id: str | None = None
    trigger: str | None = None  # run.*: schedule, mail, manual, request
    # run.finished: an Outcome's value, kept as text so that an outcome a newer publisher
    # added still reads (`run_outcome` is the Outcome, when this version knows it)
    outcome: str | None = None
    exit_code: int | None = None  # run.finished: the agent's own exit code
    duration_seconds: float | None = None  # run.finished
    reason: str | None = None  # run.finished: why it was skipped or failed
    hook: str | None = None  # run.finished, Outcome.SKIPPED_PREFLIGHT: the check that failed
    lock: str | None = None  # lock.*
    wait_seconds: float | None = None  # lock.acquired: how long it took to get
    held_seconds: float | None = None  # lock.released: how long it was held
    requested_by: str | None = None  # run.requested, stop.requested: who asks, as they say
    # run.finished (outcome stopped): who asked it to stop, as the broker vouched for it
    # (see stopping.py); `reason` says why, when they said
    stopped_by: str | None = None
    # lock.acquired: this acquisition's; run.*: that of the agent's own lock. One more than
    # the slot's previous holder's, so a resource can refuse a holder older than one it saw.
    fencing_token: int | None = None
    fencing_tokens: dict[str, int] | None = None  # run.*: every lock of the run, by name
    takeover: bool | None = None  # lock.acquired: its previous holder did not release it
    lease_wait_seconds: float | None = None  # run.*: spent waiting out that holder's lease
    # session.*, run.finished: where the run's session is kept (see session.py): its
    # stream, the offset of its `opened` event (None until known), and that event's time
    # (a reader that lacks `first_id` attaches from there).
    stream: str | None = None
    first_id: int | None = None
    since: datetime | None = None
    # session.closed, run.finished: seq ranges [first, last] its writer could not publish
    # (the run log on disk has those lines); absent when the session is whole.
    session_missing: list[list[int]] | None = None

    @property
    def run_outcome(self) -> Outcome | None:
        return Outcome.parse(self.outcome)

    @property
    def routing_key(self) -> str:
        subject = self.lock if self.kind.startswith("lock.") else self.agent
        return f"{self.kind}.{subject or 'unknown'}"
