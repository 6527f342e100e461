"""A lock is a lease with a fencing token: a stalled holder never runs beside the next one.

The broker frees the lock of a holder it stops hearing from (~10-15 s), but a
holder that is only frozen (SIGSTOP here; a VM pause or a long stall in life)
does not know, and its agent runs on in a process group of its own. These tests
freeze the real `covey run` (and `covey supervise`), let another run take the
lock, and check from what every agent wrote, with timestamps, that no two ever
ran at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from conftest import Raw, World, run, start
from test_run import running, wait_for

from coordinator.lock import TAKEOVER_SECONDS

# Writes `start`, then `alive` every 0.1 s for as many seconds as its seconds file says
# when it starts, then `end`, to a log shared by every run; all with time.time(), since
# every agent here runs on one machine. It also starts a grandchild in its process group.
AGENT = """
import os, subprocess, sys, time
log, seconds_file = sys.argv[1], sys.argv[2]
seconds = float(open(seconds_file).read())
child = subprocess.Popen(["sleep", "300"])
def say(*words):
    with open(log, "a") as f:
        f.write(" ".join(str(w) for w in words) + "\\n")
token = os.environ.get("COVEY_FENCING_TOKEN", "0")
say("start", os.getpid(), time.time(), token, child.pid, os.environ.get("COVEY_FENCING_TOKENS"))
until = time.monotonic() + seconds
while time.monotonic() < until:
    time.sleep(0.1)
    say("alive", os.getpid(), time.time())
child.kill()
say("end", os.getpid(), time.time())
"""


@dataclass
class Span:
    pid: int
    start: float
    token: int
    grandchild: int
    tokens: str
    alive: list[float] = field(default_factory=list)
    end: float | None = None

    @property
    def last(self) -> float:
        """The last moment this agent was seen working."""
        return max([self.start, *self.alive, *([self.end] if self.end else [])])


def spans(log: Path) -> list[Span]:
    """Every agent's run, in the order they started."""
    found: dict[int, Span] = {}
    for line in log.read_text().splitlines():
        what, pid, at, *rest = line.split()
        if what == "start":
            found[int(pid)] = Span(int(pid), float(at), int(rest[0]), int(rest[1]), rest[2])
        elif what == "alive":
            found[int(pid)].alive.append(float(at))
        elif what == "end":
            found[int(pid)].end = float(at)
    return sorted(found.values(), key=lambda s: s.start)


def worker(world: World) -> tuple[Path, Path]:
    """The agent `worker`; returns its log and the file that says how long it works."""
    script = world.home / "lease_agent.py"
    script.write_text(AGENT)
    log, seconds = world.home / "lease.log", world.home / "seconds"
    seconds.write_text("40")
    world.add_agent("worker", f'command = ["python3", "{script}", "{log}", "{seconds}"]\n')
    return log, seconds


def started(log: Path, count: int) -> bool:
    return log.exists() and len([s for s in spans(log) if s.start]) >= count


def take_over(world: World, frozen_at: float) -> subprocess.CompletedProcess[str]:
    """`covey run worker --skip-if-busy` until it is not busy; within a minute."""
    while True:
        result = world.covey("run", "worker", "--skip-if-busy", timeout=90)
        if result.returncode != 5:
            return result
        assert time.monotonic() - frozen_at < 60, "the lock was still held a minute later"
        time.sleep(0.2)


def worker_runs(world: World) -> list[dict[str, Any]]:
    """The worker's runs, oldest first, but for the tries that found the lock busy."""
    runs = world.json("runs", "worker", "--limit", "500")
    return [r for r in runs if r["outcome"] != "skipped:busy"]


def no_overlap(log: Path, frozen: float) -> tuple[Span, Span]:
    """The first agent did nothing after the second started; returns both. (`frozen`:
    time.time() of the freeze, for the figures `pytest -s` shows.)"""
    first, second, *_ = spans(log)
    print(
        f"after the freeze: first agent last seen at {first.last - frozen:.1f} s, "
        f"second agent started at {second.start - frozen:.1f} s"
    )
    assert first.last < second.start, (
        f"the stalled holder's agent worked {first.last - second.start:.2f} s into the next run"
    )
    assert first.end is None  # it was stopped, not left to finish
    assert second.token > first.token
    return first, second


def group_gone(span: Span) -> bool:
    return not running(span.pid) and not running(span.grandchild)


@contextlib.contextmanager
def cleanup(*processes: subprocess.Popen[str]):  # type: ignore[no-untyped-def]
    """Whatever happens, leave nothing frozen or running behind."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                    process.kill()
                process.communicate(timeout=30)


@pytest.mark.slow
def test_a_stalled_covey_run_never_runs_beside_the_next_holder(applied: World) -> None:
    log, seconds = worker(applied)
    first = start(applied, "run", "worker")
    with cleanup(first):
        wait_for(lambda: started(log, 1))
        seconds.write_text("0.5")
        os.kill(first.pid, signal.SIGSTOP)
        frozen_at, frozen = time.monotonic(), time.time()
        second = take_over(applied, frozen_at)
        assert second.returncode == 0, second.stdout + second.stderr
        earlier, later = no_overlap(log, frozen)
        assert later.end is not None
        # The stalled run, woken, knows it lost the lock, and says so.
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 8, out + err
        assert "lock-lost" in out
        assert group_gone(earlier)
    lost, ok = worker_runs(applied)
    assert lost["outcome"] == "lock-lost"
    assert (lost["fencing_token"], ok["fencing_token"]) == (earlier.token, later.token)
    assert ok["lease_wait_seconds"] >= TAKEOVER_SECONDS - 1
    assert later.tokens == f"agent.worker={later.token},global={later.token}"


@pytest.mark.slow
def test_a_stalled_supervisor_never_runs_beside_the_next_holder(applied: World) -> None:
    log, seconds = worker(applied)
    supervisor = start(applied, "supervise", "--no-metrics", stdout=subprocess.DEVNULL)
    with cleanup(supervisor):
        # The request is refused until the supervisor listens for requests.
        wait_for(lambda: applied.covey("run", "worker", "--via-supervisor").returncode == 0)
        wait_for(lambda: started(log, 1))
        seconds.write_text("0.5")
        os.kill(supervisor.pid, signal.SIGSTOP)
        frozen_at, frozen = time.monotonic(), time.time()
        second = take_over(applied, frozen_at)
        assert second.returncode == 0, second.stdout + second.stderr
        earlier, _ = no_overlap(log, frozen)
        os.kill(supervisor.pid, signal.SIGCONT)
        wait_for(lambda: worker_runs(applied)[0]["outcome"] != "running", timeout=30)
        assert worker_runs(applied)[0]["outcome"] == "lock-lost"
        assert group_gone(earlier)
        supervisor.send_signal(signal.SIGTERM)
        _, err = supervisor.communicate(timeout=60)
        assert supervisor.returncode == 0, err


async def listen(url: str, queue: str, key: str) -> None:
    """A queue of our own that keeps the control events matching `key`."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        await declared.bind("covey.events", key)


def test_a_clean_release_lets_the_next_holder_start_at_once(applied: World, raw: Raw) -> None:
    log, seconds = worker(applied)
    seconds.write_text("0")
    run(listen(applied.amqp_url, "test.acquired", "lock.acquired.#"))
    applied.ok("run", "worker")
    asked = time.time()
    applied.ok("run", "worker")
    first, second = spans(log)
    assert second.start - asked < TAKEOVER_SECONDS - 2  # no lease was waited out
    assert (first.token, second.token) == (1, 2)  # a fresh namespace counts from 1
    runs = worker_runs(applied)
    assert [r["lease_wait_seconds"] for r in runs] == [None, None]
    assert [r["fencing_token"] for r in runs] == [first.token, second.token]
    acquired = [json.loads(m.body) for m in run(raw.take_all("test.acquired"))]
    assert [(e["lock"], e["fencing_token"]) for e in acquired] == [
        ("agent.worker", first.token),
        ("global", first.token),
        ("agent.worker", second.token),
        ("global", second.token),
    ]
    assert not any(e.get("takeover") for e in acquired)


@pytest.mark.slow
def test_the_guard_stops_the_agents_group_when_covey_run_is_killed(applied: World) -> None:
    log, seconds = worker(applied)
    victim = start(applied, "run", "worker")
    with cleanup(victim):
        wait_for(lambda: started(log, 1))
        (agent,) = spans(log)
        assert running(agent.grandchild)
        victim.kill()  # SIGKILL: no release, no goodbye; the kernel kills only the agent
        victim.communicate(timeout=30)
        wait_for(lambda: group_gone(agent), timeout=5)  # its grandchild too
    # Freed without a clean release: the next holder waits out the lease first.
    seconds.write_text("0")
    applied.ok("run", "worker")
    _, after = worker_runs(applied)
    assert after["lease_wait_seconds"] >= TAKEOVER_SECONDS - 1
