"""The envelope: one message, as it travels and as it is stored. This is the wire contract.

On the wire an envelope is the JSON body of an AMQP message whose `type`
property is `covey.message.v1` and whose `message_id` is the envelope id (see
`gateway.py` for the AMQP side). A new, incompatible shape gets a new type name,
so old and new consumers can tell each other's messages apart.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from coordinator.errors import BadInput, InvalidEnvelope, first_problem
from coordinator.names import Address

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

MESSAGE_TYPE = "covey.message.v1"
MAX_SUBJECT_CHARS = 200

# Ids, threads and in-reply-tos: what covey makes (32 hex digits), or what another
# producer might (a UUID with dashes, a lowercased ULID, `name-0001`). Lowercase,
# because ids are found again by a lowercase prefix of at least 4 characters; ASCII
# letters, digits, '.', '_' and '-' only, so an id prints as itself (no newline to
# fake a header with, no escape sequence, no look-alike letter) and is safe in a
# file name or a routing key.
ID_PATTERN = r"[a-z0-9][a-z0-9._-]{3,127}"
_ID = re.compile(ID_PATTERN)


def new_id() -> str:
    """32 hex digits, 128 bits from the OS: unguessable, so nobody can take a message's id
    before it is sent (the mailbox refuses an id it holds for another message)."""
    return secrets.token_hex(16)


def now() -> datetime:
    return datetime.now(UTC)


def _address(text: str) -> str:
    try:
        return str(Address.parse(text))
    except BadInput as err:
        raise ValueError(str(err)) from None


def participant_text(text: str) -> str:
    """For pydantic validators: a participant's address (agent:NAME, human:NAME) as
    normalised text."""
    try:
        return str(Address.participant(text))
    except BadInput as err:
        raise ValueError(str(err)) from None


def _subject(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("subject is empty")
    if any(ch in text for ch in "\r\n"):
        raise ValueError("subject must be one line")
    if len(text) > MAX_SUBJECT_CHARS:
        raise ValueError(f"subject is longer than {MAX_SUBJECT_CHARS} characters")
    return text


def message_id_text(text: str) -> str:
    """For pydantic validators: an id in the format of ID_PATTERN (not to be confused
    with the AMQP `message_id` property, which carries it)."""
    if not _ID.fullmatch(text):
        raise ValueError(
            "not a message id: use 4-128 characters of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return text


MessageId = Annotated[str, AfterValidator(message_id_text)]


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        raise ValueError("timestamps must carry a time zone")
    return moment


class Envelope(BaseModel):
    """One message. `thread` is the id of the message that started the conversation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: MessageId
    sender: Annotated[str, AfterValidator(participant_text)]
    recipient: Annotated[str, AfterValidator(_address)]
    subject: Annotated[str, AfterValidator(_subject)]
    body: str = ""
    thread: MessageId
    in_reply_to: MessageId | None = None
    created_at: Annotated[datetime, AfterValidator(_aware)]
    expires_at: Annotated[datetime | None, AfterValidator(_aware)] = None

    @classmethod
    def new(cls, **fields: object) -> Envelope:
        """A new message from caller input: a fresh id, its own thread unless it joins
        one, stamped now. A problem raises BadInput with one line."""
        fields.setdefault("id", new_id())
        fields.setdefault("thread", fields["id"])
        fields.setdefault("created_at", now())
        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            raise BadInput(_first_problem(err)) from None

    @classmethod
    def compose(
        cls,
        sender: Address,
        recipient: Address,
        subject: str,
        body: str = "",
        *,
        original: Envelope | None = None,
        expires_at: datetime | None = None,
    ) -> Envelope:
        """A new message from this participant, as `new` makes it, at a fraction of the
        cost: it is every send's path. What covey made itself is not checked again (the
        addresses it parsed, a fresh id, the thread of a message its mailbox holds, which
        was checked when it was filed); the caller's own text is, by the same rules and
        with the same one line as `new`."""
        if not sender.is_participant:
            raise BadInput(
                f"sender: {str(sender)!r} is not a participant: use agent:NAME or human:NAME"
            )
        try:
            subject = _subject(subject)
        except ValueError as err:
            raise BadInput(f"subject: {err}") from None
        if not isinstance(body, str):
            raise BadInput(f"body: must be text, not {type(body).__name__}")
        if expires_at is not None and expires_at.tzinfo is None:
            raise BadInput("expires_at: timestamps must carry a time zone")
        message_id = new_id()
        return cls.model_construct(
            id=message_id,
            sender=str(sender),
            recipient=str(recipient),
            subject=subject,
            body=body,
            thread=original.thread if original else message_id,
            in_reply_to=original.id if original else None,
            created_at=now(),
            expires_at=expires_at,
        )

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        """Parse a delivery's body; anything that is not a valid envelope raises
        InvalidEnvelope. Nothing is made up: an envelope without an id is invalid, since
        a redelivery must be recognisable as the same message."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as err:
            raise InvalidEnvelope("invalid", _first_problem(err)) from None

    @classmethod
    def from_delivery(cls, message: AbstractIncomingMessage) -> Envelope:
        """The envelope in an AMQP delivery; raises InvalidEnvelope for anything else."""
        if message.type != MESSAGE_TYPE:
            raise InvalidEnvelope(
                "invalid", f"type property is {message.type!r}, expected {MESSAGE_TYPE!r}"
            )
        envelope = cls.from_json(message.body)
        if message.message_id and message.message_id != envelope.id:
            raise InvalidEnvelope(
                "invalid",
                f"message_id {message.message_id!r} differs from envelope id {envelope.id!r}",
            )
        return envelope

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @property
    def recipient_address(self) -> Address:
        return Address.parse(self.recipient)

    def is_expired(self, at: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (at or now())

    def body_size(self) -> int:
        return len(self.body.encode())


def _first_problem(err: ValidationError) -> str:
    field, problem = first_problem(err)
    return f"{field or 'message'}: {problem}"
