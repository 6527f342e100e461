"""Security: per-participant broker users (`covey provision`), unforgeable senders, and the
open set-up's `trust_local`. Against the machine's broker, in the test's vhost, with
users named after the vhost so tests never share one; they are removed afterwards."""

from __future__ import annotations

import contextlib
import json
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractConnection, AbstractExchange
from conftest import Broker, ManagementAdmin, World

from coordinator.envelope import MESSAGE_TYPE, Envelope
from coordinator.gateway import Gateway
from coordinator.identity import SenderCheck
from coordinator.localbroker import LocalBroker, TlsFiles
from coordinator.replicas import read_replicas
from coordinator.settings import Settings


@pytest.fixture
def secured(world: World, broker: Broker, vhost: str) -> Iterator[World]:
    """The world, provisioned: every participant and the supervisor host has a user."""
    if not isinstance(broker.admin, ManagementAdmin):
        pytest.fail("covey provision needs the management API (.ci/run enables it)")
    prefix = f"{vhost}."
    world.extra_env["COVEY_USER_PREFIX"] = prefix
    try:
        world.ok("provision", "--host", "testhost")
        yield world
    finally:
        broker.admin.delete_users(prefix)


def credentials(world: World, user: str) -> str:
    return (world.state_dir / "credentials" / f"{user_named(world, user)}.url").read_text().strip()


def as_user(world: World, user: str) -> dict[str, str]:
    """The environment a process started with `user`'s credentials would have."""
    return {**world.env, "COVEY_AMQP_URL": credentials(world, user)}


def user_named(world: World, name: str) -> str:
    """The broker user `covey provision` made for NAME (`agent.scout`) in this test."""
    return f"{world.extra_env['COVEY_USER_PREFIX']}{name}"


def letter(
    sender: str, recipient: str, subject: str, signed_by: str | None = None
) -> aio_pika.Message:
    envelope = Envelope.new(sender=sender, recipient=recipient, subject=subject)
    return aio_pika.Message(
        envelope.to_json(), type=MESSAGE_TYPE, message_id=envelope.id, user_id=signed_by
    )


@contextlib.asynccontextmanager
async def mail_exchange_as(
    world: World, name: str
) -> AsyncIterator[tuple[AbstractConnection, AbstractExchange]]:
    """A raw connection with NAME's credentials, and the mail exchange on it (confirmed)."""
    connection = await aio_pika.connect(credentials(world, name))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield connection, await channel.get_exchange("covey", ensure=False)


def test_provision_writes_one_private_credentials_file_per_participant(secured: World) -> None:
    world = secured
    folder = world.state_dir / "credentials"
    files = sorted(p.name for p in folder.iterdir())
    expected = ["agent.loner", "agent.scout", "agent.writer", "human.ada", "supervisor.testhost"]
    assert files == [f"{user_named(world, name)}.url" for name in expected]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE((folder / f).stat().st_mode) for f in files} == {0o600}
    # Each URL works as it is: the agent can read its own mail with it.
    world.ok("send", "scout", "hello", env=as_user(world, "human.ada"))
    inbox = json.loads(
        world.ok("inbox", "--as", "scout", "--json", env=as_user(world, "agent.scout"))
    )
    assert [m["subject"] for m in inbox] == ["hello"]


def test_provision_is_idempotent_and_rotates_one_password(secured: World) -> None:
    world = secured
    before = {p.name: p.read_text() for p in (world.state_dir / "credentials").iterdir()}
    again = world.json("provision", "--host", "testhost")
    assert {x["action"] for x in again} == {"kept"}
    after = {p.name: p.read_text() for p in (world.state_dir / "credentials").iterdir()}
    assert after == before

    old_url = credentials(world, "agent.scout")
    rotated = world.json("provision", "--host", "testhost", "--rotate", "scout")
    assert [x["for"] for x in rotated if x["action"] == "rotated"] == ["agent:scout"]
    assert credentials(world, "agent.scout") != old_url
    refused = world.covey("inbox", "--as", "scout", env={**world.env, "COVEY_AMQP_URL": old_url})
    assert refused.returncode == 4 and "refused the login" in refused.stderr
    others = {p.name: p.read_text() for p in (world.state_dir / "credentials").iterdir()}
    assert {k: v for k, v in others.items() if "scout" not in k} == {
        k: v for k, v in before.items() if "scout" not in k
    }


def test_the_supervisors_user_reads_the_replicas_and_an_older_one_is_given_the_tag(
    secured: World, broker: Broker
) -> None:
    """status and metrics read where the queues' replicas are from the management API
    (replicas.py): the supervisor's user has the `management` tag for it. A supervisor
    user provisioned before it had the tag gets it, with its password kept."""
    url = credentials(secured, "supervisor.testhost")
    supervisor = Settings(amqp_url=url)
    queues = read_replicas(supervisor)
    assert queues is not None
    assert queues and all(len(q.members) == 1 and q.online == q.members for q in queues)
    # Quorum queues at once; streams once the API's next statistics tick has seen them.
    assert {"agent.scout", "covey.dead"} <= {q.name for q in queues}

    assert isinstance(broker.admin, ManagementAdmin)
    api, user = broker.admin.api, user_named(secured, "supervisor.testhost")
    found = api.call("GET", f"users/{quote(user, safe='')}")
    as_before = {"password_hash": found["password_hash"], "tags": ""}
    api.call("PUT", f"users/{quote(user, safe='')}", as_before)
    assert read_replicas(supervisor) is None  # without the tag, the API refuses it

    secured.ok("provision", "--host", "testhost")
    assert credentials(secured, "supervisor.testhost") == url
    assert read_replicas(supervisor) is not None
    tags = api.call("GET", f"users/{quote(user, safe='')}")["tags"]
    assert tags in (["management"], "management")  # a list since RabbitMQ 3.9


def test_provision_print_shows_new_credentials_once_and_writes_nothing(
    world: World, broker: Broker, vhost: str
) -> None:
    prefix = f"{vhost}."
    world.extra_env["COVEY_USER_PREFIX"] = prefix
    try:
        printed = world.json("provision", "--print", "--host", "testhost")
        assert {x["action"] for x in printed} == {"created"}
        assert all(x["url"].startswith("amqp://") for x in printed)
        assert not (world.state_dir / "credentials").exists()
        again = world.json("provision", "--print", "--host", "testhost")
        assert all("url" not in x for x in again)  # a password is shown once only
    finally:
        assert isinstance(broker.admin, ManagementAdmin)
        broker.admin.delete_users(prefix)


async def test_an_agent_cannot_read_another_agents_queue(secured: World) -> None:
    secured.ok("send", "writer", "for writer only", env=as_user(secured, "human.ada"))
    connection = await aio_pika.connect(credentials(secured, "agent.scout"))
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("agent.writer", passive=True)  # needs no permission
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.get(fail=False)
    # Refused, and nothing taken: writer still gets it.
    inbox = secured.ok("inbox", "--as", "writer", "--json", env=as_user(secured, "agent.writer"))
    assert [m["subject"] for m in json.loads(inbox)] == ["for writer only"]


async def test_an_agent_cannot_publish_as_another_user(secured: World) -> None:
    async with mail_exchange_as(secured, "agent.scout") as (connection, mail):
        forged = letter(
            "agent:writer", "agent:loner", "forged", signed_by=user_named(secured, "agent.writer")
        )
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="user_id"):
            await mail.publish(forged, "agent.loner")
        # Nor around the mail exchange, through the default exchange into a queue.
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.default_exchange.publish(
                letter("agent:scout", "agent:loner", "x"), "agent.loner"
            )


async def test_a_forged_sender_is_dead_lettered_as_spoofed(secured: World) -> None:
    scout_user = user_named(secured, "agent.scout")
    async with mail_exchange_as(secured, "agent.scout") as (_, mail):
        for sender, subject, signer in (
            ("agent:writer", "signed by scout, claims writer", scout_user),
            ("agent:writer", "unsigned", None),
            ("agent:scout", "genuine", scout_user),
        ):
            await mail.publish(letter(sender, "agent:loner", subject, signer), "agent.loner")
    inbox = secured.ok("inbox", "--as", "loner", "--json", env=as_user(secured, "agent.loner"))
    assert [m["subject"] for m in json.loads(inbox)] == ["genuine"]
    dead = secured.json("dead", "list")
    assert sorted(x["reason"] for x in dead) == ["spoofed", "spoofed"]
    assert {x["signed_by"] for x in dead} == {scout_user, None}
    assert all("claims to be from agent:writer" in x["detail"] for x in dead)


async def test_an_agent_keeps_its_own_cursor_and_changelog_but_not_anothers(
    secured: World,
) -> None:
    scout = as_user(secured, "agent.scout")
    secured.ok("log", "add", "scout changed the schema", "--as", "scout", env=scout)
    hook = secured.covey("digest", "scout", "--advance", "--format", "json", env=scout)
    assert hook.returncode == 0 and "cursor not moved" not in hook.stderr, hook.stderr
    settings = Settings(amqp_url=credentials(secured, "agent.scout"))
    async with await Gateway.connect(settings, "scout by hand") as gateway:
        cursor = json.dumps({"offset": 0}).encode()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await gateway.write_note("covey.cursor.writer", cursor, 0)
    # A person may ask the supervisor for a run; an agent may not.
    ada = secured.covey("run", "loner", "--via-supervisor", env=as_user(secured, "human.ada"))
    assert ada.returncode == 3 and "no supervisor" in ada.stderr.lower(), ada.stderr
    refused = secured.covey("run", "loner", "--via-supervisor", env=scout)
    assert refused.returncode == 4 and "access" in refused.stderr.lower(), refused.stderr
    # A person reads the run records; an agent need not.
    assert secured.covey("runs", env=as_user(secured, "human.ada")).returncode == 0
    assert secured.covey("runs", env=scout).returncode == 4


def test_a_run_hands_the_agent_its_own_credentials(secured: World, tmp_path: Path) -> None:
    world = secured
    seen = tmp_path / "url"
    world.add_agent("echo", f"command = 'echo \"$COVEY_AMQP_URL\" > {seen}'\n")
    world.ok("provision", "--host", "testhost")  # echo joined the roster
    supervisor = as_user(world, "supervisor.testhost")
    result = world.covey("run", "echo", env=supervisor)
    assert result.returncode == 0, result.stderr
    assert seen.read_text().strip() == credentials(world, "agent.echo")
    # The supervisor's user recorded the run, and cannot read mailboxes.
    assert [r["outcome"] for r in world.json("runs", "echo")] == ["ok"]
    world.ok("send", "echo", "private", env=as_user(world, "human.ada"))
    peek = world.covey("inbox", "--as", "echo", env=supervisor)
    assert peek.returncode == 4 and "access" in peek.stderr.lower()


def test_a_provisioned_supervisor_never_hands_out_its_own_credentials(secured: World) -> None:
    world = secured
    world.add_agent("newcomer", "command = 'true'\n")  # not provisioned yet
    result = world.covey("run", "newcomer", env=as_user(world, "supervisor.testhost"))
    assert result.returncode == 2, result.stderr
    assert "no credentials for agent:newcomer" in result.stderr
    assert "covey provision" in result.stderr


@pytest.mark.parametrize(
    ("trust_local", "sender", "user_id", "genuine"),
    [
        (True, "agent:a", "guest", True),  # the open set-up: the shared user speaks for all
        (True, "agent:a", None, True),
        (True, "agent:a", "p.agent.a", True),
        (True, "agent:a", "p.agent.b", False),  # a provisioned user speaks only for itself
        (True, "agent:a", "p.supervisor.host", False),  # supervisors send no mail
        (False, "agent:a", "p.agent.a", True),
        (False, "human:ada", "p.human.ada", True),
        (False, "agent:a", "guest", False),
        (False, "agent:a", None, False),
    ],
)
def test_sender_check(trust_local: bool, sender: str, user_id: str | None, genuine: bool) -> None:
    problem = SenderCheck("p.", trust_local).problem(sender, user_id)
    assert (problem is None) == genuine, problem


def self_signed(folder: Path, host: str = "localhost") -> TlsFiles:
    """A throwaway CA, and a certificate it signed for `host`."""
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    subject = ("-nodes", "-days", "2", "-subj")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-keyout", folder / "ca.key", "-out", files.ca,
            *subject, "/CN=covey test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-keyout", files.key, "-out", folder / "server.csr",
            *subject, f"/CN={host}")  # fmt: skip
    (folder / "san.cnf").write_text(f"subjectAltName=DNS:{host},IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", folder / "server.csr", "-CA", files.ca, "-CAkey",
            folder / "ca.key", "-CAcreateserial", "-out", files.cert, "-days", "2",
            "-extfile", folder / "san.cnf")  # fmt: skip
    return files


@pytest.mark.slow
def test_mail_over_tls_verifies_the_broker(world: World, tmp_path: Path) -> None:
    files = self_signed(tmp_path)
    with LocalBroker(tls=files) as node:
        world.amqp_url = node.tls_url  # a port that speaks only TLS
        world.extra_env["COVEY_TLS_CA"] = str(files.ca)
        world.ok("send", "scout", "over TLS")
        assert [m["subject"] for m in world.json("inbox", "--as", "scout")] == ["over TLS"]
        # Without the CA that signed it, the broker's certificate is refused, in one line.
        del world.extra_env["COVEY_TLS_CA"]
        refused = world.covey("inbox", "--as", "scout")
        assert refused.returncode == 4
        assert refused.stderr.count("\n") == 1 and "TLS with RabbitMQ" in refused.stderr
        assert "self-signed certificate" in refused.stderr
