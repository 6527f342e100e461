"""Dead letters: what never reached a mailbox, and why — listed, shown, replayed, purged.

Two queues hold them. `covey.dead` gets what covey refused (`invalid`,
`spoofed`, with `x-covey-reason` and `x-covey-detail`) and what RabbitMQ
dead-lettered (`delivery-limit`, `expired`, `rejected`, from `x-death`);
`covey.unrouted` gets what no queue took (`unroutable`). AMQP cannot browse a
queue, so reading takes every message without acking it and gives back all
that is not being replayed or purged; those are acked only after their replay
was confirmed, so none is lost on the way.

Who signed a dead letter (see identity.py: only the broker-validated `user_id`
is a signature):

* RabbitMQ dead-letters (and routes to `covey.unrouted`) the message itself, so
  its own `user_id` is its signer.
* covey's copy is published by whoever dead-lettered it — the reporter, its
  `user_id` — and its `x-covey-user-id` header claims who signed the original.
  Anyone who may publish to `covey.dead` can write that header, so the claim is
  believed only from a reporter whose word can hurt nobody else: a participant
  speaking of its own queue (`x-covey-queue`), or a user that is no participant
  (a supervisor, the operator). Otherwise the letter's signer is the reporter,
  and the claim is shown as unverified.
* A replay goes where the letter died, not where its routing key points: a
  participant's report goes back to that participant's own queue only, so that
  a lie in it can fool nobody but its author; and it is signed by the signer
  above, so the recipient's sender check judges it as it would have at first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from coordinator.errors import BadInput, BrokerUnavailable, NotFound, TopologyMissing
from coordinator.gateway import (
    COVEY_HEADERS,
    DEAD_AT_HEADER,
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    USER_HEADER,
    Gateway,
    copy_of,
)
from coordinator.identity import participant_of
from coordinator.names import Address
from coordinator.topology import DEAD, MAIL_EXCHANGE, UNROUTED

_BROKER_REASONS = {"delivery_limit": "delivery-limit", "expired": "expired", "rejected": "rejected"}


@dataclass
class DeadLetter:
    id: str  # the message id, or a digest of the body for junk that has none
    held_in: str  # covey.dead or covey.unrouted
    reason: str
    detail: str
    routing_key: str  # where it was going
    dead_at: datetime | None
    message: AbstractIncomingMessage
    prefix: str  # of the provisioned users' names (settings.user_prefix)

    @classmethod
    def of(cls, message: AbstractIncomingMessage, held_in: str, prefix: str) -> DeadLetter:
        headers = dict(message.headers or {})
        if held_in == UNROUTED:
            reason, detail = "unroutable", "no queue is bound to its routing key"
        elif REASON_HEADER in headers:
            reason, detail = str(headers[REASON_HEADER]), str(headers.get(DETAIL_HEADER, ""))
        else:
            raw = str(headers.get("x-first-death-reason", "unknown"))
            reason = _BROKER_REASONS.get(raw, raw)
            queue = headers.get("x-first-death-queue", "?")
            if isinstance(queue, bytes):
                queue = queue.decode(errors="replace")
            detail = f"dead-lettered by RabbitMQ from {queue}"
        return cls(
            id=message.message_id or hashlib.sha1(message.body).hexdigest()[:32],
            held_in=held_in,
            reason=reason,
            detail=detail,
            routing_key=message.routing_key or "",
            dead_at=_dead_at(headers, message),
            message=message,
            prefix=prefix,
        )

    @property
    def _headers(self) -> dict[str, Any]:
        return dict(self.message.headers or {})

    @property
    def covey_copy(self) -> bool:
        """Whether covey dead-lettered it (a copy, with a reporter), not RabbitMQ."""
        return self.held_in == DEAD and REASON_HEADER in self._headers

    @property
    def reported_by(self) -> str | None:
        """Who put covey's copy in covey.dead, as the broker saw it; None for RabbitMQ's."""
        return self.message.user_id if self.covey_copy else None

    @property
    def claimed_signer(self) -> str | None:
        """Who covey's copy says signed the original (a header: a claim, not a signature)."""
        claim = self._headers.get(USER_HEADER) if self.covey_copy else None
        return str(claim) if claim else None

    @property
    def _reporter(self) -> Address | None:
        return participant_of(self.reported_by, self.prefix)

    @property
    def claim_believed(self) -> bool:
        """Whether the reporter may speak of the queue the letter died in (see above)."""
        if not self.covey_copy or self.reported_by is None:
            return False
        reporter = self._reporter
        return reporter is None or str(self._headers.get(QUEUE_HEADER)) == reporter.queue

    @property
    def signed_by(self) -> str | None:
        """The broker user that signed the original, as far as can be told (see above)."""
        if not self.covey_copy:
            return self.message.user_id
        return self.claimed_signer if self.claim_believed else self.reported_by

    @property
    def verified(self) -> bool:
        """False when covey's copy claims a signer that is not believed."""
        return self.claimed_signer is None or self.claim_believed

    @property
    def warning(self) -> str | None:
        if self.verified:
            return None
        by = self.reported_by or "an unsigned publisher"
        return (
            f"unverified: claims {self.claimed_signer} signed it, but {by} put it here "
            "and may speak only of its own mailbox"
        )

    @property
    def replay_key(self) -> str:
        """Where a replay sends it: back to the queue it died in (see above)."""
        if not self.covey_copy:
            return self.routing_key
        if (reporter := self._reporter) is not None:
            return reporter.routing_key
        died_in = str(self._headers.get(QUEUE_HEADER, ""))
        kind, _, name = died_in.partition(".")
        try:
            address = Address.participant(f"{kind}:{name}")
        except BadInput:  # no participant's queue: where it was going, as before
            return self.routing_key
        return address.routing_key

    def to_dict(self, with_body: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "queue": self.held_in,
            "reason": self.reason,
            "detail": self.detail,
            "routing_key": self.routing_key,
            "replay_to": self.replay_key,
            "signed_by": self.signed_by,
            "verified": self.verified,
            "dead_at": self.dead_at.isoformat() if self.dead_at else None,
        }
        if self.covey_copy:
            data["reported_by"] = self.reported_by
            data["claimed_signer"] = self.claimed_signer
        if self.warning:
            data["warning"] = self.warning
        if with_body:
            data["body"] = self.message.body.decode(errors="replace")
        return data


def _dead_at(headers: dict[str, Any], message: AbstractIncomingMessage) -> datetime | None:
    """When it died: covey's own mark, else the broker's newest x-death, else its timestamp."""
    deaths = headers.get("x-death")
    moment = headers.get(DEAD_AT_HEADER)
    if moment is None and isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        moment = deaths[0].get("time")
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment is None:
        moment = message.timestamp
    if isinstance(moment, datetime):
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


Choose = Callable[[list[DeadLetter]], list[DeadLetter]]


async def everything(gateway: Gateway, prefix: str) -> list[DeadLetter]:
    """Every dead letter (`prefix`: of provisioned users' names), all given back."""
    letters, _ = await _settle(gateway, prefix, lambda letters: [], None)
    return letters


async def purge(gateway: Gateway, prefix: str, choose: Choose) -> list[DeadLetter]:
    """Remove for good the letters `choose` picks; return them."""
    _, gone = await _settle(gateway, prefix, choose, None)
    return gone


async def replay(
    gateway: Gateway, prefix: str, choose: Choose
) -> tuple[list[DeadLetter], dict[str, str]]:
    """Send the letters `choose` picks again where they died (see `_replay`), each
    confirmed before it is removed. A letter whose recipient has no queue is not
    replayed (it would only die again) but kept. Returns (replayed, {kept id: why})."""
    kept: dict[str, str] = {}

    async def send(mail: AbstractExchange, letter: DeadLetter) -> bool:
        why = await _no_recipient(gateway, letter.replay_key)
        if why is not None:
            kept[letter.id] = why
            return False
        await _replay(mail, letter)
        return True

    _, sent = await _settle(gateway, prefix, choose, send)
    return sent, kept


Act = Callable[[AbstractExchange, "DeadLetter"], Awaitable[bool]]


async def _settle(
    gateway: Gateway, prefix: str, choose: Choose, act: Act | None
) -> tuple[list[DeadLetter], list[DeadLetter]]:
    """Take every dead letter without acking; of those `choose` picks, ack each that
    `act` (when given) says it dealt with, and give the rest back. Returns (all,
    chosen and acked). If `choose` raises, everything is given back untouched."""
    letters: list[DeadLetter] = []
    done: list[DeadLetter] = []
    # Confirms: a replay is confirmed before the ack of its letter below.
    async with gateway.operation_channel(confirms=True) as channel:  # unsettled go back on close
        for held_in in (DEAD, UNROUTED):
            try:
                queue = await channel.declare_queue(held_in, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise TopologyMissing(
                    f"{held_in} does not exist here; run `covey topology apply`"
                ) from None
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                letters.append(DeadLetter.of(message, held_in, prefix))
        picked = {id(letter) for letter in choose(letters)}
        mail = await channel.get_exchange(MAIL_EXCHANGE, ensure=False)
        for letter in letters:
            if id(letter) in picked and (act is None or await act(mail, letter)):
                await letter.message.ack()
                done.append(letter)
            else:
                await letter.message.reject(requeue=True)
    return letters, done


async def _no_recipient(gateway: Gateway, routing_key: str) -> str | None:
    """Why a replay to `routing_key` would find nobody, or None. Mail to a participant
    goes to the queue named after its routing key, so a missing queue means a missing
    recipient; a team's or everyone's key cannot be checked without the roster, and
    whatever of it no queue takes lands in covey.unrouted again."""
    kind, _, _ = routing_key.partition(".")
    if kind not in ("agent", "human"):
        return None
    return None if await gateway.exists(routing_key) else f"no queue {routing_key} takes it"


async def _replay(mail: AbstractExchange, letter: DeadLetter) -> None:
    """Send the original again where it died, signed by its signer (see above), so that
    the recipient's sender check judges it as it would have the first time. Only that
    user, or one with RabbitMQ's `impersonator` tag, may do so."""
    signer = letter.signed_by
    try:
        await mail.publish(_fresh_copy(letter.message, signer), letter.replay_key)
    except aiormq.exceptions.ChannelPreconditionFailed:
        raise BrokerUnavailable(
            f"RabbitMQ refused to replay {letter.id} as signed by {signer!r}: replay it as that "
            "user, or as one with the impersonator tag (rabbitmqctl set_user_tags USER "
            "impersonator); nothing was replayed or removed"
        ) from None


def _fresh_copy(message: AbstractIncomingMessage, signer: str | None) -> aio_pika.Message:
    """The original message, without the marks of its death."""
    headers = {
        k: v
        for k, v in (message.headers or {}).items()
        if k not in COVEY_HEADERS
        and not k.startswith("x-death")
        and not k.startswith("x-first")
        and not k.startswith("x-last")
    }
    return copy_of(message, headers, user_id=signer)


def by_ids(prefixes: list[str]) -> Choose:
    """Choose the letters whose id starts with one of `prefixes`; each must match one."""

    def choose(letters: list[DeadLetter]) -> list[DeadLetter]:
        chosen = []
        for prefix in prefixes:
            if len(prefix) < 4:
                raise BadInput(f"dead letter id {prefix!r} is too short: give 4 characters or more")
            matches = [letter for letter in letters if letter.id.startswith(prefix)]
            if not matches:
                raise NotFound(f"no dead letter {prefix!r} (see `covey dead list`)")
            if len({m.id for m in matches}) > 1:
                raise BadInput(f"dead letter id {prefix!r} is ambiguous: give more characters")
            chosen += matches
        return chosen

    return choose


def older_than(cutoff: datetime) -> Choose:
    return lambda letters: [x for x in letters if x.dead_at is not None and x.dead_at < cutoff]
