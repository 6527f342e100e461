"""`covey supervise`, the daemon: cron, wake on mail, requests, SIGTERM and SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import World, start
from test_run import intervals, most_at_once, stamping_agent, wait_for

from coordinator.localbroker import free_port


def starts(log: Path, agent: str | None = None) -> list[float]:
    if not log.exists():
        return []
    return [
        float(at)
        for what, who, at in (line.split() for line in log.read_text().splitlines())
        if what == "start" and agent in (None, who)
    ]


@pytest.fixture
def daemon(applied: World):  # type: ignore[no-untyped-def]
    """Start `covey supervise` on demand; stopped (and checked to stop) after the test."""
    started: list[subprocess.Popen[str]] = []

    def launch() -> subprocess.Popen[str]:
        process = start(applied, "supervise", "--metrics-port", str(free_port()))
        started.append(process)
        return process

    yield launch
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)


def test_a_cron_schedule_fires_and_never_overlaps_a_running_run(applied: World, daemon) -> None:  # type: ignore[no-untyped-def]
    log = stamping_agent(applied, "ticker", 1.5, 'schedule = "* * * * * */1"')
    supervisor = daemon()
    wait_for(lambda: len(starts(log)) >= 3, timeout=30)
    supervisor.send_signal(signal.SIGTERM)
    _, err = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, err
    assert "schedule fired" in err
    # Every line logged during a run names the agent and the run, so logs join metrics.
    run_lines = [line for line in err.splitlines() if "started" in line or "finished" in line]
    assert run_lines and all("agent=ticker" in line and "run_id=" in line for line in run_lines)
    assert most_at_once(_all_spans(log)) == 1  # a tick during a run is skipped, not stacked


def _all_spans(log: Path) -> list[tuple[float, float]]:
    lines = [line.split() for line in log.read_text().splitlines()]
    begun = [float(at) for what, _, at in lines if what == "start"]
    ended = [float(at) for what, _, at in lines if what == "end"]
    return list(zip(begun, ended, strict=False))


def test_wake_on_mail_starts_one_run_for_a_burst(applied: World, daemon) -> None:  # type: ignore[no-untyped-def]
    log = applied.home / "wakes.log"
    applied.add_agent(
        "sleeper",
        "wake_on_mail = true\n"
        f'command = "echo start sleeper $(date +%s.%N) >> {log}; covey inbox; sleep 1"\n',
    )
    supervisor = daemon()
    time.sleep(2)  # let it bind its wake-up queue
    sent_at = time.time()
    burst = subprocess.run(
        [
            sys.executable,
            "-c",
            "import asyncio\n"
            "from coordinator.client import Covey\n"
            "async def main():\n"
            "    async with Covey.open(identity='human:ada') as ada:\n"
            "        for n in range(10):\n"
            "            await ada.send('sleeper', f'burst {n}')\n"
            "asyncio.run(main())\n",
        ],
        env=applied.env,
        cwd=applied.home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert burst.returncode == 0, burst.stderr
    wait_for(lambda: len(starts(log)) >= 1, timeout=15)
    assert starts(log)[0] - sent_at < 5  # "about a second"; generous on a shared machine
    time.sleep(4)
    assert len(starts(log)) == 1, log.read_text()
    assert supervisor.poll() is None


def test_mail_that_found_the_lock_busy_wakes_its_agent_once_the_lock_is_free(
    applied: World, daemon
) -> None:  # type: ignore[no-untyped-def]
    applied.extra_env["COVEY_BUSY_RETRY"] = "1"
    log = stamping_agent(applied, "hog", 4.0)  # both take the `global` lock
    stamping_agent(applied, "waker", 0.1, "wake_on_mail = true")
    daemon()
    time.sleep(2)  # let it bind its wake-up queue
    hog = start(applied, "run", "hog")
    try:
        wait_for(lambda: len(starts(log, "hog")) == 1, timeout=15)
        applied.ok("send", "waker", "while hog holds the lock")
        # Woken, found the lock busy, skipped; mail still waiting...
        wait_for(
            lambda: any(r["outcome"] == "skipped:busy" for r in applied.json("runs", "waker")),
            timeout=15,
        )
        assert hog.wait(30) == 0
        # ...so once the lock is free, the supervisor tries again, unasked.
        wait_for(lambda: "end waker" in log.read_text(), timeout=20)
        assert intervals(log)["waker"][0] > intervals(log)["hog"][1]
        *skipped, last = [r["outcome"] for r in applied.json("runs", "waker")]
        assert set(skipped) == {"skipped:busy"} and last == "ok"  # retried until it ran once
    finally:
        if hog.poll() is None:
            hog.kill()


def test_a_run_can_be_requested_from_a_running_supervisor(applied: World, daemon) -> None:  # type: ignore[no-untyped-def]
    log = stamping_agent(applied, "asked", 0.1)
    result = applied.covey("run", "asked", "--via-supervisor")
    assert result.returncode == 3  # nobody is listening yet
    assert "no supervisor is listening" in result.stderr
    daemon()
    deadline = time.monotonic() + 30
    while applied.covey("run", "asked", "--via-supervisor").returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    wait_for(lambda: len(starts(log)) >= 1, timeout=15)
    wait_for(lambda: any(r["outcome"] == "ok" for r in applied.json("runs", "asked")), timeout=15)
    assert applied.json("runs", "asked")[-1]["trigger"] == "request"


def test_sigterm_mid_run_stops_the_agent_frees_the_lock_and_records_it(
    applied: World, daemon
) -> None:  # type: ignore[no-untyped-def]
    applied.extra_env["COVEY_SHUTDOWN_GRACE"] = "1"
    log = stamping_agent(applied, "long", 300.0, 'schedule = "* * * * * */1"\ngrace = "1s"')
    stamping_agent(applied, "after", 0.0)
    supervisor = daemon()
    wait_for(lambda: len(starts(log)) >= 1, timeout=30)
    supervisor.send_signal(signal.SIGTERM)
    _, err = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, err
    assert applied.covey("run", "after", "--skip-if-busy").returncode == 0
    (record,) = [r for r in applied.json("runs", "long")]
    assert record["outcome"] == "stopped"
    assert len(starts(log, "long")) == 1 and "end long" not in log.read_text()


def test_sighup_with_a_broken_agent_toml_keeps_the_old_roster_running(
    applied: World, daemon
) -> None:  # type: ignore[no-untyped-def]
    log = stamping_agent(applied, "steady", 0.1, 'schedule = "* * * * * */1"')
    supervisor = daemon()
    wait_for(lambda: len(starts(log)) >= 1, timeout=30)
    (applied.home / "agents" / "steady" / "agent.toml").write_text("schedule = [broken\n")
    newcomer = stamping_agent(applied, "newcomer", 0.1, 'schedule = "* * * * * */1"')
    supervisor.send_signal(signal.SIGHUP)
    before = len(starts(log, "steady"))
    wait_for(lambda: len(starts(log, "steady")) >= before + 2, timeout=30)
    wait_for(lambda: len(starts(newcomer, "newcomer")) >= 1, timeout=30)  # the reload took
    supervisor.send_signal(signal.SIGTERM)
    _, err = supervisor.communicate(timeout=60)
    assert "broken agent definition" in err and "kept_old=True" in err
    assert supervisor.returncode == 0


def test_status_shows_who_runs_and_who_holds_the_lock(applied: World, daemon) -> None:  # type: ignore[no-untyped-def]
    log = stamping_agent(applied, "busy", 300.0)
    running = start(applied, "run", "busy")
    try:
        wait_for(lambda: log.exists())
        applied.ok("send", "busy", "for later")
        status = applied.json("status")
        busy = next(a for a in status["agents"] if a["agent"] == "busy")
        assert busy["running"] is True and busy["run"]["agent"] == "busy"
        assert busy["lock"] == "global" and busy["lock_holders"][0]["agent"] == "busy"
        assert busy["pending"] == 1
        assert status["humans"] == {"ada": 0}
        plain = applied.ok("status")
        assert "global: held by busy" in plain
    finally:
        running.send_signal(signal.SIGTERM)
        running.wait(30)


def test_a_broken_agent_at_start_is_left_out_and_the_others_run(applied: World, daemon) -> None:  # type: ignore[no-untyped-def]
    applied.add_agent("broken", "schedule = [oops\n")
    applied.add_agent(
        "nodir", 'schedule = "* * * * * */1"\ncommand = "true"\nworkdir = "missing"\n'
    )
    log = stamping_agent(applied, "healthy", 0.1, 'schedule = "* * * * * */1"')
    supervisor = daemon()
    wait_for(lambda: len(starts(log, "healthy")) >= 2, timeout=30)
    supervisor.send_signal(signal.SIGTERM)
    _, err = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0
    assert "agent left out" in err and "broken" in err
    assert "agent=nodir" in err and "workdir" in err
    assert "run not started" not in err  # left out means not tried every second


async def test_the_daemons_loops_end_on_stop_even_without_their_cancel(applied: World) -> None:
    """On Python 3.11 a cancel can be lost (asyncio.wait_for, which aio-pika awaits the
    broker with, drops one that comes as its call completes), and `covey supervise` once
    hung on SIGTERM that way. So each background loop also ends when told to stop, on its
    own: here none of them is cancelled at all."""
    from coordinator.metrics import Metrics
    from coordinator.supervisor import Supervisor

    covey = applied.open("scout")
    try:
        await covey.namespace.apply_topology()
        metrics = Metrics(covey.namespace)
        supervisor = Supervisor(covey.namespace, metrics)
        loops = [
            asyncio.create_task(supervisor._keep_subscribed()),
            asyncio.create_task(supervisor._schedule()),
            asyncio.create_task(metrics.refresh_until(supervisor._stopping)),
        ]
        for _ in range(600):  # up to 30 s for a refresh to go round
            if metrics.figures.taken_at:
                break
            await asyncio.sleep(0.05)
        assert metrics.figures.taken_at, "the metrics were never refreshed"
        await asyncio.sleep(0.5)  # the subscription is up, the refresh waits
        assert not any(loop.done() for loop in loops)
        supervisor.stop()
        async with asyncio.timeout(10):
            await asyncio.gather(*loops)
    finally:
        await covey.close()
