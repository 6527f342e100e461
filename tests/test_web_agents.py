"""`/api/agents` asks the broker in parallel (api.agents); `covey status` one agent after
another (status.agent_statuses). The two must say the same, agent for agent, also while
agents run and hold their own and a shared lock, and for a broken agent."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
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


def test_api_agents_answers_as_fresh_as_asked_and_never_of_an_old_roster(applied: World) -> None:
    """One look at the agents is shared (coordinator/shared.py): `max_age` takes an answer
    that old, saying its Age; the default takes one begun after the request, so mail sent
    before it is counted; a roster read again (SIGHUP) is never answered from before."""

    def agents(web: httpx.Client, **params: float) -> tuple[dict[str, dict], int]:
        answer = web.get("/api/agents", params=params)
        assert answer.status_code == 200, answer.text
        return {a["name"]: a for a in answer.json()}, int(answer.headers["age"])

    with serving(applied) as web:
        # A fresh answer's age is how long its look took: well under 3 s here.
        first, age = agents(web)
        assert first["scout"]["pending"] == 0 and age < 3
        applied.ok("send", "scout", "one")
        time.sleep(3.1)
        cached, age = agents(web, max_age=600)
        assert cached == first and age >= 3  # the look before the send, and its age
        fresh, age = agents(web)
        assert fresh["scout"]["pending"] == 1 and age < 3

        with ThreadPoolExecutor(20) as pool:  # at the same moment: all of them fresh
            answers = list(pool.map(lambda _: agents(web)[0], range(20)))
        assert all(answer == fresh for answer in answers)

        applied.add_agent("newcomer", 'command = "true"\n')
        web.process.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while "newcomer" not in agents(web, max_age=600)[0]:
            assert time.monotonic() < deadline, "an answer of the old roster was taken"
            time.sleep(0.1)


def test_api_agents_refuses_a_max_age_that_is_not_a_number_of_seconds(applied: World) -> None:
    with serving(applied) as web:
        for bad in ("-1", "soon", "3601", "nan"):
            answer = web.get("/api/agents", params={"max_age": bad})
            assert answer.status_code == 400, (bad, answer.text)
            assert "max_age" in answer.json()["error"]
