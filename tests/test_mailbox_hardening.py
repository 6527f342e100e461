"""Issue 11: drains that overlap, and mailboxes that cannot be written.

Every test drives the real `covey inbox` command against the test's own vhost and
looks at the queue, covey.dead and the mailbox file behind covey's back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Raw, World, start
from faultkit import mailbox, send_all, stop

from coordinator.mailbox import store_path

DRAIN_BOUND = 60.0  # seconds; a drain of 1,500 takes a few, a hung one never returns


@pytest.mark.parametrize(("queued", "drains"), [(1500, 3), (600, 2)])
async def test_overlapping_drains_of_one_mailbox_all_return_and_file_each_message_once(
    applied: World, raw: Raw, queued: int, drains: int
) -> None:
    """Injected: `queued` messages wait for scout; `drains` `covey inbox --as scout`
    start at once. Before the fix a round after another drain had emptied the queue
    waited for a first delivery without a bound, so the command never returned.

    Asserted: each command exits 0 within DRAIN_BOUND; the mailbox holds every
    message once; the queue is empty; nothing went to covey.dead."""
    async with applied.open("human:ada") as ada:
        sent = await send_all(ada, "scout", [f"m{n}" for n in range(queued)])
    assert await raw.count("agent.scout") == queued

    processes = [
        start(applied, "inbox", "--as", "scout", "--json", stdout=subprocess.DEVNULL)
        for _ in range(drains)
    ]
    began = time.monotonic()
    codes: list[int | None] = []
    errors: list[str] = []
    try:
        for process in processes:
            left = max(0.1, DRAIN_BOUND - (time.monotonic() - began))
            try:
                _, err = process.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                codes.append(None)  # hung
                continue
            codes.append(process.returncode)
            errors.append(err)
    finally:
        for process in processes:
            stop(process)

    hung = f"None: still running after {DRAIN_BOUND} s; {errors}"
    assert codes == [0] * drains, hung
    ids = [m.envelope.id for m in mailbox(applied.state_dir, applied.amqp_url, "scout")]
    assert len(ids) == len(set(ids)) == queued
    assert set(ids) == set(sent)
    assert await raw.count("agent.scout") == 0
    assert await raw.count("covey.dead") == 0


# Opens a mailbox file at a given instant, as a drain does on its first use.
OPEN_AT = """
import pathlib, sys, time
from coordinator.mailbox import MailStore
at = float(sys.argv[2])
while time.time() < at:
    pass
MailStore(pathlib.Path(sys.argv[1])).check_writable()
"""


def test_a_new_mailbox_opened_by_several_processes_at_once_opens_in_each(
    tmp_path: Path,
) -> None:
    """Injected: 30 times, 4 processes open the same new mailbox file at the same
    instant (two drains on a participant's first use). Before the fix SQLite refused
    one of them now and then ("database is locked", at once: turning a new file to
    WAL does not wait), about one open in 60. Asserted: every open succeeds."""
    failures = []
    for attempt in range(30):
        path = tmp_path / str(attempt) / "m.sqlite3"
        at = str(time.time() + 0.5)  # all started and imported by then
        openers = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_AT, str(path), at],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        for opener in openers:
            _, err = opener.communicate(timeout=60)
            if opener.returncode != 0:
                failures.append(err.strip().splitlines()[-1])
    assert failures == []


# -- item 5: a mailbox that cannot be written --------------------------------------------

DELIVERY_LIMIT = 10
FAILED_RUNS = DELIVERY_LIMIT + 2  # a cron job keeps trying: more runs than the limit allows


def scout_store(world: World) -> Path:
    return store_path(world.state_dir, world.amqp_url, "agent:scout")


def limited(world: World, **env: str) -> World:
    """`world` with delivery_limit=10 on scout's queue (and `env`), topology applied."""
    world.extra_env.update(COVEY_DELIVERY_LIMIT=str(DELIVERY_LIMIT), **env)
    world.ok("topology", "apply")
    world.ok("inbox", "--as", "scout")  # scout's mailbox file exists, empty
    return world


async def fail_to_drain(
    world: World, raw: Raw, waiting: int, *words: str, runs: int = FAILED_RUNS
) -> None:
    """Run `covey inbox --as scout` `runs` times; each must refuse with exit 2 and one
    line holding `words` and the mailbox's path, and leave all `waiting` messages
    with the broker."""
    for _ in range(runs):
        result = world.covey("inbox", "--as", "scout", timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert str(scout_store(world)) in lines[0], lines[0]
        for word in words:
            assert word in lines[0], lines[0]
        assert await raw.count("agent.scout") == waiting


async def arrives_in_full(world: World, raw: Raw, sent: list[str]) -> None:
    """Once the mailbox is fixed, one drain files every message once; none is dead."""
    ids = [m["id"] for m in world.json("inbox", "--as", "scout", "--all")]
    assert sorted(ids) == sorted(sent)
    assert await raw.count("agent.scout") == 0
    assert await raw.count("covey.dead") == 0


async def test_an_immutable_mailbox_costs_no_delivery_and_its_mail_arrives_once_fixed(
    world: World, raw: Raw
) -> None:
    """Injected: scout's mailbox file made immutable (chattr +i); 12 drains (the limit
    is 10). Asserted: each exits 2 with one line, takes nothing; after chattr -i all
    mail arrives and covey.dead is empty (no drain spent a delivery)."""
    limited(world)
    async with world.open("human:ada") as ada:
        sent = await send_all(ada, "scout", [f"m{n}" for n in range(20)])
    path = scout_store(world)
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        await fail_to_drain(world, raw, len(sent), "read-only")
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    await arrives_in_full(world, raw, sent)


async def test_search_of_a_mailbox_made_read_only_since_mail_came_is_one_line(
    world: World, raw: Raw
) -> None:
    """Filing leaves the search index to the next search, which must write it. Injected:
    mail filed, then scout's mailbox made immutable before any search. Asserted: `covey
    search` exits 2 with one line naming the file and "read-only" (no traceback); once
    writable again, the same search finds the mail."""
    limited(world)
    world.ok("send", "scout", "needle in the haystack")
    assert [m["subject"] for m in world.json("inbox", "--as", "scout")] == [
        "needle in the haystack"
    ]
    path = scout_store(world)
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        result = world.covey("search", "--as", "scout", "needle", timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "read-only" in lines[0] and str(path) in lines[0], result.stderr
    found = world.json("search", "--as", "scout", "needle")
    assert [m["subject"] for m in found] == ["needle in the haystack"]


async def test_a_corrupt_mailbox_costs_no_delivery_and_mail_arrives_once_moved_aside(
    world: World, raw: Raw
) -> None:
    """Injected: a real mailbox of 300 messages whose interior pages are overwritten with
    junk; 12 drains. Asserted: each exits 2 with one line saying corrupt, takes
    nothing; once the file is moved aside (what the line says to do) all new mail
    arrives and covey.dead is empty."""
    limited(world)
    async with world.open("human:ada") as ada:
        await send_all(ada, "scout", [f"old {n}" for n in range(300)], body="words " * 200)
        world.ok("inbox", "--as", "scout")
        sent = await send_all(ada, "scout", [f"new {n}" for n in range(20)])
    path = scout_store(world)
    assert not path.with_name(path.name + "-wal").exists()  # all of it in the file
    pages = path.stat().st_size // PAGE
    with path.open("r+b") as file:
        for page in range(pages // 4, pages):  # the first quarter (and the schema) intact
            file.seek(page * PAGE)
            file.write(os.urandom(PAGE))
    await fail_to_drain(world, raw, len(sent), "corrupt", "move it aside")
    path.rename(path.with_name(path.name + ".corrupt"))
    await arrives_in_full(world, raw, sent)


PAGE = 4096  # SQLite's default page size


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A small filesystem of its own mounted at `folder` (root only), for filling up."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its device is full; return it."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
                file.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return filler


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root: run this test as root (CI does)")


async def test_a_full_disk_is_refused_before_taking_and_mail_arrives_once_space_is_free(
    world: World, raw: Raw
) -> None:
    """Injected: the state folder on an 8 MiB tmpfs, filled up (6 drains), then with
    512 KiB free, not enough for one message at its worst case (6 more). Asserted:
    each drain exits 2 with one line saying no space, takes nothing; once the filler
    is gone all mail arrives and covey.dead is empty."""
    needs_root()
    with tmpfs(world.state_dir, "8m"):
        limited(world, COVEY_MAX_BODY_BYTES="65536")  # at worst 528 KiB a message
        async with world.open("human:ada") as ada:
            sent = await send_all(ada, "scout", [f"m{n}" for n in range(20)], body="x" * 1000)
        filler = fill(world.state_dir)
        await fail_to_drain(world, raw, len(sent), "no space left", runs=FAILED_RUNS // 2)
        with filler.open("r+b") as file:
            file.truncate(filler.stat().st_size - 512 * 1024)
        await fail_to_drain(world, raw, len(sent), "no space left", runs=FAILED_RUNS // 2)
        filler.unlink()
        await arrives_in_full(world, raw, sent)


# The drain of `covey inbox --as scout`, with the disk filled by "someone else" right
# before its second commit: after the checks passed and deliveries were taken.
FILL_MID_DRAIN = """
import sys
from pathlib import Path
from coordinator.mailbox import MailStore
from coordinator.cli import main

add, calls = MailStore.add, []

def filling_add(self, envelopes):
    calls.append(len(envelopes))
    if len(calls) == 2:
        with (Path(sys.argv[1]) / "filler").open("wb", buffering=0) as file:
            try:
                while True:
                    file.write(bytes(4096))
                    file.flush()
            except OSError:
                pass
    return add(self, envelopes)

MailStore.add = filling_add
sys.exit(main(["inbox", "--as", "scout"]))
"""


async def test_a_disk_filling_up_mid_drain_stops_at_the_first_error_and_loses_nothing(
    world: World, raw: Raw
) -> None:
    """Injected: 300 messages; the state folder on a 32 MiB tmpfs that another writer
    fills up after the drain's first commit. Asserted: the drain stops at the first
    error (exit 2, one line, no space), what it filed stays filed and acked, the rest
    is back with the broker, nothing is dead; once space is free every message
    arrives once."""
    needs_root()
    with tmpfs(world.state_dir, "32m"):
        limited(world, COVEY_MAX_BODY_BYTES="2048")
        async with world.open("human:ada") as ada:
            sent = await send_all(ada, "scout", [f"m{n}" for n in range(300)], body="y" * 1000)
        result = subprocess.run(
            [sys.executable, "-c", FILL_MID_DRAIN, str(world.state_dir)],
            env=world.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no space left" in lines[0], result.stderr
        filed = mailbox(world.state_dir, world.amqp_url, "scout")
        assert 0 < len(filed) < len(sent)  # the first commit, and nothing after the error
        assert await raw.count("agent.scout") == len(sent) - len(filed)
        assert await raw.count("covey.dead") == 0
        (world.state_dir / "filler").unlink()
        await arrives_in_full(world, raw, sent)
