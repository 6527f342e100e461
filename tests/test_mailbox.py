"""The inbox pattern under stress: junk, crashes between commit and ack, poison, expiry."""

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import aio_pika
import pytest
from conftest import Broker, Raw, World, covey_command
from yarl import URL

from coordinator.envelope import Envelope
from coordinator.errors import BadInput
from coordinator.mailbox import MailStatus, MailStore, store_path

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
    await raw.publish("agent.scout", b'{"id": "x1-junk"}', type="covey.message.v1")
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
    # ... while the mailbox had already committed the first batch, before the ack.
    async with applied.open("agent:scout") as scout:
        committed = [m.envelope.id for m in scout.store.messages()]
        assert committed and committed == sent[: len(committed)]
        # The redeliveries of what it holds are recognised, not new; the rest is.
        assert [e.id for e in await scout.drain()] == sent[len(committed) :]
    inbox = applied.json("inbox", "--as", "scout")
    assert [m["id"] for m in inbox] == sent
    assert await raw.count("agent.scout") == 0
    assert [m["id"] for m in applied.json("inbox", "--as", "scout")] == sent


async def test_a_mailbox_locked_by_another_process_leaves_mail_with_the_broker(
    applied: World, raw: Raw
) -> None:
    applied.ok("send", "scout", "waits")
    path = store_path(applied.state_dir, applied.amqp_url, "agent:scout")
    MailStore(path).close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # injected: another writer holds the lock
        result = applied.covey("inbox", "--as", "scout", timeout=60)
        other.execute("ROLLBACK")
    assert result.returncode == 1, result.stderr
    assert "stayed locked by another process" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert await raw.count("agent.scout") == 1  # not taken, so not handed back either
    assert [m["subject"] for m in applied.json("inbox", "--as", "scout")] == ["waits"]


async def test_a_message_that_keeps_failing_is_dead_lettered_at_the_delivery_limit(
    world: World, raw: Raw
) -> None:
    world.extra_env["COVEY_DELIVERY_LIMIT"] = "2"
    world.ok("topology", "apply")
    poison = world.ok("send", "scout", "poison").strip()
    await raw.fail_deliveries("agent.scout", times=3)
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
    assert [mail.envelope for mail in store.add([envelope])] == [envelope]
    assert store.add([envelope]) == []
    assert [m.envelope.id for m in store.messages()] == [envelope.id]
    store.close()


def _found(store: MailStore, text: str) -> list[str]:
    return [mail.subject for mail in store.search(text)]


def test_search_finds_each_message_once_wherever_the_index_was_left(tmp_path: Path) -> None:
    """Filing does not index (a drain's commit is the mail's, not the search's): a search
    first brings the index up to what the file holds, and two searches at once (two
    processes' connections) both find everything, each message once."""
    path = tmp_path / "m.sqlite3"
    store, other = MailStore(path), MailStore(path)
    store.add([Envelope.new(sender="human:ada", recipient="x", subject=f"old {n}") for n in "ab"])
    assert _found(store, "old") == ["old a", "old b"]
    store.add([Envelope.new(sender="human:ada", recipient="x", subject=f"new {n}") for n in "cd"])
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda s: _found(s, "new"), [store, other]))
    assert both == [["new c", "new d"]] * 2
    assert _found(other, "old") == ["old a", "old b"]
    assert _found(store, "ada") == ["old a", "old b", "new c", "new d"]  # by sender too
    store.close()
    other.close()


# A mailbox as covey 0.1.0 made it: every message indexed as it was filed, by a trigger.
SCHEMA_V1 = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, sender TEXT NOT NULL,
    recipient TEXT NOT NULL, subject TEXT NOT NULL, body TEXT NOT NULL, thread TEXT NOT NULL,
    in_reply_to TEXT, created_at TEXT NOT NULL, expires_at TEXT, received_at TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'unread' CHECK (status IN ('unread', 'read', 'done'))
);
CREATE INDEX messages_status ON messages (status, created_at);
CREATE VIRTUAL TABLE messages_fts
    USING fts5(subject, body, sender, content='messages', content_rowid='seq');
CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, subject, body, sender)
    VALUES (new.seq, new.subject, new.body, new.sender);
END;
CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, subject, body, sender)
    VALUES ('delete', old.seq, old.subject, old.body, old.sender);
END;
INSERT INTO messages (id, sender, recipient, subject, body, thread, created_at, received_at)
VALUES ('v1a', 'human:ada', 'agent:x', 'kept from v1', 'b', 't', '2026-01-01T00:00:00+00:00',
        '2026-01-01T00:00:00+00:00');
PRAGMA user_version = 1;
"""


def test_a_mailbox_of_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA_V1)
    store = MailStore(path)
    store.add([Envelope.new(sender="human:ada", recipient="x", subject="kept since")])
    assert _found(store, "kept") == ["kept from v1", "kept since"]
    assert _found(store, "kept") == ["kept from v1", "kept since"]
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")
    store.close()


def test_ids_resolve_from_unique_prefixes_only(tmp_path: Path) -> None:
    store = MailStore(tmp_path / "m.sqlite3")
    for suffix in ("1111", "2222"):
        store.add(
            [Envelope.new(id=f"abcd{suffix}", sender="human:ada", recipient="x", subject="s")]
        )
    assert store.resolve("abcd1") == "abcd1111"
    with pytest.raises(BadInput, match="ambiguous"):
        store.resolve("abcd")
    with pytest.raises(BadInput, match="too short"):
        store.resolve("abc")
    store.close()


async def test_a_message_reusing_another_ones_id_is_dead_lettered_not_dropped(
    applied: World, raw: Raw
) -> None:
    original = applied.ok("send", "scout", "the real one").strip()
    applied.json("inbox", "--as", "scout")
    forged = Envelope.new(id=original, sender="human:ada", recipient="scout", subject="impostor")
    await raw.publish("agent.scout", forged.to_json(), type="covey.message.v1", message_id=original)
    assert [m["subject"] for m in applied.json("inbox", "--as", "scout")] == ["the real one"]
    (letter,) = await raw.take_all("covey.dead")
    assert "already another message's" in letter.headers["x-covey-detail"]


async def test_losing_the_broker_mid_wait_is_exit_4_at_once(
    applied: World, broker: Broker, vhost: str
) -> None:
    waiting = subprocess.Popen(
        [*covey_command(), "wait", "--as", "scout", "--timeout", "60"],
        env=applied.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while waiting.poll() is None and time.monotonic() < deadline:
        broker.admin.close_connections(vhost)  # until the stats have seen it
        time.sleep(0.5)
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 4, err
    assert "lost RabbitMQ" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() < deadline


def watch_deliveries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, object]]:
    """Record (redelivered, x-delivery-count) of every delivery the mailbox parses."""
    seen: list[tuple[bool, object]] = []
    parse = Envelope.from_delivery.__func__  # type: ignore[attr-defined]

    def watching(cls: type[Envelope], message: aio_pika.abc.AbstractIncomingMessage) -> Envelope:
        seen.append((message.redelivered, (message.headers or {}).get("x-delivery-count")))
        return parse(cls, message)

    monkeypatch.setattr(Envelope, "from_delivery", classmethod(watching))
    return seen


async def test_draining_while_mail_pours_in_hands_nothing_back(
    applied: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery handed back to the queue counts towards the delivery limit; a drain
    racing a sender must never cause one."""
    seen = watch_deliveries(monkeypatch)
    total = 400

    async def pour() -> None:
        async with applied.open("human:ada") as ada:
            for n in range(total):
                await ada.send("scout", f"m{n}")

    async with applied.open("agent:scout") as scout:
        sender = asyncio.create_task(pour())
        while not sender.done():
            await scout.drain()
        await sender
        await scout.drain()
        assert len(scout.store.messages()) == total
    assert len(seen) == total
    assert all(not redelivered and count is None for redelivered, count in seen), [
        s for s in seen if s[0] or s[1] is not None
    ][:5]


async def test_waiting_while_mail_pours_in_files_each_message_once(
    applied: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wait` keeps a consumer between calls and files mail as it arrives. Closing the
    handle mid-stream may hand back what the broker sent after the cancel (a quorum
    queue may), but only that, once: nothing is lost, shown twice or dead-lettered."""
    seen = watch_deliveries(monkeypatch)
    total, got = 400, set()
    async with applied.open("human:ada") as ada:
        async with applied.open("agent:scout") as scout:
            for n in range(total):
                await ada.send("scout", f"m{n}")
                if n % 50 == 0:  # waits interleaved with the stream
                    got |= {m.envelope.id for m in await scout.wait(timeout=5)}
        # Closed mid-stream; a new handle finds the rest, each once.
        async with applied.open("agent:scout") as scout:
            while len(scout.store.messages()) < total:
                assert await scout.wait(timeout=10), "mail went missing"
            assert len({m.envelope.id for m in scout.store.messages()}) == total
    assert len(got) >= 1
    handed_back = [count for redelivered, count in seen if redelivered]
    assert len(seen) == total + len(handed_back)
    assert all(count in (None, 1) for count in handed_back), handed_back


async def test_what_wait_returns_is_the_mail_as_the_store_holds_it(applied: World) -> None:
    """`wait` hands back what its consumer filed without reading the store again: it
    must be the same mail, status, received time and every field, as the store's."""
    async with applied.open("human:ada") as ada, applied.open("agent:scout") as scout:
        assert await scout.wait(timeout=0.1) == []  # the consumer is up
        sent = [await ada.send("scout", f"m{n}", f"body {n}") for n in range(3)]
        got: list = []
        while len(got) < len(sent):
            got += await scout.wait(timeout=10)
        stored = {m.envelope.id: m.to_dict(with_body=True) for m in scout.store.messages()}
        assert [m.to_dict(with_body=True) for m in got] == [stored[e.id] for e in sent]
        assert {m.status for m in got} == {MailStatus.UNREAD}


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
