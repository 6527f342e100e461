"""Fixtures: a real RabbitMQ, a vhost of its own for every test, and a covey home to run in.

Where the broker comes from, first that works: COVEY_TEST_AMQP_URL; one
answering on localhost:5672; a RabbitMQ testcontainer where Docker works; a
private rabbitmq-server node where the package is installed. Else the run stops
with one line saying how to get one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aio_pika
import pytest
from yarl import URL

from coordinator.client import Covey
from coordinator.errors import BrokerUnavailable
from coordinator.localbroker import LocalBroker, answers, throwaway_broker
from coordinator.provision import Management

REPO = Path(__file__).resolve().parent.parent
NO_BROKER = (
    "no RabbitMQ for the tests: set COVEY_TEST_AMQP_URL, start one on localhost:5672 "
    "(apt-get install rabbitmq-server), or make Docker available"
)


# -- the broker and its administration ---------------------------------------------


class Admin(Protocol):
    def add_vhost(self, name: str, user: str) -> None: ...
    def delete_vhost(self, name: str) -> None: ...
    def close_connections(self, vhost: str) -> int: ...
    def queue_types(self, vhost: str) -> dict[str, str]: ...


class ManagementAdmin:
    """Vhosts through the management HTTP API (covey's own client for it, from
    `covey provision`): fast enough to give every test its own."""

    def __init__(self, base: str, user: str, password: str) -> None:
        # Deleting a vhost deletes its queues; a thousand quorum queues take a while.
        self.api = Management(base, user, password, timeout=600)

    def answers(self) -> bool:
        try:
            self.api.call("GET", "overview")
            return True
        except BrokerUnavailable:
            return False

    def add_vhost(self, name: str, user: str) -> None:
        self.api.call("PUT", f"vhosts/{quote(name, safe='')}", {})
        self.api.call(
            "PUT",
            f"permissions/{quote(name, safe='')}/{quote(user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def delete_vhost(self, name: str) -> None:
        self.api.call("DELETE", f"vhosts/{quote(name, safe='')}")

    def delete_users(self, prefix: str) -> None:
        """Remove every user whose name starts with `prefix` (a test's own)."""
        for user in self.api.call("GET", "users"):
            if user["name"].startswith(prefix):
                self.api.call("DELETE", f"users/{quote(user['name'], safe='')}")

    def close_connections(self, vhost: str) -> int:
        """Cut every client connection to `vhost`, as a network failure would."""
        connections = self.api.call("GET", f"vhosts/{quote(vhost, safe='')}/connections")
        for connection in connections:
            self.api.call("DELETE", f"connections/{quote(connection['name'], safe='')}")
        return len(connections)

    def queue_types(self, vhost: str) -> dict[str, str]:
        """Each queue of `vhost` by name: classic, quorum or stream."""
        queues = self.api.call("GET", f"queues/{quote(vhost, safe='')}?columns=name,type")
        return {queue["name"]: queue["type"] for queue in queues}


def system_rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)
    return done.stdout.decode()


class CtlAdmin:
    """Vhosts through rabbitmqctl, for a broker without the management plugin."""

    def __init__(self, ctl: Callable[..., str]) -> None:
        self._ctl = ctl

    def add_vhost(self, name: str, user: str) -> None:
        self._ctl("add_vhost", name)
        self._ctl("set_permissions", "-p", name, user, ".*", ".*", ".*")

    def delete_vhost(self, name: str) -> None:
        self._ctl("delete_vhost", name)

    def close_connections(self, vhost: str) -> int:
        self._ctl("close_all_connections", "-p", vhost, "cut by a covey test")
        return -1  # rabbitmqctl does not say how many

    def queue_types(self, vhost: str) -> dict[str, str]:
        listed = self._ctl("list_queues", "-q", "-p", vhost, "name", "type", "--formatter", "json")
        return {queue["name"]: queue["type"] for queue in json.loads(listed)}


@dataclass
class Broker:
    url: str  # of the default vhost
    admin: Admin

    def vhost_url(self, vhost: str) -> str:
        return str(URL(self.url).with_path("/" + vhost, encoded=False))


def _admin_for(url: str) -> Admin:
    parsed = URL(url)
    management = ManagementAdmin(
        f"http://{parsed.host}:15672", parsed.user or "guest", parsed.password or "guest"
    )
    if management.answers():
        return management
    if shutil.which("rabbitmqctl"):
        return CtlAdmin(system_rabbitmqctl)
    pytest.exit(f"cannot create vhosts on {parsed.host}: enable rabbitmq_management", 1)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    if url := os.environ.get("COVEY_TEST_AMQP_URL"):
        yield Broker(url, _admin_for(url))
        return
    if answers("127.0.0.1", 5672):
        url = "amqp://guest:guest@127.0.0.1:5672/"
        yield Broker(url, _admin_for(url))
        return
    with ExitStack() as stack:
        if LocalBroker.available():
            node = stack.enter_context(LocalBroker())
            yield Broker(node.url, CtlAdmin(node.ctl))
            return
        try:
            url = stack.enter_context(throwaway_broker())  # a testcontainer, where Docker works
        except Exception:
            pytest.exit(NO_BROKER, 1)
        yield Broker(url, _admin_for(url))


@pytest.fixture
def vhost(amqp_url: str) -> str:
    return URL(amqp_url).path.lstrip("/")


@pytest.fixture
def amqp_url(broker: Broker) -> Iterator[str]:
    """A vhost of this test's own, removed with everything in it afterwards."""
    name = f"covey-test-{uuid.uuid4().hex[:10]}"
    user = URL(broker.url).user or "guest"
    broker.admin.add_vhost(name, user)
    try:
        yield broker.vhost_url(name)
    finally:
        broker.admin.delete_vhost(name)


# -- a covey home with a small roster ------------------------------------------------

ROSTER = {
    "scout": 'teams = ["research"]\n',
    "writer": 'teams = ["research"]\n',
    "loner": "",
}


@dataclass
class World:
    """A covey home in a temporary folder, pointed at this test's vhost."""

    home: Path
    amqp_url: str
    state_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COVEY_")}
        env.update(
            COVEY_HOME=str(self.home),
            COVEY_AMQP_URL=self.amqp_url,
            COVEY_STATE_DIR=str(self.state_dir),
            **self.extra_env,
        )
        return env

    def covey(
        self,
        *args: str,
        input: str | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real `covey` command (in the home, with `self.env`, unless told otherwise)."""
        return subprocess.run(
            [*covey_command(), *args],
            env=self.env if env is None else env,
            cwd=cwd or self.home,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, **kwargs: Any) -> str:
        result = self.covey(*args, **kwargs)
        assert result.returncode == 0, f"covey {' '.join(args)}: {result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def open(self, identity: str | None = None) -> Covey:
        """The Python API, on the same home, broker and state."""
        return Covey.open(
            identity=identity,
            home=self.home,
            amqp_url=self.amqp_url,
            state_dir=self.state_dir,
        )

    def add_agent(self, name: str, toml: str = "") -> Path:
        folder = self.home / "agents" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "agent.toml").write_text(toml)
        (folder / "AGENT.md").write_text(f"# {name}\n")
        return folder


def start(world: World, *args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start the real `covey ARGS` in `world` in the background (errors kept to read;
    `stdout=subprocess.DEVNULL` for commands whose output nobody reads)."""
    return subprocess.Popen(
        [*covey_command(), *args],
        env=world.env,
        cwd=world.home,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def covey_command() -> list[str]:
    script = Path(sys.executable).parent / "covey"
    return [str(script)] if script.exists() else [sys.executable, "-m", "coordinator.cli"]


@pytest.fixture
def world(tmp_path: Path, amqp_url: str) -> World:
    home = tmp_path / "home"
    home.mkdir()
    (home / "covey.toml").write_text('identity = "human:ada"\n\n[humans.ada]\n')
    result = World(home=home, amqp_url=amqp_url, state_dir=tmp_path / "state")
    for name, toml in ROSTER.items():
        result.add_agent(name, toml)
    return result


@pytest.fixture
def applied(world: World) -> World:
    """A world whose topology has been applied."""
    world.ok("topology", "apply")
    return world


# -- looking at the broker with plain aio-pika (not covey) ------------------------------


class Raw:
    """Plain aio-pika on the test's vhost, to publish and inspect behind covey's back."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def publish(self, routing_key: str, body: bytes, exchange: str = "covey", **props: Any):
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            target = await channel.get_exchange(exchange, ensure=False)
            await target.publish(aio_pika.Message(body, **props), routing_key)

    async def count(self, queue: str) -> int:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0

    async def fail_deliveries(self, queue: str, times: int) -> None:
        """Be a consumer that fails on the message at the head of `queue` every time."""
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            source = await channel.declare_queue(queue, passive=True)
            for _ in range(times):
                await (await source.get(timeout=5)).reject(requeue=True)

    async def take_all(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Every message in `queue`, acked (so removed)."""
        connection = await aio_pika.connect(self.url)
        taken = []
        async with connection:
            channel = await connection.channel()
            source = await channel.declare_queue(queue, passive=True)
            while (message := await source.get(fail=False, timeout=5)) is not None:
                await message.ack()
                taken.append(message)
        return taken


@pytest.fixture
def raw(amqp_url: str) -> Raw:
    return Raw(amqp_url)


def run(coro: Any) -> Any:
    """Run a coroutine from a synchronous test."""
    return asyncio.run(coro)
