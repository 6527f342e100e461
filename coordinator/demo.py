"""`covey demo`: the example roster in agents/, end to end, against a real broker.

A person asks scout a question; scout sends findings to its team, answers the
person in the same thread and logs its change to the changelog; writer starts
with that change in its digest, summarises the findings for the person, thanks
scout in scout's thread and tells everyone; scout runs again and finds the
thanks. Each agent is a script that uses the `covey` command, as a model
would, run through the same lifecycle as `covey run` (locks, environment, run
log, events), so the demo shows exactly what an agent sees.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from yarl import URL

from coordinator import runner
from coordinator.bus import redacted
from coordinator.client import Covey
from coordinator.errors import BadInput, ExitCode
from coordinator.localbroker import answers, throwaway_broker
from coordinator.render import mail_list
from coordinator.roster import Roster
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
            print(f"  -- covey run {name}")
            result = await runner.run(person, roster.agent(name), echo=_prefixed(name))
            if result.outcome is not runner.Outcome.OK:
                print(f"covey demo: {result.summary()}", file=sys.stderr)
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


def _prefixed(name: str) -> runner.Echo:
    def echo(line: str) -> None:
        print(f"     [{name}] {line}")

    return echo
