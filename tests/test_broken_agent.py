"""One broken agent.toml affects only that agent: commands naming it say what is wrong,
everything else works and warns once, and `covey status` shows it broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Raw, World

PROBLEM = "agents/gamma/agent.toml: schedul: unknown key"


@pytest.fixture
def broken(applied: World) -> World:
    """gamma was fine (its queue is bound to team:research), then got a typo."""
    applied.add_agent("gamma", 'teams = ["research"]\n')
    applied.ok("topology", "apply")
    applied.add_agent("gamma", 'teams = ["research"]\nschedul = "* * * * *"\n')
    return applied


def warned_once(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "gamma" in lines[0] and PROBLEM in lines[0], stderr


def refused(world: World, *args: str) -> None:
    result = world.covey(*args)
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and PROBLEM in lines[0], (args, result.stderr)


def test_everything_else_works_and_warns_once(broken: World) -> None:
    sent = broken.covey("send", "scout", "hello")
    assert sent.returncode == 0, sent.stderr
    warned_once(sent.stderr)
    for who in ("scout", "writer", "loner", "human:ada"):
        inbox = broken.covey("inbox", "--as", who, "--json")
        assert inbox.returncode == 0, inbox.stderr
        warned_once(inbox.stderr)
    assert [m["subject"] for m in broken.json("inbox", "--as", "scout")] == ["hello"]


def test_commands_naming_the_broken_agent_exit_2_with_its_problem(broken: World) -> None:
    refused(broken, "send", "gamma", "hello")
    refused(broken, "send", "agent:gamma", "hello")
    refused(broken, "inbox", "--as", "gamma")
    refused(broken, "run", "gamma")
    refused(broken, "run", "gamma", "--via-supervisor")
    refused(broken, "digest", "gamma")
    refused(broken, "runs", "gamma")
    env = {**broken.env, "COVEY_AGENT": "gamma"}
    result = broken.covey("inbox", env=env)
    assert result.returncode == 2 and PROBLEM in result.stderr


async def test_team_mail_reaches_the_members_covey_knows(broken: World, raw: Raw) -> None:
    """The broken agent's teams are unknown; its queue keeps the bindings it had."""
    result = broken.covey("send", "team:research", "note")
    assert result.returncode == 0, result.stderr
    warned_once(result.stderr)
    assert [m["subject"] for m in broken.json("inbox", "--as", "writer")] == ["note"]
    assert await raw.count("agent.gamma") == 1  # waiting for when gamma is fixed


def test_status_shows_the_broken_agent_with_its_problem(broken: World) -> None:
    status = broken.json("status")
    by_name = {a["agent"]: a for a in status["agents"]}
    assert set(by_name) == {"gamma", "loner", "scout", "writer"}
    assert PROBLEM in by_name["gamma"]["problem"]
    assert by_name["scout"]["problem"] is None
    text = broken.covey("status")
    assert text.returncode == 0, text.stderr
    (row,) = [line for line in text.stdout.splitlines() if line.startswith("gamma")]
    assert "broken" in row
    assert PROBLEM in text.stdout


def test_a_run_of_another_agent_uses_covey_inside_and_ends_ok(broken: World) -> None:
    broken.ok("send", "scout", "for the run")
    broken.add_agent(
        "scout",
        'teams = ["research"]\n'
        "command = \"covey inbox && covey log add 'scout ran' && echo inner-ok\"\n",
    )
    result = broken.covey("run", "scout", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    warned_once(result.stderr)
    run = json.loads(result.stdout)
    assert run["outcome"] == "ok"
    log = Path(run["log"]).read_text()
    assert "for the run" in log and "inner-ok" in log
    assert [e["summary"] for e in broken.json("log")] == ["scout ran"]
