"""The broker topology as data: exchanges, queues and bindings, and how the roster maps onto them.

Who does what: this module describes and declares nothing — `core` (what every
namespace has), `for_participant` (one participant's queue and bindings) and
`for_roster` (all of it) return a `Topology`; `gateway.Gateway.apply` declares one;
the namespace (`Namespace.apply_topology`, `ensure_participants`) decides which part,
and when. Every declaration is idempotent, so any component may apply the part it
relies on at start. What comes and goes — note queues, lock slots, listeners'
server-named queues — is not described here: the gateway declares each as it is needed.

    sender --> [covey] topic exchange --agent.NAME, team.NAME, human.NAME, broadcast--> agent.NAME
                   |                                                                human.NAME
                   | alternate exchange: what no queue takes                            |
                   v                                             dead letters (x-death) |
             [covey.unrouted] fanout --> covey.unrouted      covey.dead <-- [covey.dead] fanout

Why it is shaped this way:

* Mail is never dropped silently. A message whose routing key matches no binding
  (a misspelt recipient, a team nobody is in) goes to `covey.unrouted` through the
  alternate exchange, where it waits to be inspected and replayed.
* A message that keeps failing does not loop forever. Participant queues are quorum
  queues with a delivery limit; past it, RabbitMQ dead-letters the message to
  `covey.dead` with the reason in its `x-death` header (`delivery_limit`, `expired`,
  `rejected`). covey itself dead-letters deliveries that are not valid envelopes
  there too, with `x-covey-reason` and `x-covey-detail` headers.
* The broker's own dead-lettering (delivery limit, expiry) is `at-most-once` by
  default. `dead_lettering = "at-least-once"` makes RabbitMQ keep a dead letter
  in its queue until `covey.dead` has confirmed it (and needs
  `x-overflow: reject-publish`, which `QueueSpec` checks), but on RabbitMQ 3.10
  its dead-letter workers crash when such queues are deleted, and two crashes in
  a few seconds stop at-least-once dead-lettering for every quorum queue on the
  node until it restarts (seen here: `rabbit_fifo_dlx_sup` reached its restart
  intensity, and every later declare of such a queue failed with
  INTERNAL_ERROR). covey's own dead letters (invalid envelopes) are always
  confirmed before the original is acked, whichever strategy is set.
* Quorum queues replicate in a cluster and survive a broker restart: a message
  to an agent that is not running waits there, however long it sleeps. Every
  quorum queue and stream is created with `replicas` members (RabbitMQ caps that
  at the number of nodes), so a cluster's node can stop without losing mail, the
  changelog, run records or sessions. The size counts only when a queue is
  created; see `gateway.declare_queue` for queues that already exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from coordinator.names import Address
from coordinator.roster import Roster
from coordinator.settings import ChangelogConfig, SessionsConfig, Settings

MAIL_EXCHANGE = "covey"
UNROUTED = "covey.unrouted"
DEAD = "covey.dead"
EVENTS_EXCHANGE = "covey.events"
NOTES_EXCHANGE = "covey.notes"  # see Gateway.write_note
CHANGELOG_EXCHANGE = "covey.changelog"  # to the stream of the same name (see changelog.append)
RUNS_STREAM = "covey.runs"
SESSIONS = "covey.sessions"  # every run's live output: the stream, and the exchange to it
CHANGELOG_STREAM = "covey.changelog"
SEGMENT_BYTES = 8 * 1024 * 1024  # retention removes whole segments, so keep them small
BROADCAST_KEY = "broadcast"

ExchangeType = Literal["topic", "fanout"]

ExchangeArguments = TypedDict(
    "ExchangeArguments",
    {"alternate-exchange": str},
    total=False,
)

QuorumQueueArguments = TypedDict(
    "QuorumQueueArguments",
    {
        "x-queue-type": Literal["quorum"],
        "x-delivery-limit": int,
        "x-dead-letter-exchange": str,
        "x-dead-letter-strategy": Literal["at-most-once", "at-least-once"],
        "x-overflow": Literal["drop-head", "reject-publish"],
        "x-max-length": int,
        "x-quorum-initial-group-size": int,  # members at creation: see Settings.replicas
    },
    total=False,
)


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: ExchangeType
    arguments: ExchangeArguments = field(default_factory=lambda: ExchangeArguments())


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A durable quorum queue. Combinations RabbitMQ would refuse, or silently
    ignore, are refused here, when the spec is built."""

    name: str
    arguments: QuorumQueueArguments = field(default_factory=lambda: QuorumQueueArguments())

    def __post_init__(self) -> None:
        args = self.arguments
        if args.get("x-queue-type", "quorum") != "quorum":
            raise ValueError(f"queue {self.name}: covey declares quorum queues only")
        if "x-dead-letter-strategy" in args and "x-dead-letter-exchange" not in args:
            raise ValueError(f"queue {self.name}: a dead-letter strategy needs an exchange")
        if (
            args.get("x-dead-letter-strategy") == "at-least-once"
            and args.get("x-overflow") != "reject-publish"
        ):
            raise ValueError(
                f"queue {self.name}: at-least-once dead-lettering needs x-overflow=reject-publish"
            )
        if args.get("x-delivery-limit", 1) < 1:
            raise ValueError(f"queue {self.name}: the delivery limit must be at least 1")
        if args.get("x-quorum-initial-group-size", 1) < 1:
            raise ValueError(f"queue {self.name}: a queue needs at least one member")

    @property
    def declare_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum", **self.arguments}


StreamArguments = TypedDict(
    "StreamArguments",
    {
        "x-queue-type": Literal["stream"],
        "x-max-age": str,  # e.g. "30D": RabbitMQ's units are Y M D h m s
        "x-max-length-bytes": int,
        "x-stream-max-segment-size-bytes": int,
        "x-initial-cluster-size": int,  # members at creation: see Settings.replicas
    },
    total=False,
)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A stream: an append-only log read from any offset, retention done by the broker."""

    name: str
    arguments: StreamArguments = field(default_factory=lambda: StreamArguments())

    def __post_init__(self) -> None:
        if self.arguments.get("x-queue-type", "stream") != "stream":
            raise ValueError(f"stream {self.name}: x-queue-type must be stream")
        segment = self.arguments.get("x-stream-max-segment-size-bytes")
        total = self.arguments.get("x-max-length-bytes")
        if segment is not None and total is not None and segment > total:
            raise ValueError(
                f"stream {self.name}: a segment larger than the size limit would never be removed"
            )
        if self.arguments.get("x-initial-cluster-size", 1) < 1:
            raise ValueError(f"stream {self.name}: a stream needs at least one member")

    @property
    def declare_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "stream", **self.arguments}


@dataclass(frozen=True, slots=True)
class BindingSpec:
    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec | StreamSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = ()

    @classmethod
    def combine(cls, parts: Iterable[Topology]) -> Topology:
        exchanges: list[ExchangeSpec] = []
        queues: list[QueueSpec | StreamSpec] = []
        bindings: list[BindingSpec] = []
        for part in parts:
            exchanges += part.exchanges
            queues += part.queues
            bindings += part.bindings
        return cls(tuple(exchanges), tuple(queues), tuple(bindings))


def core(
    changelog: ChangelogConfig,
    sessions: SessionsConfig | None = None,
    replicas: int = Settings.model_fields["replicas"].default,
) -> Topology:
    """The exchanges and queues every covey namespace has, whoever is in the roster,
    each queue and stream created with `replicas` members."""
    sessions = sessions or SessionsConfig()
    return Topology(
        exchanges=(
            ExchangeSpec(
                MAIL_EXCHANGE, "topic", ExchangeArguments({"alternate-exchange": UNROUTED})
            ),
            ExchangeSpec(UNROUTED, "fanout"),
            ExchangeSpec(DEAD, "fanout"),
            ExchangeSpec(EVENTS_EXCHANGE, "topic"),
            ExchangeSpec(NOTES_EXCHANGE, "topic"),
            ExchangeSpec(CHANGELOG_EXCHANGE, "fanout"),
            ExchangeSpec(SESSIONS, "fanout"),
        ),
        # Neither holding queue dead-letters further or has a delivery limit: they
        # are where messages end up, to be listed and replayed by a person.
        queues=(
            QueueSpec(UNROUTED, QuorumQueueArguments({"x-quorum-initial-group-size": replicas})),
            QueueSpec(DEAD, QuorumQueueArguments({"x-quorum-initial-group-size": replicas})),
            # Run events outlive the processes that published them: `covey runs`
            # and `covey status` read them back from here.
            StreamSpec(
                RUNS_STREAM,
                StreamArguments(
                    {
                        "x-max-age": "30D",
                        "x-max-length-bytes": 256 * 1024 * 1024,
                        "x-stream-max-segment-size-bytes": SEGMENT_BYTES,
                        "x-initial-cluster-size": replicas,
                    }
                ),
            ),
            # What changed, for every agent's digest; retention is the broker's job.
            StreamSpec(
                CHANGELOG_STREAM,
                StreamArguments(
                    {
                        "x-max-age": changelog.max_age,
                        "x-max-length-bytes": changelog.max_bytes,
                        "x-stream-max-segment-size-bytes": min(SEGMENT_BYTES, changelog.max_bytes),
                        "x-initial-cluster-size": replicas,
                    }
                ),
            ),
            # Every run's live output, one stream for all (see session.py for why).
            StreamSpec(
                SESSIONS,
                StreamArguments(
                    {
                        "x-max-age": sessions.max_age,
                        "x-max-length-bytes": sessions.max_bytes,
                        "x-stream-max-segment-size-bytes": min(SEGMENT_BYTES, sessions.max_bytes),
                        "x-initial-cluster-size": replicas,
                    }
                ),
            ),
        ),
        bindings=(
            BindingSpec(UNROUTED, UNROUTED, ""),
            BindingSpec(DEAD, DEAD, ""),
            BindingSpec(RUNS_STREAM, EVENTS_EXCHANGE, "run.started.*"),
            BindingSpec(RUNS_STREAM, EVENTS_EXCHANGE, "run.finished.*"),
            BindingSpec(CHANGELOG_STREAM, CHANGELOG_EXCHANGE, ""),
            BindingSpec(SESSIONS, SESSIONS, ""),
        ),
    )


def for_participant(address: Address, teams: Iterable[str], settings: Settings) -> Topology:
    """One participant's queue, bound to its own key, its teams' keys and (agents) broadcast."""
    arguments = QuorumQueueArguments(
        {
            "x-delivery-limit": settings.delivery_limit,
            "x-dead-letter-exchange": DEAD,
            "x-dead-letter-strategy": settings.dead_lettering,
            "x-quorum-initial-group-size": settings.replicas,
        }
    )
    if settings.dead_lettering == "at-least-once":
        arguments["x-overflow"] = "reject-publish"
    queue = QueueSpec(address.queue, arguments)
    keys = [address.routing_key, *(Address("team", team).routing_key for team in teams)]
    if address.kind == "agent":
        keys.append(BROADCAST_KEY)
    return Topology(
        queues=(queue,),
        bindings=tuple(BindingSpec(address.queue, MAIL_EXCHANGE, key) for key in keys),
    )


def for_roster(roster: Roster, settings: Settings) -> Topology:
    """Everything `covey topology apply` declares: the core plus every participant."""
    return Topology.combine(
        [
            core(settings.changelog, settings.sessions, settings.replicas),
            *(
                for_participant(address, roster.teams_of(address), settings)
                for address in roster.participants()
            ),
        ]
    )
