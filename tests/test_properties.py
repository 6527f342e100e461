"""Property-based tests: whatever text or bytes arrive, parsing refuses cleanly or round-trips."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.envelope import Envelope
from coordinator.errors import BadInput, InvalidEnvelope
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
