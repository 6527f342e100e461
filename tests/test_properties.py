"""Property-based tests: whatever text or bytes arrive, parsing refuses cleanly or round-trips."""

from __future__ import annotations

import argparse
import contextlib
import io
import string

from hypothesis import example, given, settings
from hypothesis import strategies as st

from coordinator.cli import _duration, _seconds, _since, build_parser
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
