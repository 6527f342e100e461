"""The inbox pattern under stress: junk, crashes between commit and ack, poison, expiry."""

import json
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import aio_pika
from conftest import Raw, World
from yarl import URL

from coordinator.envelope import Envelope
from coordinator.mailbox import MailStore

CRASH_AFTER_COMMIT = """
import os, signal, sys
from aio_pika.message import IncomingMessage

async def crash(self, multiple=False):
    # The mailbox has committed; the broker has not seen the ack. Die right here.
    os.kill(os.getpid(), signal.SIGKILL)

IncomingMessage.ack = crash
from coordinator.cli import main
sys.exit(main(["inbox", "--as", "scout"]))
"""


async def test_junk_is_dead_lettered_with_a_reason_and_mail_behind_it_still_arrives(
    applied: World, raw: Raw
) -> None:
    await raw.publish("agent.scout", b"\x00\xff not json at all")
    await raw.publish("agent.scout", b'{"id": "x1"}', type="covey.message.v1")
    await raw.publish("agent.scout", b"{}", type="something.else")
    applied.ok("send", "scout", "valid, behind the junk")

    inbox = applied.json("inbox", "--as", "scout")

    assert [m["subject"] for m in inbox] == ["valid, behind the junk"]
    assert await raw.count("agent.scout") == 0
    dead = await raw.take_all("covey.dead")
    assert len(dead) == 3
    for letter in dead:
        assert letter.headers["x-covey-reason"] == "invalid"
        assert letter.headers["x-covey-queue"] == "agent.scout"
        assert letter.headers["x-covey-detail"]
        assert letter.routing_key == "agent.scout"  # so it can be replayed to its recipient
    details = sorted(str(letter.headers["x-covey-detail"]) for letter in dead)
    assert any("type property is None" in d for d in details)
    assert any("sender: Field required" in d for d in details)
    assert any("something.else" in d for d in details)
    assert {bytes(letter.body) for letter in dead} >= {b"\x00\xff not json at all"}


async def test_a_crash_between_commit_and_ack_leaves_no_duplicate(applied: World, raw: Raw) -> None:
    sent = [applied.ok("send", "scout", f"message {n}").strip() for n in range(3)]

    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_COMMIT],
        env=applied.env,
        capture_output=True,
        timeout=60,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # The broker never saw the ack, so all three are waiting again ...
    assert await raw.count("agent.scout") == 3
    # ... while the mailbox already committed them.
    inbox = applied.json("inbox", "--as", "scout")
    assert [m["id"] for m in inbox] == sent
    assert await raw.count("agent.scout") == 0
    assert [m["id"] for m in applied.json("inbox", "--as", "scout")] == sent


async def test_a_message_that_keeps_failing_is_dead_lettered_at_the_delivery_limit(
    world: World, raw: Raw
) -> None:
    world.extra_env["COVEY_DELIVERY_LIMIT"] = "2"
    world.ok("topology", "apply")
    poison = world.ok("send", "scout", "poison").strip()
    connection = await aio_pika.connect(world.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("agent.scout", passive=True)
        for _ in range(3):  # a consumer that fails on it every time
            message = await queue.get(timeout=5)
            await message.reject(requeue=True)
    world.ok("send", "scout", "fine")

    assert [m["subject"] for m in world.json("inbox", "--as", "scout")] == ["fine"]
    (letter,) = await raw.take_all("covey.dead")
    assert letter.message_id == poison
    assert letter.headers["x-first-death-reason"] == "delivery_limit"


async def test_expired_mail_is_dead_lettered_not_delivered(applied: World, raw: Raw) -> None:
    async with applied.open("human:ada") as ada:
        await ada.send("scout", "stale soon", expires_in=timedelta(milliseconds=1))
        await ada.send("scout", "fresh")
    assert [m["subject"] for m in applied.json("inbox", "--as", "scout")] == ["fresh"]
    dead = await raw.take_all("covey.dead")
    assert [json.loads(d.body)["subject"] for d in dead] == ["stale soon"]
    reason = dead[0].headers.get("x-first-death-reason") or dead[0].headers.get("x-covey-reason")
    assert reason == "expired"


def test_the_store_drops_a_duplicate_id(tmp_path: Path) -> None:
    store = MailStore(tmp_path / "m.sqlite3")
    envelope = Envelope.new(sender="human:ada", recipient="scout", subject="once")
    assert store.add([envelope]) == [envelope]
    assert store.add([envelope]) == []
    assert [m.envelope.id for m in store.list()] == [envelope.id]
    store.close()


async def test_a_drain_hands_nothing_back_so_delivery_counts_do_not_grow(
    applied: World, raw: Raw
) -> None:
    async with applied.open("human:ada") as ada:
        for n in range(50):
            await ada.send("scout", f"bulk {n}")
    async with applied.open("agent:scout") as scout:
        new = await scout.drain()
    assert len(new) == 50
    assert await raw.count("agent.scout") == 0
    # Nothing was requeued, so nothing reached covey.dead through the delivery limit.
    assert await raw.count("covey.dead") == 0


def test_read_and_done_work_without_a_broker_and_without_importing_aio_pika(
    applied: World,
) -> None:
    applied.ok("send", "scout", "offline later")
    (mail,) = applied.json("inbox", "--as", "scout")
    env = applied.env
    # Same vhost (so the same mailbox), but nothing listens on that port.
    env["COVEY_AMQP_URL"] = str(URL(applied.amqp_url).with_port(1))
    probe = (
        "import sys\nfrom coordinator.cli import main\n"
        f"code = main(['read', '{mail['id']}', '--as', 'scout'])\n"
        f"code |= main(['done', '{mail['id']}', '--as', 'scout'])\n"
        "assert 'aio_pika' not in sys.modules, 'aio_pika was imported'\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "offline later" in result.stdout
