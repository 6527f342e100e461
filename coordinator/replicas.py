"""Where covey's replicated queues keep their replicas: each quorum queue's and stream's
leader, its members, and which of them are online.

AMQP says none of this, so it is read from RabbitMQ's management HTTP API — where
that answers this user (the plugin is enabled, and the user is an administrator, or
has the `monitoring` tag, or the `management` tag and permissions in this vhost: a
supervisor's user that `covey provision` made has). Where it does not, there is nothing
to show and nothing is said: a participant without a tag still gets its `covey status`.

A queue with fewer members online than it has is under-replicated: one more node lost
and it may stop taking mail (a quorum queue needs a majority of its members). On one
node every queue has one member, always online.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from coordinator.errors import CoveyError
from coordinator.settings import Settings

# The management API is asked in the course of `covey status` and of a metrics refresh:
# a node that does not answer within this costs that much, not a connect timeout.
ASK_SECONDS = 3.0
COLUMNS = "name,type,leader,node,members,online"


@dataclass(frozen=True, slots=True)
class QueueReplicas:
    """One replicated queue (quorum or stream) and where its replicas are."""

    name: str
    type: str  # "quorum" or "stream"
    leader: str | None
    members: tuple[str, ...]
    online: tuple[str, ...]

    @property
    def offline(self) -> tuple[str, ...]:
        return tuple(m for m in self.members if m not in self.online)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.name,
            "type": self.type,
            "leader": self.leader,
            "members": list(self.members),
            "online": list(self.online),
        }


def _from_row(row: dict[str, Any]) -> QueueReplicas | None:
    kind = row.get("type")
    if kind not in ("quorum", "stream"):
        return None  # a classic queue (a lock's) lives on one node: nothing to replicate
    if "members" not in row:
        # RabbitMQ 3.10 leaves a stream's members out of the listing at times (while its
        # coordinator has not told this node): unknown, which is not "none".
        return None
    members = tuple(str(m) for m in row.get("members") or ())
    # A stream names its leader as its `node`; a quorum queue as its `leader`.
    leader = row.get("leader") or (row.get("node") if kind == "stream" else None)
    return QueueReplicas(
        name=str(row.get("name", "")),
        type=str(kind),
        leader=str(leader) if leader else None,
        members=members,
        online=tuple(str(m) for m in row.get("online") or ()),
    )


def read_replicas(settings: Settings) -> list[QueueReplicas] | None:
    """The replicated queues of this namespace's vhost, by name; None where the
    management API does not answer this user (see the module docstring)."""
    from coordinator.provision import Management

    vhost = settings.vhost
    try:
        api = Management.for_settings(settings, min(settings.connect_timeout, ASK_SECONDS))
        rows = api.call("GET", f"queues/{quote(vhost, safe='')}?columns={COLUMNS}")
    except CoveyError:
        return None
    if not isinstance(rows, list):
        return None
    found = (_from_row(row) for row in rows if isinstance(row, dict))
    return sorted((q for q in found if q is not None), key=lambda q: q.name)


async def replicas(settings: Settings) -> list[QueueReplicas] | None:
    """read_replicas, off the event loop (it is a blocking HTTP call)."""
    return await asyncio.to_thread(read_replicas, settings)


def summary(queues: list[QueueReplicas]) -> list[str]:
    """`covey status`'s lines about replication: one about all queues, and one for each
    that has a member offline. Nothing on a single node where all is well."""
    nodes = sorted({m for q in queues for m in q.members})
    short = [q for q in queues if q.offline]
    if len(nodes) <= 1 and not short:
        return []
    leaders: dict[str, int] = {}
    for q in queues:
        if q.leader:
            leaders[q.leader] = leaders.get(q.leader, 0) + 1
    led = ", ".join(f"{node} {count}" for node, count in sorted(leaders.items()))
    lines = [f"replicas: {len(queues)} queues on {len(nodes)} nodes; leaders: {led or 'none'}"]
    for q in short:
        lines.append(
            f"  {q.name}: {len(q.online)} of {len(q.members)} members online "
            f"({', '.join(q.offline)} down), leader {q.leader or 'none'}"
        )
    return lines
