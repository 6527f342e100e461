"""`covey demo`: the example roster in agents/, end to end, against a real broker.

A person asks scout a question; scout sends findings to its team and answers
the person in the same thread; writer summarises the findings for the person,
thanks scout in scout's thread and tells everyone; scout runs again and finds
the thanks. Each agent is a script that uses the `covey` command, as a model
would, so the demo shows exactly what an agent sees.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from yarl import URL

from coordinator.bus import redacted
from coordinator.client import Covey
from coordinator.errors import BadInput, ExitCode
from coordinator.localbroker import answers, throwaway_broker
from coordinator.render import mail_list
from coordinator.roster import Agent, Roster
from coordinator.settings import Settings

RUNS = ("scout", "writer", "scout")
QUESTION = (
    "Which RabbitMQ queue types should carry agent mail and the changelog, and why? "
    "Send your findings to the research team."
)


async def run_demo(settings: Settings) -> int:
    roster = Roster.load(settings)
    missing = [name for name in dict.fromkeys(RUNS) if name not in roster.agents]
    if missing or not roster.humans:
        raise BadInput(
            "covey demo runs the example roster (agents/scout, agents/writer and a human in "
            "covey.toml): run it from the covey checkout, or set COVEY_HOME to it"
        )
    url = URL(settings.amqp_url)
    if answers(url.host or "localhost", url.port or 5672):
        return await _demo(settings, roster)
    print(f"No RabbitMQ answers at {redacted(settings.amqp_url)}; starting a throwaway node ...")
    with throwaway_broker() as throwaway_url:
        return await _demo(settings.model_copy(update={"amqp_url": throwaway_url}), roster)


async def _demo(settings: Settings, roster: Roster) -> int:
    # Fresh mailboxes, so the demo never mixes with a real run's state.
    with tempfile.TemporaryDirectory(prefix="covey-demo-") as state_dir:
        return await _story(settings.model_copy(update={"state_dir": Path(state_dir)}), roster)


async def _story(settings: Settings, roster: Roster) -> int:
    started = time.monotonic()
    human = f"human:{sorted(roster.humans)[0]}"
    print(
        f"covey demo: {len(roster.agents)} agents and {len(roster.humans)} human(s) from "
        f"{settings.home}, broker {redacted(settings.amqp_url)}"
    )
    async with Covey(settings, roster, identity=human) as person:
        plan = await person.apply_topology()
        bus = await person.bus()
        await bus.purge(address.queue for address in roster.participants())
        print(
            f"  topology: {len(plan.exchanges)} exchanges, {len(plan.queues)} queues, "
            f"{len(plan.bindings)} bindings (leftover example mail emptied)"
        )
        question = await person.send("agent:scout", "Question: queues for agent mail?", QUESTION)
        print(f"  {human} -> agent:scout  {question.subject!r}  ({question.id[:12]})")

        for name in RUNS:
            print(f"  -- run {name}")
            code = await _run_agent(roster.agent(name), settings)
            if code != 0:
                print(f"covey demo: {name} exited with {code}", file=sys.stderr)
                return int(ExitCode.FAILED)

        mails = await person.inbox()
        print(f"  -- {human}'s inbox")
        print("\n".join(f"     {line}" for line in mail_list(mails).splitlines()))

    senders = {mail.envelope.sender for mail in mails}
    if senders != {"agent:scout", "agent:writer"}:
        print(f"covey demo: expected mail from scout and writer, got {sorted(senders)}")
        return int(ExitCode.FAILED)
    print(f"Mail flowed end to end in {time.monotonic() - started:.1f} s.")
    return 0


async def _run_agent(agent: Agent, settings: Settings) -> int:
    """Run one agent's command the way the supervisor will: its folder, its identity."""
    command = agent.config.command
    if command is None:
        raise BadInput(f"{agent.folder}/agent.toml: command: the demo agents need one")
    bin_dir = str(Path(sys.executable).parent)  # so `covey` and `python3` are this install's
    env = {
        **os.environ,
        **agent.config.env,
        "COVEY_AGENT": agent.name,
        "COVEY_HOME": str(settings.home),
        "COVEY_AMQP_URL": settings.amqp_url,
        "COVEY_STATE_DIR": str(settings.state_dir),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    workdir = agent.folder / (agent.config.workdir or ".")
    if isinstance(command, str):
        process = await asyncio.create_subprocess_shell(
            command,
            cwd=workdir,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    else:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=workdir,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    assert process.stdout is not None
    async for line in process.stdout:
        print(f"     [{agent.name}] {line.decode(errors='replace').rstrip()}")
    return await process.wait()
