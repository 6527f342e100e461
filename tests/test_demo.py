"""`covey demo` runs the example roster end to end, and brings its own broker when none answers."""

import time

import pytest
from conftest import REPO, World

from coordinator.localbroker import free_port


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
