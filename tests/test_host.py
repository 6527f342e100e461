"""The `host` setting (issue 16): what a run, its lock holder notes and its events say
about where they ran, so that two supervisors on one machine read as two hosts."""

import json
import socket
from pathlib import Path

import pytest
from conftest import World


def test_a_run_records_the_configured_host_and_status_and_runs_show_it(applied: World) -> None:
    applied.extra_env["COVEY_HOST"] = "alpha"
    # The agent looks at `covey status` while its run holds the lock (its covey has the
    # run's environment, COVEY_HOST included).
    seen = applied.home / "status"
    applied.add_agent(
        "looker", f'command = "covey status --json > {seen}.json; covey status > {seen}.txt"\n'
    )
    result = applied.json("run", "looker")
    assert result["outcome"] == "ok", result

    (looker,) = [
        a for a in json.loads(Path(f"{seen}.json").read_text())["agents"] if a["agent"] == "looker"
    ]
    assert looker["run"]["host"] == "alpha"  # the lock holder note
    assert [h["host"] for h in looker["lock_holders"]] == ["alpha"]
    (line,) = [x for x in Path(f"{seen}.txt").read_text().splitlines() if x.startswith("looker")]
    assert " on alpha " in line

    (record,) = applied.json("runs", "looker")
    assert record["host"] == "alpha" and record["run_id"] == result["run_id"]
    assert "alpha" in applied.ok("runs", "looker").split()
    (after,) = [a for a in applied.json("status")["agents"] if a["agent"] == "looker"]
    assert after["last_run"]["host"] == "alpha"


def test_the_host_defaults_to_this_machines_name(applied: World) -> None:
    applied.add_agent("quick", 'command = "true"\n')
    applied.ok("run", "quick")
    (record,) = applied.json("runs", "quick")
    assert record["host"] == socket.gethostname()


@pytest.mark.parametrize("where", ["environment", "covey.toml"])
def test_a_bad_host_is_one_line_and_exit_2(world: World, where: str) -> None:
    if where == "environment":
        world.extra_env["COVEY_HOST"] = "Alpha.example"
        expected = "environment variable COVEY_HOST: host: invalid host name 'Alpha.example'"
    else:
        toml = Path(world.home / "covey.toml")
        toml.write_text('host = "Alpha.example"\n' + toml.read_text())
        expected = "covey.toml: host: invalid host name 'Alpha.example'"
    result = world.covey("status")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
