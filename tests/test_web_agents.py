"""`/api/agents` asks the broker in parallel (api.agents); `covey status` one agent after
another (status.agent_statuses). The two must say the same, agent for agent, also while
agents run and hold their own and a shared lock, and for a broken agent."""

from __future__ import annotations

import asyncio
import subprocess
import time

from conftest import World, start
from test_web_api import serving

from coordinator.api import AgentView, as_json
from coordinator.status import agent_statuses


async def test_api_agents_says_what_covey_status_says(applied: World) -> None:
    applied.add_agent("sleeper", 'command = "sleep 30"\n')
    applied.add_agent("solo", 'command = "sleep 30"\nlock = "none"\n')
    (applied.home / "agents" / "broken").mkdir()
    (applied.home / "agents" / "broken" / "agent.toml").write_text("teams = 3\n")
    applied.ok("topology", "apply")
    applied.ok("send", "scout", "one")
    applied.ok("send", "scout", "two")
    runs = [start(applied, "run", name, stdout=subprocess.DEVNULL) for name in ("sleeper", "solo")]
    try:
        with serving(applied) as web:
            deadline = time.monotonic() + 30
            while True:
                answer = web.get("/api/agents").json()
                states = {a["name"]: a["state"] for a in answer}
                if states["sleeper"] == states["solo"] == "running":
                    break
                assert time.monotonic() < deadline, states
                await asyncio.sleep(0.2)
            # Two readings, one after the other, of agents that are starting: a record
            # can land between them. They must agree once nothing moves.
            deadline = time.monotonic() + 30
            async with applied.open() as covey:
                while True:
                    statuses = await agent_statuses(covey.namespace)
                    expected = as_json([AgentView.of(s) for s in statuses])
                    answer = web.get("/api/agents").json()
                    if answer == expected or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
    finally:
        for run in runs:
            run.terminate()
            run.wait(30)
    assert answer == expected
    by_name = {a["name"]: a for a in answer}
    assert by_name["scout"]["pending"] == 2 and by_name["broken"]["state"] == "broken"
    assert by_name["sleeper"]["run"]["agent"] == "sleeper"
    assert by_name["sleeper"]["lock_holders"][0]["agent"] == "sleeper"  # the global lock
    assert by_name["solo"]["lock"] == "none" and by_name["solo"]["lock_holders"] == []
