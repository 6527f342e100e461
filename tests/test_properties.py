"""Property-based tests: whatever text or bytes arrive, parsing refuses cleanly or round-trips."""

from __future__ import annotations

import argparse
import contextlib
import io
import string
from datetime import UTC, datetime, timedelta, timezone

import aio_pika
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from coordinator.cli import _duration, _seconds, _since, build_parser
from coordinator.envelope import MESSAGE_TYPE, Envelope
from coordinator.errors import BadInput, InvalidEnvelope
from coordinator.gateway import mail_properties
from coordinator.mailbox import ENVELOPE_FIELDS, Mail, MailStatus
from coordinator.names import Address

names = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True)
addresses = st.one_of(
    st.just("all"),
    names,
    st.builds(
        lambda kind, name: f"{kind}:{name}", st.sampled_from(["agent", "team", "human"]), names
    ),
)


@given(st.text())
def test_any_text_is_an_address_or_one_line_of_bad_input(text: str) -> None:
    try:
        address = Address.parse(text)
    except BadInput as err:
        assert "\n" not in str(err)
    else:
        assert Address.parse(str(address)) == address


@given(addresses)
def test_valid_addresses_round_trip(text: str) -> None:
    address = Address.parse(text)
    assert Address.parse(str(address)) == address
    assert address.routing_key.split(".")[0] in ("agent", "team", "human", "broadcast")


@settings(max_examples=300)
@given(st.binary())
def test_any_bytes_are_an_envelope_or_invalid(data: bytes) -> None:
    try:
        Envelope.from_json(data)
    except InvalidEnvelope as err:
        assert err.reason == "invalid"


@given(
    sender=st.builds(
        lambda kind, name: f"{kind}:{name}", st.sampled_from(["agent", "human"]), names
    ),
    recipient=addresses,
    subject=st.text(
        alphabet=string.printable.replace("\n", "").replace("\r", ""), min_size=1, max_size=200
    ).filter(str.strip),
    body=st.text(),
)
def test_valid_envelopes_round_trip_through_json(
    sender: str, recipient: str, subject: str, body: str
) -> None:
    envelope = Envelope.new(sender=sender, recipient=recipient, subject=subject, body=body)
    assert Envelope.from_json(envelope.to_json()) == envelope


@given(
    sender=st.builds(
        lambda kind, name: f"{kind}:{name}", st.sampled_from(["agent", "human"]), names
    ),
    recipient=addresses,
    subject=st.text(max_size=210),
    body=st.text(),
    expires_in=st.one_of(st.none(), st.integers(-(10**6), 10**6)),
    naive=st.booleans(),
    joins=st.booleans(),
)
def test_a_composed_envelope_is_what_new_makes_or_the_same_refusal(
    sender: str,
    recipient: str,
    subject: str,
    body: str,
    expires_in: int | None,
    naive: bool,
    joins: bool,
) -> None:
    """`compose`, every send's fast path, checks only the caller's text: it must accept
    exactly what `new` accepts, refuse the rest with the same line, and make an envelope
    that full validation keeps as it is."""
    expires_at = None
    if expires_in is not None:
        expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
        expires_at = expires_at.replace(tzinfo=None) if naive else expires_at
    original = (
        Envelope.new(sender="human:ada", recipient="scout", subject="first") if joins else None
    )
    fields: dict[str, object] = {"sender": sender, "recipient": recipient, "subject": subject}
    fields.update(body=body, expires_at=expires_at)
    if original:
        fields.update(thread=original.thread, in_reply_to=original.id)

    def compose() -> Envelope:
        return Envelope.compose(
            Address.parse(sender),
            Address.parse(recipient),
            subject,
            body,
            original=original,
            expires_at=expires_at,
        )

    try:
        made = Envelope.new(**fields)
    except BadInput as err:
        with pytest.raises(BadInput) as caught:
            compose()
        assert str(caught.value) == str(err)
        return
    composed = compose()
    assert Envelope.model_validate(composed.model_dump()) == composed
    assert Envelope.from_json(composed.to_json()) == composed
    same = {"id", "created_at"} if original else {"id", "thread", "created_at"}
    assert composed.model_dump(exclude=same) == made.model_dump(exclude=same)
    if not original:
        assert composed.thread == composed.id


@given(
    created=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)), None])),
    expires=st.one_of(st.none(), st.datetimes(timezones=st.just(timezone(timedelta(hours=-5))))),
    body=st.text(),
)
def test_a_mail_as_json_is_its_envelope_as_pydantic_writes_it(
    created: datetime, expires: datetime | None, body: str
) -> None:
    """`Mail.to_dict` writes the envelope's fields without pydantic (so that showing mail
    never loads it): it must write what the envelope's model_dump(mode="json") does."""
    created = created if created.tzinfo else created.replace(tzinfo=UTC)
    envelope = Envelope.new(
        sender="human:ada",
        recipient="team:research",
        subject="s",
        body=body,
        created_at=created,
        expires_at=expires,
    )
    received = datetime.now(UTC)
    mail = Mail.of(envelope, MailStatus.READ, received)
    expected = {
        **envelope.model_dump(mode="json", exclude={"body"}),
        "status": "read",
        "received_at": received.isoformat(),
        "body": body,
    }
    assert mail.to_dict(with_body=True) == expected
    assert list(mail.to_dict(with_body=True)) == list(expected)
    assert mail.envelope == envelope
    assert tuple(Envelope.model_fields) == ENVELOPE_FIELDS


@given(
    created=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=2))])),
    expires_in=st.one_of(st.none(), st.floats(-(10**6), 10**6)),
    user=st.text(string.ascii_letters + ".:-", min_size=1, max_size=30),
)
def test_mail_properties_are_what_an_aio_pika_message_would_send(
    created: datetime, expires_in: float | None, user: str
) -> None:
    """A send builds its AMQP properties directly, not through aio-pika's Message: they must
    be the ones that Message gave, a TTL of the time left (at least 1 ms) included."""
    expires_at = None if expires_in is None else datetime.now(UTC) + timedelta(seconds=expires_in)
    envelope = Envelope.new(
        sender="agent:scout", recipient="human:ada", subject="s", created_at=created,
        expires_at=expires_at,
    )  # fmt: skip
    built = mail_properties(envelope, user)
    left = None
    if expires_at is not None:
        left = max(expires_at - datetime.now(UTC), timedelta(milliseconds=1))
    expected = aio_pika.Message(
        envelope.to_json(),
        content_type="application/json",
        type=MESSAGE_TYPE,
        message_id=envelope.id,
        timestamp=envelope.created_at,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=left,
        app_id="covey",
        user_id=user,
    ).properties
    ttl, expected_ttl = built.expiration, expected.expiration
    built.expiration = expected.expiration = None
    assert built == expected
    if expected_ttl is None:
        assert ttl is None
    else:
        assert ttl is not None and abs(int(ttl) - int(expected_ttl)) <= 50 and int(ttl) >= 1


argv_words = st.lists(
    st.one_of(
        st.sampled_from(
            ["send", "inbox", "read", "done", "wait", "log", "dead", "replay", "run", "digest"]
        ),
        st.sampled_from(["--timeout", "--since", "--wait-lock", "--older-than", "--limit"]),
        st.text(max_size=12),
    ),
    max_size=6,
)


@settings(max_examples=300)
@given(argv_words)
def test_any_command_line_parses_or_is_refused_by_the_parser(argv: list[str]) -> None:
    """Whatever a model types, parsing either yields a command or is argparse's usage
    error (exit 2): never another exception, which would surface as exit 70."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as refused:
        assert refused.code in (0, 2)  # 0: --help
    else:
        assert callable(args.handler)


@given(st.text(max_size=20))
@example("²")  # a digit to str.isdigit, not to int(): was a crash (exit 70), not a refusal
@example("#٣")
def test_durations_times_and_seconds_parse_or_are_refused(text: str) -> None:
    for convert in (_duration, _seconds, _since):
        try:
            convert(text)
        except argparse.ArgumentTypeError as err:
            assert "\n" not in str(err)
