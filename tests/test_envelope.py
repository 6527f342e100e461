"""The envelope is the wire contract: what it accepts, what it refuses, and how it round-trips."""

from datetime import datetime, timedelta

import pytest

from coordinator.envelope import Envelope
from coordinator.errors import BadInput, InvalidEnvelope


def test_a_new_message_starts_its_own_thread() -> None:
    envelope = Envelope.new(sender="human:ada", recipient="scout", subject="hi")
    assert envelope.thread == envelope.id
    assert envelope.recipient == "agent:scout"  # normalised
    assert envelope.created_at.tzinfo is not None


def test_json_round_trip_keeps_every_field() -> None:
    envelope = Envelope.new(
        sender="agent:scout",
        recipient="team:research",
        subject="findings",
        body="line 1\nline 2 ✓",
        thread="t1-thread",
        in_reply_to="m0-message",
        expires_at=datetime.now().astimezone() + timedelta(hours=1),
    )
    assert Envelope.from_json(envelope.to_json()) == envelope


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"subject": "  "}, "subject: subject is empty"),
        ({"subject": "two\nlines"}, "one line"),
        ({"subject": "x" * 201}, "longer than 200"),
        ({"sender": "team:research"}, "not a participant"),
        ({"recipient": "robot:x"}, "invalid address"),
        ({"created_at": datetime(2026, 1, 1)}, "time zone"),
    ],
)
def test_bad_fields_are_refused_in_one_line(fields: dict[str, object], problem: str) -> None:
    base: dict[str, object] = {"sender": "human:ada", "recipient": "scout", "subject": "s"}
    with pytest.raises(BadInput) as caught:
        Envelope.new(**{**base, **fields})
    assert problem in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff junk",
        b"[]",
        b'{"id": "x"}',
        b'{"sender": "human:ada", "recipient": "x"}',
        # Everything but an id: a redelivery could not be told from a new message.
        b'{"sender": "human:ada", "recipient": "scout", "subject": "s", "thread": "t",'
        b' "created_at": "2026-11-26T00:00:00Z"}',
    ],
)
def test_junk_on_the_wire_is_an_invalid_envelope(data: bytes) -> None:
    with pytest.raises(InvalidEnvelope) as caught:
        Envelope.from_json(data)
    assert caught.value.reason == "invalid"
