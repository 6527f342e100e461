"""`covey topology apply`: from the roster, idempotent, quorum queues that dead-letter."""

import aio_pika
import aiormq
import pytest
from conftest import Raw, World

from coordinator import topology
from coordinator.gateway import SIZE_ARGUMENTS
from coordinator.names import Address
from coordinator.roster import Roster
from coordinator.settings import Settings


def test_specs_refuse_combinations_rabbitmq_would_refuse_or_ignore() -> None:
    with pytest.raises(ValueError, match="reject-publish"):
        topology.QueueSpec(
            "q",
            {"x-dead-letter-exchange": "d", "x-dead-letter-strategy": "at-least-once"},
        )
    with pytest.raises(ValueError, match="needs an exchange"):
        topology.QueueSpec("q", {"x-dead-letter-strategy": "at-most-once"})
    with pytest.raises(ValueError, match="at least 1"):
        topology.QueueSpec("q", {"x-delivery-limit": 0})
    with pytest.raises(ValueError, match="at least one member"):
        topology.QueueSpec("q", {"x-quorum-initial-group-size": 0})
    with pytest.raises(ValueError, match="at least one member"):
        topology.StreamSpec("s", {"x-initial-cluster-size": 0})


def test_every_queue_and_stream_is_created_with_replicas_members() -> None:
    plan = topology.for_roster(Roster.load(Settings()), Settings(replicas=2))
    sizes = {
        spec.name: spec.declare_arguments.get(
            "x-quorum-initial-group-size"
            if isinstance(spec, topology.QueueSpec)
            else "x-initial-cluster-size"
        )
        for spec in plan.queues
    }
    assert set(sizes.values()) == {2}, sizes
    assert {"covey.dead", "covey.changelog", "covey.sessions", "covey.runs"} <= set(sizes)


def test_a_participant_is_bound_to_its_key_its_teams_and_broadcast() -> None:
    plan = topology.for_participant(Address("agent", "scout"), ["research", "ops"], Settings())
    keys = sorted(b.routing_key for b in plan.bindings)
    assert keys == ["agent.scout", "broadcast", "team.ops", "team.research"]
    human = topology.for_participant(Address("human", "ada"), [], Settings())
    assert [b.routing_key for b in human.bindings] == ["human.ada"]  # no broadcast for people


async def test_apply_is_idempotent_and_makes_durable_quorum_queues(world: World, raw: Raw) -> None:
    first = world.ok("topology", "apply")
    second = world.ok("topology", "apply")
    assert first == second
    assert "3 agents and 1 human." in first
    connection = await aio_pika.connect(world.amqp_url)
    async with connection:
        for queue in ("agent.scout", "agent.writer", "agent.loner", "human.ada", "covey.dead"):
            channel = await connection.channel()
            await channel.declare_queue(queue, passive=True)
        # Re-declaring with exactly these arguments is accepted, so they are what the
        # queue has; the same as a classic queue is refused, so it is a quorum queue.
        arguments = {
            "x-queue-type": "quorum",
            "x-delivery-limit": 10,
            "x-dead-letter-exchange": "covey.dead",
            "x-dead-letter-strategy": "at-most-once",
            "x-quorum-initial-group-size": 3,  # `replicas`, by default
        }
        channel = await connection.channel()
        await channel.declare_queue("agent.scout", durable=True, arguments=arguments)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-queue-type"):
            classic = {**arguments, "x-queue-type": "classic"}
            await channel.declare_queue("agent.scout", durable=True, arguments=classic)


async def test_mail_waits_for_an_agent_that_has_never_run(world: World, raw: Raw) -> None:
    world.ok("topology", "apply")
    world.ok("send", "writer", "for later")
    assert await raw.count("agent.writer") == 1
    assert not any(world.state_dir.rglob("agent.writer.sqlite3"))
    assert [m["subject"] for m in world.json("inbox", "--as", "writer")] == ["for later"]


def test_first_send_in_a_fresh_namespace_sets_the_topology_up(world: World) -> None:
    world.ok("send", "scout", "hello, empty broker")  # nobody ran `topology apply`
    assert [m["subject"] for m in world.json("inbox", "--as", "scout")] == ["hello, empty broker"]


def test_a_changed_delivery_limit_is_reported_not_crashed(world: World) -> None:
    world.ok("topology", "apply")
    world.extra_env["COVEY_DELIVERY_LIMIT"] = "3"
    result = world.covey("topology", "apply")
    assert result.returncode == 2
    assert "x-delivery-limit" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def declare_as_before_replicas(world: World) -> None:
    """Declare the world's topology as covey did before `replicas`: with no initial size."""
    settings = Settings.load(world.home, amqp_url=world.amqp_url)
    plan = topology.for_roster(Roster.load(settings), settings)
    connection = await aio_pika.connect(world.amqp_url)
    async with connection:
        channel = await connection.channel()
        for spec in plan.queues:
            arguments = spec.declare_arguments
            for size in SIZE_ARGUMENTS:
                arguments.pop(size, None)
            await channel.declare_queue(spec.name, durable=True, arguments=arguments)


async def test_a_topology_from_before_replicas_is_applied_again_with_any_replicas(
    world: World,
) -> None:
    # RabbitMQ 3.10 refuses a re-declare whose initial size differs from the queue's
    # (406); an upgraded covey must not, since the size counts only at creation.
    await declare_as_before_replicas(world)
    world.ok("topology", "apply")
    world.extra_env["COVEY_REPLICAS"] = "1"
    world.ok("topology", "apply")
    world.ok("send", "scout", "after the upgrade")
    assert [m["subject"] for m in world.json("inbox", "--as", "scout")] == ["after the upgrade"]


def test_replicas_changed_after_creation_is_not_refused(world: World) -> None:
    world.ok("topology", "apply")
    world.extra_env["COVEY_REPLICAS"] = "2"
    world.ok("topology", "apply")  # re-declares queues created with 3 members


async def test_a_changed_delivery_limit_is_still_reported_on_a_queue_from_before_replicas(
    world: World,
) -> None:
    await declare_as_before_replicas(world)
    world.extra_env["COVEY_DELIVERY_LIMIT"] = "3"
    result = world.covey("topology", "apply")
    assert result.returncode == 2
    assert "x-delivery-limit" in result.stderr


def test_replicas_is_at_least_one(world: World) -> None:
    world.extra_env["COVEY_REPLICAS"] = "0"
    result = world.covey("topology", "apply")
    assert result.returncode == 2
    assert "COVEY_REPLICAS" in result.stderr and "replicas" in result.stderr


async def test_an_agent_added_after_apply_gets_its_first_mail(world: World, raw: Raw) -> None:
    """A send declares its recipient's part of the topology alone where the core is there
    (`ensure_participants(assume_core=True)`): that part must be whole, so mail to an
    agent added since `topology apply`, and to its team, waits in its queue, not in
    covey.unrouted."""
    world.ok("topology", "apply")
    world.add_agent("newcomer", 'command = "true"\nteams = ["crew"]\n')
    world.ok("send", "newcomer", "welcome")
    world.ok("send", "team:crew", "to the crew")
    assert await raw.count("agent.newcomer") == 2
    assert await raw.count("covey.unrouted") == 0
