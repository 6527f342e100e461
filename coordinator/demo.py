"""`covey demo`: the example roster in agents/, end to end, against a real broker.

A person asks scout a question; scout sends findings to its team, answers the
person in the same thread and logs its change to the changelog; writer starts
with that change in its digest, summarises the findings for the person, thanks
scout in scout's thread and tells everyone; scout runs again and finds the
thanks. Each agent is a script that uses the `covey` command, as a model
would, run through the same lifecycle as `covey run` (locks, environment, run
log, events, session), so the demo shows exactly what an agent sees.

writer's run is shown the way `covey attach writer` shows it from another
terminal: the demo learns that the run started from its `session.opened` event
and follows the session on the broker while the run is live, rather than
echoing the agent's output itself. With `--keep` the namespace stays, and the
demo prints how to look at it (`covey sessions`, `covey attach`) from there.

It runs only in a namespace it made and removes afterwards, never in one it
found: a vhost of its own on the configured broker (made through the management
API, else through `rabbitmqctl` on this machine), else a throwaway node of its
own. The configured vhost, `/` included, is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

from yarl import URL

from coordinator import runner
from coordinator.errors import BadInput, BrokerUnavailable, ConfigError, ExitCode
from coordinator.events import Event
from coordinator.gateway import redacted
from coordinator.identity import url_user
from coordinator.localbroker import answers, throwaway_broker
from coordinator.namespace import Namespace
from coordinator.provision import Management
from coordinator.render import mail_list
from coordinator.roster import Roster
from coordinator.settings import Settings

RUNS = ("scout", "writer", "scout")
ATTACHED = "writer"  # the run shown from its session, as `covey attach` shows it
ATTACH_WAIT_SECONDS = 30.0  # for the run's session to open (its lock, its preflight)
QUESTION = (
    "Which RabbitMQ queue types should carry agent mail and the changelog, and why? "
    "Send your findings to the research team."
)


async def run_demo(settings: Settings, keep: bool = False) -> int:
    roster = Roster.load(settings)
    missing = [name for name in dict.fromkeys(RUNS) if name not in roster.agents]
    if missing or not roster.humans:
        raise BadInput(
            "covey demo runs the example roster (agents/scout, agents/writer and a human in "
            "covey.toml): run it from the covey checkout, or set COVEY_HOME to it"
        )
    url = URL(settings.amqp_url)
    broker = redacted(settings.amqp_url)
    if answers(url.host or "localhost", url.port or 5672):
        with _own_vhost(settings, keep) as vhost_url:
            if vhost_url is not None:
                settings = settings.with_login(vhost_url)  # its vhost, on every node
                return await _demo(settings, roster, keep)
        print(
            f"covey cannot create a vhost of its own at {broker} (no management API that lets "
            "it, no rabbitmqctl here); starting a throwaway node ..."
        )
    else:
        print(f"No RabbitMQ answers at {broker}; starting a throwaway node ...")
    if keep:
        print("  (--keep: a throwaway node goes with the demo; nothing is kept)")
    started = False
    try:
        with throwaway_broker() as throwaway_url:
            started = True
            settings = settings.model_copy(
                update={"amqp_url": throwaway_url, "amqp_urls": [throwaway_url]}
            )
            return await _demo(settings, roster, keep=False)
    except BrokerUnavailable:
        if started:
            raise
        raise BrokerUnavailable(
            f"covey demo runs only in a namespace it creates, and can create none: let "
            f"{url_user(settings.amqp_url)} create vhosts (the management plugin, or "
            "rabbitmqctl as root), or install rabbitmq-server for a throwaway node"
        ) from None


@contextmanager
def _own_vhost(settings: Settings, keep: bool = False) -> Iterator[str | None]:
    """A new vhost on the configured broker, for the configured user, deleted afterwards
    with all in it (unless `keep`); None when covey may not make one there."""
    name = f"covey-demo-{uuid.uuid4().hex[:10]}"
    user = url_user(settings.amqp_url)
    made = _made_with_api(settings, name, user) or _made_with_ctl(settings, name, user)
    if made is None:
        yield None
        return
    try:
        yield str(URL(settings.amqp_url).with_path("/" + name, encoded=False))
    finally:
        if not keep:
            made(name)


Remover = Callable[[str], None]


def _made_with_api(settings: Settings, name: str, user: str) -> Remover | None:
    api = Management.for_settings(settings)
    vhost = quote(name, safe="")

    def remove(name: str) -> None:
        with suppress(BrokerUnavailable):
            api.call("DELETE", f"vhosts/{vhost}")

    try:
        api.call("PUT", f"vhosts/{vhost}", {})
    except (BrokerUnavailable, ConfigError):  # no plugin, or a user that may not
        return None
    try:
        rules = {"configure": ".*", "write": ".*", "read": ".*"}
        api.call("PUT", f"permissions/{vhost}/{quote(user, safe='')}", rules)
    except (BrokerUnavailable, ConfigError):
        remove(name)
        return None
    return remove


def _made_with_ctl(settings: Settings, name: str, user: str) -> Remover | None:
    """rabbitmqctl speaks to this machine's node only, and works for root (or rabbitmq)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None or URL(settings.amqp_url).host not in ("localhost", "127.0.0.1", "::1"):
        return None

    def run(*args: str) -> bool:
        try:
            subprocess.run([ctl, *args], check=True, capture_output=True, timeout=60)
            return True
        except (OSError, subprocess.SubprocessError):
            return False

    def remove(name: str) -> None:
        run("delete_vhost", name)

    if not run("add_vhost", name):
        return None
    if not run("set_permissions", "-p", name, user, ".*", ".*", ".*"):
        remove(name)
        return None
    return remove


async def _demo(settings: Settings, roster: Roster, keep: bool) -> int:
    # Fresh mailboxes, so the demo never mixes with a real run's state.
    if keep:  # kept with the namespace, for the commands it prints at the end
        kept = Path(tempfile.mkdtemp(prefix="covey-demo-"))
        code = await _story(settings.model_copy(update={"state_dir": kept}), roster)
        _print_how_to_look(settings, kept)
        return code
    with tempfile.TemporaryDirectory(prefix="covey-demo-") as state_dir:
        return await _story(settings.model_copy(update={"state_dir": Path(state_dir)}), roster)


def _print_how_to_look(settings: Settings, state_dir: Path) -> None:
    url = redacted(settings.amqp_url)
    vhost = URL(settings.amqp_url).path.lstrip("/")
    print(
        f"Kept: vhost {vhost} and the mailboxes in {state_dir}. From a second terminal "
        "(put your password where *** is):\n"
        f"  export COVEY_HOME={settings.home} COVEY_AMQP_URL='{url}' COVEY_STATE_DIR={state_dir}\n"
        "  covey sessions; covey attach writer; covey runs\n"
        "  covey run writer & covey attach writer   # a live run, followed as it goes\n"
        f"Remove it with: rabbitmqctl delete_vhost {vhost}; rm -r {state_dir}"
    )


async def _story(settings: Settings, roster: Roster) -> int:
    started = time.monotonic()
    human = f"human:{sorted(roster.humans)[0]}"
    print(
        f"covey demo: {len(roster.agents)} agents and {len(roster.humans)} human(s) from "
        f"{settings.home}, broker {redacted(settings.amqp_url)}"
    )
    async with Namespace(settings, roster, "covey demo") as namespace:
        plan = await namespace.apply_topology()  # a fresh namespace: nothing left over
        person = namespace.handle(human)
        print(
            f"  topology: {len(plan.exchanges)} exchanges, {len(plan.queues)} queues, "
            f"{len(plan.bindings)} bindings"
        )
        question = await person.send("agent:scout", "Question: queues for agent mail?", QUESTION)
        print(f"  {human} -> agent:scout  {question.subject!r}  ({question.id[:12]})")

        for name in RUNS:
            if name == ATTACHED:
                result = await _run_attached(namespace, roster, name)
            else:
                print(f"  -- covey run {name}")
                result = await runner.run(namespace, roster.agent(name), echo=_prefixed(name))
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


async def _run_attached(namespace: Namespace, roster: Roster, name: str) -> runner.RunResult:
    """Run `name` with nothing echoed, and show its session as an attached client sees
    it: found through `session.opened`, followed on the broker until it closes."""
    from coordinator.session_reader import watch_sessions
    from coordinator.session_view import event_line

    print(f"  -- covey run {name}, followed live as `covey attach {name}` shows it")
    async with watch_sessions(namespace) as opened:
        running = asyncio.ensure_future(runner.run(namespace, roster.agent(name)))
        try:
            async with asyncio.timeout(ATTACH_WAIT_SECONDS):
                announced = await _opened_for(opened, name)
            assert announced.run_id is not None  # every session.opened names its run
            session = namespace.attach(announced.run_id)
            async with contextlib.aclosing(session):
                async for event_id, event in session:
                    if event.kind != "token":  # writer streams none; a line each otherwise
                        print(f"     [{name}] {event_line(event_id, event)}")
        finally:
            result = await running  # the run ends whatever the reader did
    return result


async def _opened_for(opened: AsyncIterator[Event], agent: str) -> Event:
    async for event in opened:
        if event.agent == agent:
            return event
    raise BrokerUnavailable("stopped hearing of sessions before the demo's run opened one")


def _prefixed(name: str) -> runner.Echo:
    def echo(lines: list[str]) -> None:
        for line in lines:
            print(f"     [{name}] {line}")

    return echo
