"""`covey demo` runs the example roster end to end, and brings its own broker when none answers.

It runs only in a vhost it made (and removes), never in one it found.
"""

import json
import os
import re
import shutil
import subprocess
import time

import pytest
from conftest import REPO, Broker, World

from coordinator.localbroker import free_port
from coordinator.provision import Management


def demo_env(world: World, amqp_url: str) -> dict[str, str]:
    env = world.env
    env.update(COVEY_HOME=str(REPO), COVEY_AMQP_URL=amqp_url)
    return env


def test_the_demo_shows_mail_flowing_between_agents_a_team_and_a_human(world: World) -> None:
    started = time.monotonic()
    result = world.covey("demo", env=demo_env(world, world.amqp_url), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[scout] sent findings to team:research" in out
    assert "[writer] read 'Findings: queues for agent mail' from agent:scout" in out
    # scout's change reached writer's digest on writer's next run
    assert "[writer] digest at start: - #0 (" in out
    assert "Recommended quorum queues for mail [research]" in out
    assert "[writer] told everyone (all)" in out
    assert "[scout] read 'Re: Findings: queues for agent mail' from agent:writer" in out
    assert "agent:scout" in out.split("human:ada's inbox")[1]
    assert "Mail flowed end to end" in out
    # writer's run is shown from its session on the broker, as `covey attach` shows it:
    # opened, its lines and what it emitted, in order, then its outcome.
    attached = [line.strip() for line in out.split("covey attach writer")[1].splitlines()]
    shown = [line for line in attached if line.startswith("[writer] [")]
    kinds = [line.split("]")[1].split()[0].lstrip("[") for line in shown]
    assert kinds == ["opened", "status", "tool", "progress", "result", "closed"], shown
    assert "[writer] [closed] run" in out and "of writer: ok" in out
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_the_demo_starts_a_throwaway_broker_when_none_answers(world: World) -> None:
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    result = world.covey("demo", env=demo_env(world, nowhere), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting a throwaway node" in result.stdout
    assert "Mail flowed end to end" in result.stdout


def demo_vhost(out: str) -> str:
    found = re.search(r"broker amqp://[^/]*/(covey-demo-[0-9a-f]+)", out)
    assert found, out
    return found.group(1)


def vhost_exists(broker: Broker, name: str) -> bool:
    api = Management("http://127.0.0.1:15672", "guest", "guest", timeout=60)
    try:
        return name in {v["name"] for v in api.call("GET", "vhosts")}
    except Exception:  # no management plugin: ask the node itself
        listed = subprocess.run(["rabbitmqctl", "list_vhosts"], capture_output=True, text=True)
        return name in listed.stdout.split()


def test_the_demo_never_touches_the_configured_vhost_and_removes_its_own(
    world: World, broker: Broker
) -> None:
    world.ok("topology", "apply")
    world.ok("send", "scout", "keep me")  # mail in a namespace the demo did not create
    result = world.covey("demo", env=demo_env(world, world.amqp_url), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Mail flowed end to end" in result.stdout
    assert [m["subject"] for m in world.json("inbox", "--as", "scout")] == ["keep me"]
    assert not vhost_exists(broker, demo_vhost(result.stdout))


def test_the_demo_makes_its_vhost_without_the_management_api(world: World, broker: Broker) -> None:
    env = demo_env(world, world.amqp_url)
    env["COVEY_MANAGEMENT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = world.covey("demo", env=env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Mail flowed end to end" in result.stdout
    if os.geteuid() == 0 and shutil.which("rabbitmqctl"):  # so rabbitmqctl made it
        assert "starting a throwaway node" not in result.stdout, result.stdout
        assert not vhost_exists(broker, demo_vhost(result.stdout))
    else:  # else its own node: nothing to leave behind on this broker
        assert "starting a throwaway node" in result.stdout, result.stdout


def test_the_kept_demo_can_be_attached_from_a_second_terminal(world: World, broker: Broker) -> None:
    """What the README's Sessions section tells a newcomer to do, with the real command:
    `covey demo --keep`, then the printed `export` line in another process, then
    `covey sessions` and `covey attach writer`."""
    result = world.covey("demo", "--keep", env=demo_env(world, world.amqp_url), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    vhost = demo_vhost(result.stdout)
    try:
        (export,) = [line for line in result.stdout.splitlines() if "export COVEY_HOME=" in line]
        printed = dict(part.split("=", 1) for part in export.split()[1:])
        assert printed["COVEY_AMQP_URL"].strip("'").endswith(f"/{vhost}")
        second = {
            **world.env,
            "COVEY_HOME": printed["COVEY_HOME"],
            "COVEY_STATE_DIR": printed["COVEY_STATE_DIR"],
            # the printed URL with the password filled in, as the reader would
            "COVEY_AMQP_URL": world.amqp_url.rsplit("/", 1)[0] + "/" + vhost,
        }
        sessions = world.covey("sessions", "--json", env=second)
        assert sessions.returncode == 0, sessions.stderr
        agents = [json.loads(line)["agent"] for line in sessions.stdout.splitlines()]
        assert agents == ["scout", "writer", "scout"]
        attached = world.covey("attach", "writer", env=second)
        assert attached.returncode == 0, attached.stderr
        assert "[result] 1 message(s) handled" in attached.stdout
        assert "of writer: ok" in attached.stdout.splitlines()[-1]
    finally:
        vhost_api = Management("http://127.0.0.1:15672", "guest", "guest", timeout=60)
        try:
            vhost_api.call("DELETE", f"vhosts/{vhost}")
        except Exception:  # no management plugin: ask the node itself
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)
        shutil.rmtree(printed_state_dir(result.stdout), ignore_errors=True)
    assert not vhost_exists(broker, vhost)


def printed_state_dir(out: str) -> str:
    found = re.search(r"COVEY_STATE_DIR=(\S+)", out)
    return found.group(1) if found else "/nonexistent"
