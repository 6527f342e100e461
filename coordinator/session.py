"""A session: one run's live output and what its agent says of its progress, kept on the broker.

A run's session is the ordered sequence of its events: `opened`, every line the
agent prints, the events it emits itself (`progress`, `token`, `tool`, `status`,
`result`), and `closed` with the outcome. Each event's id comes from where it is
in the `covey.sessions` stream, so ids only grow, and a client that saw id N resumes
at N + 1 with nothing lost and nothing repeated.

A stream message carries a *batch*: the consecutive events of one run its writer had
queued (a JSON array, at most MAX_BATCH_EVENTS of them). One message per event cost
the client library some 100-200 µs of CPU each, as much as a fast agent takes to print
a line; a batch costs that once. An event's id is `offset * IDS_PER_OFFSET + index`,
its message's stream offset and its place in that message: integers, stable, and
increasing in stream order; resuming from id N attaches at N's offset and passes what
came before it in that message.

Every run's session is in one stream, `covey.sessions`, rather than one stream
per agent: a roster of 1,000 agents is one stream on the broker, not 1,000 (each
a log with processes and files of its own). Reading one run still costs only what
was written while it ran: a reader starts at the run's first offset, skips other
runs' events by a header without parsing them, and stops at its `closed`. The
price is shared retention (`[sessions] max_age` and `max_bytes` in covey.toml):
sized for every run together.

Within a run, `seq` numbers the events its writer made (0 for `opened`): a reader
can tell a gap the writer announced (a `missing` event, when the broker could not
take them all; the run log on disk has every line) from events retention removed
(`expired`, which a reader makes itself when the stream no longer starts where it
asked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import to_json

from coordinator.envelope import now
from coordinator.topology import SESSIONS

SESSION_TYPE = "covey.session.v1"  # the AMQP `type` of a session event
RUN_HEADER = "x-covey-run"  # the run id, so a reader skips other runs unparsed
FIRST_SEQ_HEADER = "x-covey-first-seq"  # the seq of a message's first event ...
COUNT_HEADER = "x-covey-count"  # ... and how many events it carries
# Ids: `offset * IDS_PER_OFFSET + index`. A batch holds fewer events than that, so the
# id after any event of a message (N + 1) is still in that message's offset.
IDS_PER_OFFSET = 1024
MAX_BATCH_EVENTS = 1000  # events in one stream message, at most ...
MAX_BATCH_BYTES = 256 * 1024  # ... and about this much of their text (one event may be more)
assert MAX_BATCH_EVENTS < IDS_PER_OFFSET
# What a reader of the stream lets the broker send ahead (its prefetch), in messages. A
# message may be a whole batch (256 KiB), and what was sent ahead when a reader stops
# (its run's `closed` reached, the first event found) still crosses the connection, in
# front of whatever that connection reads next: 500 of other runs' full batches were
# over a second of it. A few in flight still keep the pipe full.
READ_PREFETCH = 20
STREAM = SESSIONS

# What an agent may emit itself; the others are the writer's (or a reader's) own.
EMITTED_KINDS = ("progress", "token", "tool", "status", "result")
Kind = Literal[
    "opened",  # seq 0: the run started (data: command, trigger)
    "line",  # one line the agent printed (stdout and stderr, as the run log has them)
    "progress",  # data: {"fraction": 0.0..1.0}; text: what it is doing
    "token",  # a text delta, for an agent streaming a model's output
    "tool",  # a tool call: text is its name and a one-line summary
    "status",  # a short free-form status
    "result",  # the run's final answer
    "missing",  # seqs the writer could not publish: data {"seqs": [[a, b], ...], "log": path}
    "closed",  # the run ended: data {"outcome", "exit_code", "reason"}
    "expired",  # made by a reader: ids retention removed, data {"from": a, "to": b}
]
MAX_TEXT_CHARS = 64 * 1024  # one event's text; longer is cut (the run log keeps it whole)


class SessionEvent(BaseModel):
    """One event of a run's session; the JSON body of a stream message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    agent: str
    seq: int = Field(ge=0)
    kind: Kind
    at: datetime = Field(default_factory=now)
    text: str = Field(default="", max_length=MAX_TEXT_CHARS)
    data: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        """The last event of its run."""
        return self.kind == "closed"


_BATCH = TypeAdapter(list[SessionEvent])
Pending = tuple[int, Kind, datetime, str, dict[str, Any] | None]  # seq, kind, at, text, data


@dataclass(frozen=True, slots=True)
class SessionBatch:
    """Consecutive events of one run, as one stream message carries them."""

    run_id: str
    first_seq: int
    count: int
    at: datetime  # when its first event happened
    body: bytes  # a JSON array of SessionEvent

    @classmethod
    def of(cls, run_id: str, agent: str, events: Sequence[Pending]) -> SessionBatch:
        """The batch of `events` (at least one; texts already cut to MAX_TEXT_CHARS).

        Plain dicts, serialised in one call: the JSON a SessionEvent each would give
        (readers validate it as that), at a fifth of the CPU. The runner serves the
        agent's pipe on the same thread, so this is what a fast agent waits for.

        Each distinct moment is formatted once, as to_json formats it: the lines of one
        chunk of output share theirs, and formatting it for each was a third of the call."""
        stamps = {at: to_json(at)[1:-1].decode() for at in {event[2] for event in events}}
        body = to_json(
            [
                {
                    "run_id": run_id,
                    "agent": agent,
                    "seq": seq,
                    "kind": kind,
                    "at": stamps[at],
                    "text": text,
                }
                if data is None
                else {
                    "run_id": run_id,
                    "agent": agent,
                    "seq": seq,
                    "kind": kind,
                    "at": stamps[at],
                    "text": text,
                    "data": data,
                }
                for seq, kind, at, text, data in events
            ]
        )
        return cls(run_id, events[0][0], len(events), events[0][2], body)


def parse_batch(body: bytes) -> list[SessionEvent] | None:
    """The events of a stream message's body; None if it is not a batch of them (the
    stream keeps whatever it was given; a reader passes it by)."""
    try:
        return _BATCH.validate_json(body)
    except ValidationError:
        return None


def event_id(offset: int, index: int) -> int:
    """The id of the `index`th event of the message at stream `offset`."""
    return offset * IDS_PER_OFFSET + index


def offset_of(event_id: int) -> int:
    """The stream offset of the message that holds (or would hold) `event_id`."""
    return event_id // IDS_PER_OFFSET
