"""`covey demo` runs the example roster end to end, and brings its own broker when none answers.

It runs only in a vhost it made (and removes), never in one it found.
"""

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
    assert time.monotonic() - started < 30


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
