"""The smaller things a user hit (issue 11, item 10), each through the real `covey` command."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Raw, World, covey_command, start

import coordinator


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def wait_for(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# -- covey --version ---------------------------------------------------------------------


def test_version_prints_the_package_version_without_a_home_or_a_broker(tmp_path: Path) -> None:
    result = subprocess.run(
        [*covey_command(), "--version"],
        cwd=tmp_path,
        env={**os.environ, "COVEY_HOME": str(tmp_path / "nowhere")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"covey {coordinator.__version__}"


def test_version_imports_nothing_heavy() -> None:
    probe = (
        "import sys; from coordinator import cli\n"
        "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('aio_pika', 'aiormq', 'pydantic', 'croniter') if m in sys.modules]\n"
        "print(heavy, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stderr.strip() == "[]", result.stderr


# A cold command builds only its own parser; it must parse exactly as the whole one does.
COMMAND_LINES = [
    ["send", "scout", "hi", "--body", "x", "--timeout", "3", "--reply-to", "ab12"],
    ["reply", "ab12", "--body-file", "f", "--json"],
    ["inbox", "--all", "--as", "scout"],
    ["read", "ab12"],
    ["done", "ab12", "cd34"],
    ["wait", "--timeout", "5"],
    ["search", "deploy", "-v"],
    ["topology", "apply"],
    ["run", "scout", "--wait-lock"],
    ["log", "--since", "#5", "--limit", "5"],
    ["log", "add", "shipped", "--tag", "a", "--tag", "b"],
    ["digest", "scout", "--format", "json"],
    ["dead", "replay", "ab12"],
    ["dead"],
    ["runs", "scout"],
    ["status"],
    ["web", "--help"],
]


@pytest.mark.parametrize("words", COMMAND_LINES, ids=lambda words: " ".join(words[:2]))
def test_a_command_alone_parses_as_with_every_command(words: list[str]) -> None:
    from coordinator.cli import build_parser

    def parsed(parser: argparse.ArgumentParser) -> object:
        try:
            return vars(parser.parse_args(words))
        except SystemExit as stop:  # --help
            return ("exit", stop.code)

    assert parsed(build_parser(words[0])) == parsed(build_parser())


def test_a_command_that_does_not_exist_is_told_every_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [*covey_command(), "sendd", "scout", "hi"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice: 'sendd'" in result.stderr
    assert "'send', 'reply', 'inbox'" in result.stderr and "'demo'" in result.stderr


# -- where the home is -----------------------------------------------------------------------


def test_a_covey_home_that_does_not_exist_is_named_exit_2(world: World, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-home"
    world_env = world.env
    world_env["COVEY_HOME"] = str(missing)
    result = world.covey("digest", "alpha", env=world_env, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert one_line(result.stderr).startswith(f"covey: COVEY_HOME={missing} does not exist")


def test_outside_any_home_says_no_home_was_found_exit_2(world: World, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = world.env
    del env["COVEY_HOME"]
    for args in (("digest", "alpha"), ("inbox",)):
        result = world.covey(*args, env=env, cwd=outside)
        assert result.returncode == 2, result.stdout + result.stderr
        line = one_line(result.stderr)
        assert f"no covey home found from {outside}" in line, line
        assert "COVEY_HOME" in line and "covey.toml" in line, line


# -- limits and timeouts ---------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_runs_and_log_refuse_a_limit_that_is_not_positive(applied: World, limit: str) -> None:
    applied.add_agent("quick", 'command = "true"\n')
    applied.ok("run", "quick")
    applied.ok("log", "add", "something changed")
    for args in (("runs", "--limit", limit), ("log", "--limit", limit)):
        result = applied.covey(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "--limit" in result.stderr and "positive" in result.stderr
        assert "No runs recorded yet" not in result.stdout
    assert "quick" in applied.ok("runs", "--limit", "1")


def test_send_refuses_a_timeout_of_zero_and_sends_nothing(applied: World) -> None:
    result = applied.covey("send", "scout", "never confirmed", "--timeout", "0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--timeout" in result.stderr and "greater than 0" in result.stderr
    assert applied.json("inbox", "--as", "scout") == []


# -- dead replay to a recipient that does not exist ---------------------------------------------


async def test_replaying_to_a_missing_recipient_keeps_the_letter_dead_exit_3(
    applied: World, raw: Raw
) -> None:
    lost = applied.covey("send", "agent:nobody", "lost")
    assert lost.returncode == 3
    await raw.publish("agent.scout", b"junk", message_id="junk-0001")
    applied.json("inbox", "--as", "scout")  # files the junk in covey.dead
    letters = {x["reason"]: x["id"] for x in applied.json("dead")}
    assert set(letters) == {"unroutable", "invalid"}
    # Both asked for: the one with a recipient goes, the other stays and says so.
    result = applied.covey("dead", "replay", letters["unroutable"][:8], "junk-0001")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "replayed junk-0001 to agent.scout" in result.stdout
    assert f"replayed {letters['unroutable']}" not in result.stdout
    line = one_line(result.stderr)
    assert letters["unroutable"] in line and "agent.nobody" in line and "still dead" in line
    left = applied.json("dead")
    assert [x["id"] for x in left] == [letters["unroutable"]]
    assert left[0]["reason"] == "unroutable"


# -- run --wait-lock and the agent's own lock ----------------------------------------------------


def test_wait_lock_also_waits_for_the_agents_own_lock(applied: World) -> None:
    marker = applied.home / "started"
    applied.add_agent("worker", f'command = "touch {marker}; sleep 3"\nlock = "none"\n')
    first = start(applied, "run", "worker")
    try:
        wait_for(marker.exists)
        second = applied.covey("run", "worker", "--wait-lock", "90s", timeout=120)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "worker run" in second.stdout and ": ok" in second.stdout
    finally:
        first.wait(60)
    assert first.returncode == 0
    # --skip-if-busy still gives up at once on the agent's own lock
    again = start(applied, "run", "worker")
    try:
        marker.unlink()
        wait_for(marker.exists)
        skipped = applied.covey("run", "worker", "--skip-if-busy")
        assert skipped.returncode == 5, skipped.stdout + skipped.stderr
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(60)


# -- run --via-supervisor -----------------------------------------------------------------------


def test_via_supervisor_without_one_is_exactly_one_line_exit_3(applied: World) -> None:
    applied.add_agent("quick", 'command = "true"\n')
    for _ in range(5):  # it used to add a "lost RabbitMQ (Broken pipe)" line now and then
        result = applied.covey("run", "quick", "--via-supervisor")
        assert result.returncode == 3, result.stdout + result.stderr
        assert one_line(result.stderr).startswith("covey: no supervisor is listening")
        assert result.stdout == ""


def test_a_run_request_names_who_asked(applied: World) -> None:
    applied.add_agent("quick", 'command = "true"\n')
    supervisor = start(applied, "supervise", "--no-metrics")
    try:
        deadline = time.monotonic() + 60
        while (asked := applied.covey("run", "quick", "--via-supervisor")).returncode == 3:
            assert time.monotonic() < deadline, asked.stderr
            time.sleep(0.2)
        assert asked.returncode == 0, asked.stderr
        wait_for(lambda: applied.json("runs", "quick") != [])
    finally:
        supervisor.send_signal(signal.SIGTERM)
        _, err = supervisor.communicate(timeout=60)
    requested = [line for line in err.splitlines() if "run requested" in line]
    assert requested, err
    assert "None" not in requested[0] and "human:ada" in requested[0], requested[0]


# -- what status and the other listings say --------------------------------------------------


def test_topology_apply_counts_in_the_singular_when_there_is_one(world: World) -> None:
    out = world.ok("topology", "apply")
    assert "3 agents and 1 human." in out, out


def test_the_inbox_legend_explains_every_marker(applied: World) -> None:
    applied.ok("send", "scout", "one")
    applied.ok("send", "scout", "two")
    (first, _) = applied.json("inbox", "--as", "scout")
    applied.ok("done", first["id"], "--as", "scout")
    out = applied.ok("inbox", "--all", "--as", "scout")
    legend = out.splitlines()[0]
    assert "* = unread" in legend and "- = done" in legend, legend
    assert any(line.startswith("- ") for line in out.splitlines()[1:]), out


def test_status_shows_a_seconds_schedule_to_the_second_and_only_if_supervised(
    applied: World,
) -> None:
    applied.add_agent("ticker", 'command = "true"\nschedule = "* * * * * */10"\n')
    applied.add_agent("hourly", 'command = "true"\nschedule = "7 * * * *"\n')
    out = applied.ok("status")
    header, *rows = out.splitlines()
    assert "NEXT RUN (IF SUPERVISED)" in header, header
    ticker = next(r for r in rows if r.startswith("ticker"))
    hourly = next(r for r in rows if r.startswith("hourly"))
    # 2026-01-01T10:20:30+00:00: seconds shown for a six-field schedule only
    assert ticker.split()[-1].count(":") == 3, ticker
    assert ticker.split()[-1][17:19] in {"00", "10", "20", "30", "40", "50"}, ticker
    assert hourly.split()[-1].count(":") == 2 and ":07+" in hourly.split()[-1], hourly
