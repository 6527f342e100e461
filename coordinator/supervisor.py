"""`covey supervise`: the daemon that runs agents on cron, on mail, and on request.

It decides *when* to run; `runner.run` does each run (locks, preflight,
process, outcome). Three things ask for a run:

* a cron `schedule` in agent.toml, read in the configured time zone;
* mail for an agent with `wake_on_mail = true`: the supervisor binds a queue of
  its own to the agents' routing keys, so it sees a copy of each message as it
  is routed — without touching the agents' queues, which only the agents drain.
  A burst makes one run: requests within DEBOUNCE_SECONDS fold into one, and
  mail that arrives during a run makes one more run after it. A run that mail
  woke but that found its lock busy is tried again every `busy_retry` while
  that mail waits, so it is not left until more mail comes;
* a `run.requested.NAME` event (`covey run NAME --via-supervisor`).

It never runs an agent twice at once (and the agent's own lock makes sure of
that across supervisors and hosts). SIGTERM stops scheduling, lets running
agents finish within `shutdown_grace`, then stops them: their locks are freed
and their runs recorded as `stopped`. SIGHUP reloads the roster; a broken file
is reported and the agent keeps its previous definition.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from coordinator import runner, topology
from coordinator.envelope import Envelope, now
from coordinator.errors import CoveyError, InvalidEnvelope, TopologyMissing
from coordinator.events import Event
from coordinator.gateway import BROKER_ERRORS, RECONNECT_SECONDS, Gateway
from coordinator.logs import get_logger
from coordinator.metrics import Metrics
from coordinator.namespace import Namespace, Snapshot
from coordinator.roster import Agent, Roster
from coordinator.schedule import Schedule, next_due

log = get_logger(__name__)

DEBOUNCE_SECONDS = 0.3

Clock = Callable[[], datetime]


class Supervisor:
    def __init__(
        self, namespace: Namespace, metrics: Metrics | None = None, clock: Clock = now
    ) -> None:
        self.namespace = namespace
        self.metrics = metrics
        self.clock = clock
        self.running: dict[str, asyncio.Task[None]] = {}
        self._starting: set[str] = set()  # requested, waiting out the debounce
        self._again: dict[str, str] = {}  # asked for while running: run once more, and why
        self._stopping = asyncio.Event()  # no new runs
        self._stop_agents = asyncio.Event()  # the grace period is over
        # A reload tells the scheduler (new schedules) and the listener (new bindings).
        self._reschedule = asyncio.Event()
        self._resubscribe = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._left_out: set[str] = set()  # agents that cannot start as configured
        self._reloading = asyncio.Lock()

    @property
    def roster(self) -> Roster:
        return self.namespace.roster

    # -- the daemon's life ---------------------------------------------------------

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT; then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        await self.namespace.apply_topology()
        self._left_out = self._unlaunchable(self.roster)
        zone = self.namespace.settings.timezone
        log.info("supervising", agents=len(self.roster.agents), zone=zone)
        background = [
            asyncio.create_task(self._schedule()),
            asyncio.create_task(self._keep_subscribed()),
        ]
        if self.metrics is not None:
            await self.metrics.remember_last_runs()
            background.append(asyncio.create_task(self.metrics.refresh_until(self._stopping)))
        await self._stopping.wait()
        # Each background loop also ends on `_stopping` by itself: a cancel can be lost
        # in a broker call (on Python 3.11, asyncio.wait_for, which aio-pika and aiormq
        # use for their timeouts, drops one that comes as the call it wraps completes:
        # CPython gh-86296, fixed in 3.12), and a loop that missed its cancel would keep
        # the daemon from ever exiting.
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self._shutdown()

    def stop(self) -> None:
        log.info("stopping: no new runs; running agents get their grace period")
        self._stopping.set()
        self._reschedule.set()  # wakes the scheduler, which then sees `_stopping`

    async def _shutdown(self) -> None:
        grace = self.namespace.settings.shutdown_grace
        running = list(self.running.values())
        if running:
            _, late = await asyncio.wait(running, timeout=grace)
            if late:
                log.warning("grace period over: stopping agents", agents=sorted(self.running))
                self._stop_agents.set()
                await asyncio.wait(late)
        for task in list(self._tasks):
            task.cancel()

    async def reload(self) -> None:
        """Re-read settings and roster; what is broken keeps its old definition. One
        reload at a time; a failed one keeps everything as it was."""
        async with self._reloading:
            try:
                await self._reload()
            except Exception as err:  # a daemon reports a bad reload and runs on
                log.error("reload failed; keeping the old roster", problem=str(err))

    async def _reload(self) -> None:
        problems: dict[str, str] = {}
        fresh = self.namespace.read_again(problems)
        agents = dict(fresh.roster.agents)
        for name, problem in problems.items():
            kept = name in self.roster.agents
            log.error("broken agent definition", agent=name, problem=problem, kept_old=kept)
            if kept:
                agents[name] = self.roster.agents[name]
        merged = Roster(agents=agents, humans=fresh.roster.humans)
        # Swapped whole: a run that started before keeps the snapshot it took.
        old = self.namespace.swap(Snapshot(fresh.settings, merged))
        try:
            await self.namespace.apply_topology()
        except Exception:
            self.namespace.swap(old)
            raise
        self._left_out = self._unlaunchable(merged)
        self._reschedule.set()
        self._resubscribe.set()
        if self.metrics is not None:
            self.metrics.describe_roster()
        log.info("roster reloaded", agents=len(merged.agents))

    def _unlaunchable(self, roster: Roster) -> set[str]:
        """Agents that could not start (no command, no workdir): logged, and not run until
        a reload finds them fixed. They stay in the roster: their mail still counts."""
        left_out = set()
        for name, agent in roster.agents.items():
            try:
                runner.Launch.prepare(self.namespace.settings, agent, "check")
            except CoveyError as err:
                log.error("agent left out", agent=name, problem=str(err))
                left_out.add(name)
        return left_out

    # -- asking for runs --------------------------------------------------------------

    def request(self, name: str, trigger: str) -> None:
        """Ask for a run of `name`; folds into one already starting or running."""
        if self._stopping.is_set() or name not in self.roster.agents or name in self._left_out:
            return
        if name in self.running:
            if trigger != "schedule":  # a schedule tick during a run is simply skipped
                self._again[name] = trigger
            return
        if name in self._starting:
            return
        self._starting.add(name)
        delay = DEBOUNCE_SECONDS if trigger == "mail" else 0.0
        self._spawn(self._start(name, trigger, delay))

    async def _start(self, name: str, trigger: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self._starting.discard(name)
        if self._stopping.is_set() or name in self.running:
            return
        agent = self.roster.agents.get(name)
        if agent is not None:
            self.running[name] = asyncio.create_task(self._run(agent, trigger))

    async def _run(self, agent: Agent, trigger: str) -> None:
        try:
            observe = self.metrics.observe if self.metrics is not None else None
            result = await runner.run(
                self.namespace, agent, trigger, stop=self._stop_agents, observe=observe
            )
            log.info("run ended", agent=agent.name, outcome=str(result.outcome))
            if result.outcome is runner.Outcome.SKIPPED_BUSY and trigger == "mail":
                self._spawn(self._retry_while_mail_waits(agent))
        except CoveyError as err:  # bad input for this agent: the others keep running
            log.error("run not started", agent=agent.name, problem=str(err))
        except Exception:
            log.exception("run crashed", agent=agent.name)
        finally:
            del self.running[agent.name]
        if (again := self._again.pop(agent.name, None)) is not None:
            self.request(agent.name, again)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- cron ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        # Every moment here is an aware UTC datetime (see schedule.py): compared in one
        # zone, the hour that repeats when clocks go back would be taken for a later one.
        fired_up_to = self.clock()  # never fire a moment twice, even if a timer wakes early
        while not self._stopping.is_set():
            self._reschedule.clear()
            zone = self.namespace.settings.timezone
            schedules = {
                name: Schedule(agent.config.schedule, zone)
                for name, agent in self.roster.agents.items()
                if agent.config.schedule
            }
            due = next_due(schedules, max(self.clock(), fired_up_to))
            if due is None:
                await self._reschedule.wait()
                continue
            with contextlib.suppress(TimeoutError):
                seconds = max(0.0, (due.at - self.clock()).total_seconds())
                async with asyncio.timeout(seconds):
                    await self._reschedule.wait()
                continue  # the roster changed: recompute
            fired_up_to = due.at
            for name in due.names:
                log.info("schedule fired", agent=name, at=due.at.isoformat())
                self.request(name, "schedule")

    # -- mail and requests ----------------------------------------------------------------

    async def _keep_subscribed(self) -> None:
        """Watch for wake-up mail and run requests, reconnecting when the broker goes.

        While the broker is away it is tried every RECONNECT_SECONDS (a refused connect
        costs next to nothing), so work resumes within about a second of it answering;
        the outage is logged once when it starts and once when it ends."""
        down_since: float | None = None
        gone: str | None = None  # the node of the connection last lost: tried last
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                gateway = await Gateway.connect(
                    self.namespace.settings, "covey supervise", avoid=gone
                )
            except CoveyError as err:  # connect maps every failure to one
                if down_since is None:
                    down_since = loop.time()
                    log.warning(
                        "broker unreachable; retrying until it answers",
                        problem=str(err),
                        every_seconds=RECONNECT_SECONDS,
                    )
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            if down_since is not None:
                log.info("broker answers again", down_seconds=round(loop.time() - down_since, 1))
            closed = asyncio.Event()
            gateway.on_lost(closed.set)
            try:
                self._resubscribe.clear()
                await self._subscribe(gateway)  # first: mail from now on is seen
                log.info("watching for mail and run requests")
                down_since = None
                await self._wake_for_waiting_mail()  # then: mail sent while nobody watched
                waits = [
                    asyncio.create_task(event.wait())
                    for event in (self._resubscribe, closed, self._stopping)
                ]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
                if closed.is_set():
                    down_since = loop.time()
                    log.warning("lost the broker connection; reconnecting")
            except (*BROKER_ERRORS, CoveyError) as err:
                if down_since is None:
                    down_since = loop.time()
                    log.warning("lost the broker while subscribing; reconnecting", problem=str(err))
                await asyncio.sleep(RECONNECT_SECONDS)
            finally:
                gone = gateway.url if closed.is_set() else None
                await gateway.close()

    async def _subscribe(self, gateway: Gateway) -> None:
        """Listen for wake-up mail (a copy of what is routed to waking agents, their
        queues untouched) and for run requests, on one channel of `gateway`."""
        channel = await gateway.open_channel()  # it goes with the gateway
        wake_keys = sorted(self._wake_keys())
        await gateway.listen(channel, topology.MAIL_EXCHANGE, wake_keys, self._on_mail)
        await gateway.listen(
            channel, topology.EVENTS_EXCHANGE, ["run.requested.*"], self._on_request
        )

    async def _wake_for_waiting_mail(self) -> None:
        """Mail that arrived while nobody watched (start, reconnect, reload) wakes too."""
        for agent in self.roster.agents.values():
            if agent.config.wake_on_mail and await self._mail_waits(agent):
                self.request(agent.name, "mail")

    async def _retry_while_mail_waits(self, agent: Agent) -> None:
        await asyncio.sleep(self.namespace.settings.busy_retry)
        try:
            waiting = await self._mail_waits(agent)
        except CoveyError as err:  # the broker went: the reconnect will look again
            log.warning("could not look for waiting mail", agent=agent.name, problem=str(err))
            return
        if waiting:
            log.info("mail still waits after a busy lock; trying again", agent=agent.name)
            self.request(agent.name, "mail")

    async def _mail_waits(self, agent: Agent) -> bool:
        gateway = await self.namespace.gateway()
        try:  # waits out a queue whose node is still starting (right after a restart)
            queue = await gateway.queue(agent.address.queue)
        except TopologyMissing:  # not declared yet: no mail can wait in it
            return False
        await queue.channel.close()
        return bool(queue.declaration_result.message_count)

    def _wake_keys(self) -> set[str]:
        keys = set()
        for agent in self.roster.agents.values():
            if agent.config.wake_on_mail:
                keys.add(agent.address.routing_key)
                keys.update(f"team.{team}" for team in agent.config.teams)
                keys.add(topology.BROADCAST_KEY)
        return keys

    async def _on_mail(self, message: AbstractIncomingMessage) -> None:
        key = message.routing_key or ""
        try:
            sender = Envelope.from_delivery(message).sender
        except InvalidEnvelope:
            sender = None  # junk still wakes its recipient, whose drain dead-letters it
        for agent in self.roster.agents.values():
            config = agent.config
            if str(agent.address) == sender:
                continue  # its own post to its team or to all is no news to it
            if config.wake_on_mail and (
                key in (agent.address.routing_key, topology.BROADCAST_KEY)
                or key in {f"team.{team}" for team in config.teams}
            ):
                self.request(agent.name, "mail")

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        try:
            event = Event.model_validate_json(message.body)
        except ValidationError:
            log.warning("ignored a malformed run request", routing_key=message.routing_key)
            return
        if event.agent not in self.roster.agents:
            log.warning("run requested for an unknown agent", agent=event.agent)
            return
        asker = {"by": event.requested_by} if event.requested_by else {}  # no "by=None"
        log.info("run requested", agent=event.agent, **asker)
        self.request(event.agent, "request")
