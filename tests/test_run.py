"""`covey run`: the lock the broker enforces, preflight, timeouts, and the exit codes."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import Broker, ManagementAdmin, World, start

STAMP = """
import os, sys, time
log, seconds = sys.argv[1], float(sys.argv[2])
with open(log, "a") as f:
    f.write(f"start {os.environ['COVEY_AGENT']} {time.time()}\\n")
time.sleep(seconds)
with open(log, "a") as f:
    f.write(f"end {os.environ['COVEY_AGENT']} {time.time()}\\n")
"""


def stamping_agent(world: World, name: str, seconds: float, extra: str = "") -> Path:
    """An agent that records when it starts and ends in `stamps.log`."""
    script = world.home / "stamp.py"
    script.write_text(STAMP)
    log = world.home / "stamps.log"
    world.add_agent(name, f'command = ["python3", "{script}", "{log}", "{seconds}"]\n{extra}')
    return log


def intervals(log: Path) -> dict[str, tuple[float, float]]:
    starts, ends = {}, {}
    for line in log.read_text().splitlines():
        what, agent, at = line.split()
        (starts if what == "start" else ends)[agent] = float(at)
    return {agent: (starts[agent], ends[agent]) for agent in starts}


def most_at_once(spans: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def wait_for(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_run_gets_its_environment_and_its_output_is_logged(applied: World) -> None:
    applied.add_agent(
        "echoer",
        'command = "echo agent=$COVEY_AGENT run=$COVEY_RUN_ID digest=$COVEY_DIGEST_FILE '
        'home=$COVEY_HOME extra=$EXTRA; covey send human:ada done-by-$COVEY_AGENT"\n'
        '[env]\nEXTRA = "yes"\n',
    )
    result = applied.json("run", "echoer")
    assert result["outcome"] == "ok" and result["exit_code"] == 0
    log = Path(result["log"]).read_text()
    assert f"agent=echoer run={result['run_id']}" in log
    assert f"home={applied.home}" in log and "extra=yes" in log
    assert ".digest.md" in log
    # The agent could use covey as itself, with no set-up of its own.
    (mail,) = applied.json("inbox", "--as", "human:ada")
    assert mail["sender"] == "agent:echoer" and mail["subject"] == "done-by-echoer"


def test_the_agents_own_failure_is_exit_1_with_its_code_reported(applied: World) -> None:
    applied.add_agent("failing", 'command = "exit 3"\n')
    result = applied.covey("run", "failing")
    assert result.returncode == 1
    assert "failed, exit 3" in result.stdout


def test_two_runs_sharing_the_global_lock_never_overlap(applied: World) -> None:
    log = stamping_agent(applied, "first", 1.0)
    stamping_agent(applied, "second", 1.0)
    runs = [start(applied, "run", name, "--wait-lock", "60") for name in ("first", "second")]
    for process in runs:
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, out + err
    (a_start, a_end), (b_start, b_end) = intervals(log).values()
    assert a_end <= b_start or b_end <= a_start, intervals(log)


def test_skip_if_busy_exits_5_naming_the_holder(applied: World) -> None:
    log = stamping_agent(applied, "holder", 30.0)
    stamping_agent(applied, "other", 0.0)
    holding = start(applied, "run", "holder")
    try:
        wait_for(lambda: log.exists())
        result = applied.covey("run", "other", "--skip-if-busy")
        assert result.returncode == 5, result.stdout + result.stderr
        assert "lock global is busy, held by holder run" in result.stdout
    finally:
        holding.send_signal(signal.SIGTERM)
        holding.wait(30)


def test_kill_9_of_a_run_frees_its_lock_within_5_seconds_and_the_run_shows_lost(
    applied: World,
) -> None:
    log = stamping_agent(applied, "victim", 300.0)
    stamping_agent(applied, "next", 0.0)
    victim = start(applied, "run", "victim")
    wait_for(lambda: log.exists())
    agent_pids = subprocess.run(
        ["pgrep", "-f", f"stamp.py {log}"], capture_output=True, text=True
    ).stdout.split()
    try:
        killed_at = time.monotonic()
        victim.kill()  # SIGKILL: no goodbye, no release
        victim.wait()
        while True:
            result = applied.covey("run", "next", "--skip-if-busy")
            if result.returncode != 5:
                break
            assert time.monotonic() - killed_at < 5, "the lock was still held after 5 s"
        assert result.returncode == 0, result.stdout + result.stderr
        # Its run never said how it ended; with its lock gone, it shows as lost.
        (record,) = applied.json("runs", "victim")
        assert record["outcome"] == "lost"
        # And its agent did not keep running beside the next one: it died with its run.
        assert agent_pids
        wait_for(lambda: not any(alive(int(pid)) for pid in agent_pids), timeout=5)
    finally:
        for pid in agent_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_two_slot_semaphore_runs_two_at_once_and_never_three(applied: World) -> None:
    (applied.home / "covey.toml").write_text(
        'identity = "human:ada"\n[humans.ada]\n[locks.pair]\nslots = 2\n'
    )
    log = None
    for name in ("one", "two", "three"):
        log = stamping_agent(applied, name, 1.5, 'lock = "pair"')
    assert log is not None
    runs = [start(applied, "run", name, "--wait-lock", "60") for name in ("one", "two", "three")]
    for process in runs:
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, out + err
    assert most_at_once(list(intervals(log).values())) == 2


def test_a_failing_preflight_skips_with_exit_6_without_starting_the_agent(
    applied: World,
) -> None:
    marker = applied.home / "started"
    applied.add_agent(
        "careful",
        f'command = ["touch", "{marker}"]\n'
        '[[preflight]]\nname = "api-up"\ncommand = ["sh", "-c", "echo API is down; exit 1"]\n',
    )
    result = applied.covey("run", "careful")
    assert result.returncode == 6
    assert "api-up: exited with 1: API is down" in result.stdout
    assert not marker.exists()
    # ... and the lock was freed: another agent runs at once.
    applied.add_agent("after", 'command = "true"\n')
    assert applied.covey("run", "after", "--skip-if-busy").returncode == 0


@pytest.fixture
def http_status() -> Iterator[tuple[str, list[int]]]:
    """A local HTTP server answering with the status at the head of the list."""
    statuses = [503]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses[0])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/health", statuses
    server.shutdown()


def test_an_http_preflight_passes_on_2xx_and_skips_otherwise(
    applied: World, http_status: tuple[str, list[int]]
) -> None:
    url, statuses = http_status
    applied.add_agent("web", f'command = "true"\n[[preflight]]\nhttp = "{url}"\n')
    result = applied.covey("run", "web")
    assert result.returncode == 6
    assert "answered 503, expected 2xx" in result.stdout
    statuses[0] = 204
    assert applied.covey("run", "web").returncode == 0


def test_a_timeout_ends_the_agent_and_its_children_with_exit_7(applied: World) -> None:
    pids = applied.home / "pids"
    applied.add_agent(
        "slow",
        f'command = "sleep 300 & echo $! > {pids}; sleep 300"\ntimeout = "1s"\ngrace = "1s"\n',
    )
    started = time.monotonic()
    result = applied.covey("run", "slow")
    assert result.returncode == 7, result.stdout + result.stderr
    assert "timeout" in result.stdout
    assert time.monotonic() - started < 30
    child = int(pids.read_text())
    wait_for(lambda: not running(child), timeout=5)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers until PID 1 reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_lost_lock_connection_stops_the_agent_with_exit_8(
    applied: World, broker: Broker, vhost: str
) -> None:
    log = stamping_agent(applied, "fragile", 300.0)
    running = start(applied, "run", "fragile")
    wait_for(lambda: log.exists())
    # The management API lists new connections only after its next stats tick, so
    # keep cutting until there was something to cut.
    cut_at = None
    deadline = time.monotonic() + 30
    while running.poll() is None and time.monotonic() < deadline:
        if broker.admin.close_connections(vhost) and cut_at is None:
            cut_at = time.monotonic()
        time.sleep(0.5)
    out, err = running.communicate(timeout=60)
    assert running.returncode == 8, out + err
    assert "lock-lost" in out
    assert cut_at is not None
    assert time.monotonic() - cut_at < 15


def test_a_lock_connection_that_fails_while_waiting_is_replaced_and_the_run_goes_ahead(
    applied: World, broker: Broker, vhost: str
) -> None:
    """`covey run waiter` waits for the global lock `blocker` holds; its lock connection
    is cut meanwhile (as RabbitMQ closes it with INTERNAL_ERROR when a holder note's quorum
    leader has just gone): it opens another, and runs once `blocker` lets go."""
    if not isinstance(broker.admin, ManagementAdmin):
        pytest.skip("cuts one named connection through the management API")
    log = stamping_agent(applied, "blocker", 300.0)
    stamping_agent(applied, "waiter", 0.1, "wait_lock = 120\n")
    blocker = start(applied, "run", "blocker")
    waiter = None
    try:
        wait_for(lambda: log.exists())
        waiter = start(applied, "run", "waiter")
        api, where = broker.admin.api, quote(vhost, safe="")

        def cut_waiters_lock_connection() -> bool:
            for connection in api.call("GET", f"vhosts/{where}/connections"):
                given = connection.get("client_properties", {}).get("connection_name", "")
                if given.startswith("covey lock waiter"):
                    api.call("DELETE", f"connections/{quote(connection['name'], safe='')}")
                    return True
            return False

        # The management API lists a new connection only after its next stats tick.
        wait_for(cut_waiters_lock_connection, timeout=30)
        time.sleep(2)  # its next try is on a new connection
        assert waiter.poll() is None, waiter.communicate()
        blocker.send_signal(signal.SIGTERM)  # a clean release: the waiter takes the lock
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, out + err
        assert "trying again on a new lock connection" in err
    finally:
        for process in (blocker, waiter):
            if process is not None and process.poll() is None:
                process.kill()
            if process is not None:
                process.communicate(timeout=30)
    assert [r["outcome"] for r in applied.json("runs", "waiter")] == ["ok"]


@pytest.mark.parametrize(
    ("toml", "complaint"),
    [
        ('command = ["no-such-program-xyz"]\n', "'no-such-program-xyz' is not an executable"),
        ('command = "true"\nworkdir = "missing"\n', "workdir:"),
        ('command = "true"\nschedule = "61 * * * *"\n', "invalid cron expression"),
        ('command = "true"\nlock = "gpu"\n', "no lock 'gpu'"),
        ('command = "true"\ntimeout = "soon"\n', "invalid duration 'soon'"),
        ("", "command: missing"),
    ],
)
def test_bad_agent_definitions_are_exit_2_in_one_line(
    applied: World, toml: str, complaint: str
) -> None:
    applied.add_agent("broken", toml)
    result = applied.covey("run", "broken")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and complaint in lines[0], result.stderr


def test_an_unknown_agent_and_a_zero_slot_semaphore_are_exit_2(applied: World) -> None:
    result = applied.covey("run", "ghost")
    assert result.returncode == 2 and "unknown agent 'ghost'" in result.stderr
    (applied.home / "covey.toml").write_text("[humans.ada]\n[locks.none_left]\nslots = 0\n")
    result = applied.covey("run", "scout")
    assert result.returncode == 2
    assert "locks.none_left.slots" in result.stderr


def test_a_first_run_in_a_fresh_namespace_sets_up_what_it_records_to(world: World) -> None:
    world.add_agent("pioneer", 'command = "true"\n')  # nobody ran `covey topology apply`
    result = world.covey("run", "pioneer")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not publish" not in result.stderr
    (record,) = world.json("runs", "pioneer")
    assert record["outcome"] == "ok"


def test_a_run_log_on_a_full_disk_costs_the_log_not_the_agent_or_its_locks(
    applied: World,
) -> None:
    """Injected: the agent's run folder on a 1 MiB tmpfs, and an agent that prints 8 MiB
    and exits 0. Its log fills the disk: the run keeps reading (and dropping) the output,
    so the agent finishes as soon as it would have, rather than blocking on a full pipe
    while it holds its locks until its timeout; the run is failed, naming the log."""
    from test_mailbox_hardening import needs_root, tmpfs

    needs_root()
    applied.add_agent(
        "chatty",
        'command = "yes 0123456789abcdef0123456789abcdef | head -c 8388608; echo done"\n'
        'timeout = "90s"\nlock = "global"\n',
    )
    with tmpfs(applied.state_dir / "runs" / "chatty", "1m"):
        started = time.monotonic()
        result = applied.covey("run", "chatty", "--json")
        took = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < 45, f"the run took {took:.1f} s: the agent blocked on its output"
    reason = json.loads(result.stdout)["reason"]
    assert "chatty" in reason and "No space left" in reason and "lost" in reason, reason
    # The locks went with the run: the next one starts at once.
    applied.add_agent("quick", 'command = "true"\nlock = "global"\n')
    assert applied.covey("run", "quick", "--skip-if-busy").returncode == 0
