"""Issue 11: drains that overlap, and mailboxes that cannot be written.

Every test drives the real `covey inbox` command against the test's own vhost and
looks at the queue, covey.dead and the mailbox file behind covey's back.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import Raw, World, start
from faultkit import mailbox, send_all, stop

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
