"""Faults injected into a private broker node (never the machine's own): what covey does
when RabbitMQ blocks publishers or goes away."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import World

from coordinator.localbroker import LocalBroker


@pytest.fixture(scope="module")
def node() -> Iterator[LocalBroker]:
    with LocalBroker() as broker:
        yield broker


@pytest.fixture
def on_node(world: World, node: LocalBroker) -> World:
    world.amqp_url = node.url
    world.ok("topology", "apply")
    return world


@pytest.mark.slow
def test_a_memory_alarm_makes_send_exit_4_within_its_timeout(
    on_node: World, node: LocalBroker
) -> None:
    node.ctl("set_vm_memory_high_watermark", "0")  # injected: the broker blocks publishers
    try:
        started = time.monotonic()
        result = on_node.covey("send", "scout", "while blocked", "--timeout", "2")
        took = time.monotonic() - started
        assert result.returncode == 4, result.stdout + result.stderr
        assert "blocking publishers" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert took < 15  # bounded by its timeout (2 s), with room for a slow start
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.4")
    # Sent=1, confirmed=0: reported as failed. Once the alarm clears, mail flows again.
    on_node.ok("send", "scout", "after the alarm")
    assert "after the alarm" in [m["subject"] for m in on_node.json("inbox", "--as", "scout")]
