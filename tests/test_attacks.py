"""Attacks by a provisioned participant (issue 11): agent scout, with its own URL and plain
aio-pika, tries to eavesdrop on writer's mail, forge ada's changelog entries and dead
letters, and squat writer's lock and notes. Each is refused by the broker, or shown by
covey as unverified. Against the machine's broker, in the test's vhost."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from conftest import Broker, ManagementAdmin, World
from test_security import as_user, credentials, secured, user_named
from yarl import URL

from coordinator.envelope import MESSAGE_TYPE, Envelope
from coordinator.names import Address
from coordinator.provision import participant_grant

__all__ = ["secured"]  # the fixture, used here by name

Refused = aiormq.exceptions.ChannelAccessRefused


@contextlib.asynccontextmanager
async def connected_as(world: World, name: str) -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(credentials(world, name))
    async with connection:
        yield connection


@pytest.fixture
def operator(secured: World, broker: Broker, vhost: str) -> Iterator[dict[str, str]]:
    """The environment of an operator who may replay anyone's letter: an administrator
    with RabbitMQ's `impersonator` tag (removed with the test's other users)."""
    assert isinstance(broker.admin, ManagementAdmin)
    user = user_named(secured, "operator")
    api = broker.admin.api
    api.call("PUT", f"users/{quote(user, safe='')}", {"password": "op", "tags": "impersonator"})
    api.call(
        "PUT",
        f"permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    url = str(URL(broker.vhost_url(vhost)).with_user(user).with_password("op"))
    yield {**secured.env, "COVEY_AMQP_URL": url}


# -- eavesdropping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exchange", "key"),
    [
        ("covey", "agent.writer"),  # writer's mail
        ("covey", "#"),  # everyone's
        ("covey.dead", ""),  # what others' mailboxes refused
        ("covey.unrouted", ""),
        ("covey.notes", "covey.cursor.writer"),  # writer's notes, as they are written
        ("covey.notes", "#"),
    ],
)
async def test_an_agent_cannot_bind_a_queue_of_its_own_to_others_traffic(
    secured: World, exchange: str, key: str
) -> None:
    async with connected_as(secured, "agent.scout") as connection:
        channel = await connection.channel()
        mine = await channel.declare_queue(exclusive=True)  # server-named: allowed
        with pytest.raises(Refused):
            await mine.bind(exchange, key)


async def test_an_agent_cannot_route_mail_into_a_queue_it_reads(secured: World) -> None:
    """The changelog stream (which it reads, and may write to) is no way round."""
    async with connected_as(secured, "agent.scout") as connection:
        channel = await connection.channel()
        stream = await channel.get_queue("covey.changelog", ensure=False)
        with pytest.raises(Refused):
            await stream.bind("covey", "agent.writer")
    secured.ok("send", "writer", "still private", env=as_user(secured, "human.ada"))
    inbox = secured.ok("inbox", "--as", "writer", "--json", env=as_user(secured, "agent.writer"))
    assert [m["subject"] for m in json.loads(inbox)] == ["still private"]
    news = secured.json("log", "--since", "0")
    assert news == []


# -- a forged changelog ----------------------------------------------------------------


async def forge_changelog(world: World, signed: bool) -> None:
    """scout appends an entry that claims ada wrote it, signed by scout or not at all."""
    user = user_named(world, "agent.scout") if signed else None
    body = json.dumps({"author": "human:ada", "summary": f"forged, signed={signed}"}).encode()
    async with connected_as(world, "agent.scout") as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("covey.changelog", ensure=False)
        await exchange.publish(aio_pika.Message(body, user_id=user), "")


def groups(text: str) -> dict[str, str]:
    """The digest's `## GROUP` sections, by heading."""
    return {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}


async def test_a_forged_changelog_author_is_shown_as_unverified(secured: World) -> None:
    world = secured
    ada, scout = user_named(world, "human.ada"), user_named(world, "agent.scout")
    world.ok("log", "add", "ada's real news", "--as", "human:ada", env=as_user(world, "human.ada"))
    await forge_changelog(world, signed=True)
    await forge_changelog(world, signed=False)
    # Whoever reads it — the agent itself (its session hook), the supervisor that
    # builds a run's digest, the operator — sees the forgeries for what they are.
    for reader in ("agent.loner", "supervisor.testhost", None):
        env = as_user(world, reader) if reader else world.env
        result = world.covey("digest", "loner", "--format", "json", env=env)
        assert result.returncode == 0, result.stderr
        digest = json.loads(result.stdout)
        by_summary = {e["summary"]: e for e in digest["entries"]}
        assert by_summary["ada's real news"]["verified"] is True
        assert by_summary["ada's real news"]["signed_by"] == ada
        assert by_summary["forged, signed=True"]["verified"] is False
        assert by_summary["forged, signed=True"]["signed_by"] == scout
        assert by_summary["forged, signed=False"]["verified"] is False
        assert by_summary["forged, signed=False"]["signed_by"] is None
        sections = groups(digest["text"])
        assert "forged" not in sections["human:ada"] and "real news" in sections["human:ada"]
        assert "forged, signed=True" in sections[f"human:ada (unverified: written by {scout})"]
        assert "forged, signed=False" in sections["human:ada (unverified: unsigned)"]
    logged = json.loads(world.ok("log", "--json", env=as_user(world, "agent.loner")))
    assert [(e["summary"], e["verified"]) for e in logged] == [
        ("ada's real news", True),
        ("forged, signed=True", False),
        ("forged, signed=False", False),
    ]
    text = world.ok("log", env=as_user(world, "agent.loner"))
    assert sum("unverified" in line for line in text.splitlines()) == 2


# -- a forged dead letter --------------------------------------------------------------


async def forge_dead_letter(world: World, queue: str, signed: bool = True) -> str:
    """scout puts in covey.dead a letter to writer, 'from ada', whose headers say that
    ada signed it and that it died in `queue`. Returns its id."""
    envelope = Envelope.new(sender="human:ada", recipient="agent:writer", subject="from ada?")
    headers = {
        "x-covey-reason": "invalid",
        "x-covey-detail": "looked odd",
        "x-covey-queue": queue,
        "x-covey-user-id": user_named(world, "human.ada"),
    }
    async with connected_as(world, "agent.scout") as connection:
        channel = await connection.channel(publisher_confirms=True)
        dead = await channel.get_exchange("covey.dead", ensure=False)
        message = aio_pika.Message(
            envelope.to_json(),
            type=MESSAGE_TYPE,
            message_id=envelope.id,
            headers=headers,  # type: ignore[arg-type]
            user_id=user_named(world, "agent.scout") if signed else None,
        )
        await dead.publish(message, "agent.writer")
    return envelope.id


def shown(world: World, letter_id: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return json.loads(world.ok("dead", "show", letter_id[:12], "--json", env=env))  # type: ignore[no-any-return]


def subjects(world: World, agent: str) -> list[str]:
    inbox = world.ok("inbox", "--as", agent, "--json", env=as_user(world, f"agent.{agent}"))
    return [m["subject"] for m in json.loads(inbox)]


async def test_a_forged_dead_letter_is_shown_unverified_and_never_replayed_as_genuine(
    secured: World, operator: dict[str, str]
) -> None:
    world = secured
    scout = user_named(world, "agent.scout")
    forged = await forge_dead_letter(world, queue="agent.writer")
    letter = shown(world, forged)
    assert letter["signed_by"] == scout  # who put it there, as the broker saw it
    assert letter["verified"] is False
    assert letter["claimed_signer"] == user_named(world, "human.ada")
    text = world.ok("dead", "show", forged[:12])
    assert f"unverified: claims {user_named(world, 'human.ada')}" in text
    assert world.ok("dead", "list").count("unverified") == 1
    # The operator may impersonate anyone, and still does not make it ada's mail:
    # it goes back to the one mailbox scout may speak for, signed as scout.
    replayed = json.loads(world.ok("dead", "replay", forged[:12], "--json", env=operator))
    assert replayed == {"replayed": [forged]}
    assert subjects(world, "writer") == []
    assert subjects(world, "scout") == []  # scout's own mailbox refuses it, in turn
    again = shown(world, forged)
    assert again["reason"] == "spoofed" and again["signed_by"] == scout
    assert "claims to be from human:ada" in again["detail"]


async def test_an_unsigned_forged_dead_letter_is_refused_by_its_recipient(
    secured: World, operator: dict[str, str]
) -> None:
    world = secured
    forged = await forge_dead_letter(world, queue="agent.writer", signed=False)
    letter = shown(world, forged)
    assert letter["signed_by"] is None and letter["verified"] is False
    world.ok("dead", "replay", forged[:12], env=operator)
    assert subjects(world, "writer") == []  # writer's mailbox: unsigned, so spoofed
    again = shown(world, forged)
    assert again["reason"] == "spoofed" and again["signed_by"] is None


async def test_what_a_participant_says_of_its_own_mailbox_goes_back_there_only(
    secured: World, operator: dict[str, str]
) -> None:
    """A letter scout reports from its own queue is believed (a lie would fool only
    scout), and a replay goes back to scout's queue, whatever its routing key says."""
    world = secured
    claim = await forge_dead_letter(world, queue="agent.scout")
    letter = shown(world, claim)
    assert letter["signed_by"] == user_named(world, "human.ada") and letter["verified"] is True
    assert letter["reported_by"] == user_named(world, "agent.scout")
    world.ok("dead", "replay", claim[:12], env=operator)
    assert subjects(world, "writer") == []
    assert subjects(world, "scout") == ["from ada?"]


async def test_a_real_dead_letter_keeps_its_signer(secured: World) -> None:
    """What writer's own mailbox refused names the original's signer, believed."""
    world = secured
    scout = user_named(world, "agent.scout")
    envelope = Envelope.new(sender="human:ada", recipient="agent:writer", subject="spoof")
    async with connected_as(world, "agent.scout") as connection:
        channel = await connection.channel(publisher_confirms=True)
        mail = await channel.get_exchange("covey", ensure=False)
        message = aio_pika.Message(
            envelope.to_json(), type=MESSAGE_TYPE, message_id=envelope.id, user_id=scout
        )
        await mail.publish(message, "agent.writer")
    assert subjects(world, "writer") == []
    letter = shown(world, envelope.id)
    assert letter["reason"] == "spoofed"
    assert letter["signed_by"] == scout and letter["verified"] is True
    assert letter["reported_by"] == user_named(world, "agent.writer")


async def test_covey_headers_smuggled_in_mail_do_not_survive_dead_lettering(
    secured: World, operator: dict[str, str]
) -> None:
    """Unsigned mail 'from ada' to writer, whose own headers say ada signed it: writer's
    mailbox refuses it, and its report names no signer, whatever the headers said."""
    world = secured
    envelope = Envelope.new(sender="human:ada", recipient="agent:writer", subject="smuggled")
    headers = {"x-covey-user-id": user_named(world, "human.ada"), "x-covey-queue": "agent.writer"}
    async with connected_as(world, "agent.scout") as connection:
        channel = await connection.channel(publisher_confirms=True)
        mail = await channel.get_exchange("covey", ensure=False)
        message = aio_pika.Message(
            envelope.to_json(),
            type=MESSAGE_TYPE,
            message_id=envelope.id,
            headers=headers,  # type: ignore[arg-type]
        )
        await mail.publish(message, "agent.writer")
    assert subjects(world, "writer") == []
    letter = shown(world, envelope.id)
    assert letter["reason"] == "spoofed" and letter["signed_by"] is None
    assert letter["claimed_signer"] is None
    world.ok("dead", "replay", envelope.id[:12], env=operator)
    assert subjects(world, "writer") == []
    assert shown(world, envelope.id)["reason"] == "spoofed"


# -- squatting locks and notes ---------------------------------------------------------


async def test_an_agent_cannot_take_anothers_lock_nor_touch_its_notes(secured: World) -> None:
    world = secured
    writer = as_user(world, "agent.writer")
    world.ok("log", "add", "something", "--as", "human:ada", env=as_user(world, "human.ada"))
    # writer's own lock and notes exist: its holder note, and its cursor.
    world.ok("digest", "writer", "--advance", "--format", "json", env=writer)
    notes = ["covey.lock.agent.writer.holder", "covey.cursor.writer"]
    async with connected_as(world, "agent.scout") as connection:

        async def refused(what: str, *args: Any) -> None:
            channel = await connection.channel(publisher_confirms=True)
            with pytest.raises(Refused):
                if what == "lock":
                    await channel.declare_queue(args[0], exclusive=True, durable=False)
                elif what == "publish":
                    notes_exchange = await channel.get_exchange("covey.notes", ensure=False)
                    await notes_exchange.publish(aio_pika.Message(b"{}"), args[0])
                else:
                    queue = await channel.get_queue(args[0], ensure=False)
                    if what == "delete":
                        await queue.delete(if_unused=False, if_empty=False)
                    elif what == "purge":
                        await queue.purge()
                    else:
                        await queue.get(no_ack=True, fail=False)

        await refused("lock", "covey.lock.agent.writer")
        await refused("lock", "covey.lock.agent.writer.holder")
        await refused("lock", "covey.lock.unlisted")  # not a lock in covey.toml
        for note in notes:
            for what in ("delete", "purge", "get", "publish"):
                await refused(what, note)
        # Its own lock, and the shared ones, it may take.
        channel = await connection.channel()
        for name in ("covey.lock.agent.scout", "covey.lock.global", "covey.lock.gpu.1"):
            await channel.declare_queue(name, exclusive=True, durable=False)
    # writer's notes are intact, and writer runs as before.
    cursor = json.loads(world.ok("digest", "writer", "--format", "json", env=writer))["cursor"]
    assert cursor == 0
    world.ok("digest", "writer", "--advance", "--format", "json", env=writer)


@pytest.fixture(autouse=True)
def gpu_lock(request: pytest.FixtureRequest) -> None:
    """Every world here has a named semaphore, `gpu` with 2 slots, declared before it
    is provisioned (the `secured` fixture reads covey.toml after this)."""
    if "secured" in request.fixturenames:
        world: World = request.getfixturevalue("world")
        toml = world.home / "covey.toml"
        toml.write_text(toml.read_text() + "\n[locks.gpu]\nslots = 2\n")


@pytest.mark.parametrize(
    ("queue", "allowed"),
    [
        ("covey.lock.agent.a", True),
        ("covey.lock.agent.a.holder", True),  # its notes
        ("covey.lock.global", True),
        ("covey.lock.global.holder", True),
        ("covey.lock.gpu.0", True),
        ("covey.lock.gpu.1.holder", True),
        ("covey.cursor.a", True),
        ("covey.lock.agent.b", False),  # another agent's lock
        ("covey.lock.agent.b.holder", False),
        ("covey.lock.agent.ab", False),  # a name that starts like its own
        ("covey.lock.agent.a-b", False),
        ("covey.lock.gpu", False),  # a semaphore's slots only
        ("covey.lock.gpu.2", False),
        ("covey.lock.other", False),  # not in covey.toml
        ("covey.cursor.b", False),
        ("covey.cursor.a.x", False),
        ("covey-lock-agent-a", False),  # the dots are dots, not any character
        ("xcovey.lock.agent.a", False),  # anchored at both ends
        ("agent.b", False),
    ],
)
def test_an_agents_grant_names_only_its_own_locks_and_notes(queue: str, allowed: bool) -> None:
    grant = participant_grant(Address("agent", "a"), "p.", {"global": 1, "gpu": 2})
    # RabbitMQ searches with each regex (it does not add anchors of its own).
    for regex in (grant.configure, grant.topics["covey.notes"].write):
        assert bool(re.search(regex, queue)) is allowed, regex


def test_a_shared_lock_named_agent_is_refused_by_provision(secured: World) -> None:
    """`covey.lock.agent[.N]` would be every agent's own lock (agent `0` has `.0`)."""
    toml = secured.home / "covey.toml"
    toml.write_text(toml.read_text() + "\n[locks.agent]\nslots = 2\n")
    result = secured.covey("provision", "--host", "testhost")
    assert result.returncode == 2, result.stderr
    assert "[locks.agent]" in result.stderr and len(result.stderr.splitlines()) == 1
