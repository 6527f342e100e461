"""Addresses: what a person types, and the routing key and queue it maps to."""

import pytest

from coordinator.errors import BadInput
from coordinator.names import Address


@pytest.mark.parametrize(
    ("text", "kind", "key"),
    [
        ("agent:scout", "agent", "agent.scout"),
        ("scout", "agent", "agent.scout"),
        ("team:research", "team", "team.research"),
        ("human:ada", "human", "human.ada"),
        ("all", "all", "broadcast"),
        ("  writer-2_b ", "agent", "agent.writer-2_b"),
    ],
)
def test_addresses_map_to_routing_keys(text: str, kind: str, key: str) -> None:
    address = Address.parse(text)
    assert address.kind == kind
    assert address.routing_key == key
    assert Address.parse(str(address)) == address


@pytest.mark.parametrize(
    "text",
    ["", "Scout", "agent:", "robot:x", "team:a.b", "-x", "a" * 65, "agent:sc out", "all:x"],
)
def test_invalid_addresses_are_refused_with_the_rule(text: str) -> None:
    with pytest.raises(BadInput) as caught:
        Address.parse(text)
    assert "\n" not in str(caught.value)


def test_only_participants_have_queues() -> None:
    assert Address.parse("human:ada").queue == "human.ada"
    with pytest.raises(ValueError):
        _ = Address.parse("team:research").queue
    with pytest.raises(BadInput, match="not a participant"):
        Address.participant("all")
