"""One run of an agent, through the whole lifecycle:

    prepare -> locks -> preflight -> digest -> wait out a previous holder
      -> the agent's process -> advance its cursor -> release -> record

`covey run NAME` (the crontab form, no daemon needed) and `covey supervise`
both run agents through `run`. Each run takes the agent's own lock (so an
agent never runs twice at once, on any host) and the lock its agent.toml names
(`global` unless it says another, or `none`). Every run ends in a
`run.finished` event with its outcome, kept in the `covey.runs` stream.

A run goes by the `RunContext` it took when it started (settings and roster
included), and writes its agent's output on a thread of its own (`RunLog`). Once
the agent starts, its output is also published as the run's session (see
session_writer.py), without ever waiting for the broker: the run log stays the
durable copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

from coordinator import changelog, digest, logs, preflight
from coordinator.emit import EmitServer
from coordinator.errors import BadInput, BrokerUnavailable, CoveyError
from coordinator.events import Event
from coordinator.gateway import BROKER_ERRORS, translated
from coordinator.guard import Guard
from coordinator.identity import url_for
from coordinator.lock import HeldLock, Holder, Interrupted, LockBusy, LockSession, LockSpec
from coordinator.logs import get_logger
from coordinator.namespace import Namespace, Snapshot
from coordinator.outcome import Outcome as Outcome  # re-exported: `runner.Outcome` still works
from coordinator.roster import AGENT_FILE, INSTRUCTIONS_FILE, NO_LOCK, Agent
from coordinator.session import STREAM as SESSIONS
from coordinator.session_writer import SessionSummary, SessionWriter
from coordinator.settings import Settings
from coordinator.stopping import StopSignal, listening

log = get_logger(__name__)

CHUNK_BYTES = 64 * 1024
Echo = Callable[[list[str]], None]  # shows lines of the agent's output, as they come
Observer = Callable[[Event], None]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunResult:
    agent: str
    run_id: str
    trigger: str
    outcome: Outcome
    exit_code: int | None  # the agent's own, when it ran to the end
    reason: str | None
    duration: float
    log_path: Path | None

    def summary(self) -> str:
        said = f" ({self.reason})" if self.reason else ""
        code = f", exit {self.exit_code}" if self.exit_code is not None else ""
        return (
            f"{self.agent} run {self.run_id}: {self.outcome}{code} in {self.duration:.1f} s{said}"
        )


@dataclass(frozen=True, slots=True)
class Launch:
    """What starting an agent's process needs, checked before any lock is taken."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    run_dir: Path

    @classmethod
    def prepare(cls, settings: Settings, agent: Agent, run_id: str) -> Launch:
        where = agent.folder / AGENT_FILE
        command = agent.config.command
        if command is None:
            raise BadInput(f"{where}: command: missing; say what runs the agent")
        cwd = (agent.folder / (agent.config.workdir or ".")).resolve()
        if not cwd.is_dir():
            raise BadInput(f"{where}: workdir: {cwd} does not exist")
        run_dir = settings.expanded_state_dir / "runs" / agent.name
        # `covey` and the Python it runs under come first on PATH, so an agent started
        # by cron (whose PATH is short) can still call `covey inbox`.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        # The agent's own login (in a provisioned namespace), at every node: the list for
        # covey, its first entry for tools that take one URL (the two agree, as settings
        # require of a source that gives both).
        broker = settings.with_login(url_for(settings, agent.address))
        env = {
            **os.environ,
            **agent.config.env,
            "PATH": path,
            "COVEY_AGENT": agent.name,
            "COVEY_RUN_ID": run_id,
            "COVEY_AMQP_URL": broker.amqp_url,
            "COVEY_AMQP_URLS": ",".join(broker.broker_urls),
            "COVEY_STATE_DIR": str(settings.expanded_state_dir),
            "COVEY_DIGEST_FILE": str(run_dir / f"{run_id}.digest.md"),
        }
        if settings.home is not None:
            env["COVEY_HOME"] = str(settings.home)
        if isinstance(command, str):
            argv = ["/bin/sh", "-c", command]
        else:
            argv = [_executable(command[0], cwd, path, where), *command[1:]]
        return cls(argv=argv, cwd=cwd, env=env, run_dir=run_dir)


def _executable(program: str, cwd: Path, path: str, where: Path) -> str:
    if os.sep in program:
        candidate = (cwd / program).resolve()
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    elif found := shutil.which(program, path=path):
        return found
    raise BadInput(f"{where}: command: {program!r} is not an executable (on PATH or in {cwd})")


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class Ending:
    """How a run ended, before it is recorded."""

    outcome: Outcome
    reason: str | None = None
    exit_code: int | None = None  # the agent's own, when it ran to the end
    hook: str | None = None  # the preflight check that failed
    log_path: Path | None = None  # the agent's output, once it was started
    session: SessionSummary | None = None  # its session, once it was started
    stopped_by: str | None = None  # who asked it to stop, when `covey stop` did


class NotStarted(Exception):
    """The run ends before the agent's process starts: busy, a failing preflight check,
    a stop, a lost lock. Raised by the steps before the start; recorded once."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason)
        self.ending = ending


@dataclass(frozen=True, slots=True)
class RunContext:
    """What one run goes by, from its start to its record. `snapshot` is the settings and
    roster as they were when it started: a reload meanwhile (SIGHUP) changes nothing for
    it; the namespace is there for its broker connection."""

    namespace: Namespace
    snapshot: Snapshot
    agent: Agent
    trigger: str
    run_id: str
    launch: Launch
    wait_lock: float  # how long to wait for each lock
    stop: asyncio.Event  # set: stop the agent, or do not start it (SIGTERM, a supervisor's end)
    asked: StopSignal  # this run alone asked to stop, once it started (`covey stop`)
    echo: Echo | None
    record: _Recorder

    @classmethod
    def prepare(
        cls,
        namespace: Namespace,
        agent: Agent,
        trigger: str,
        *,
        wait_lock: float | None,
        stop: asyncio.Event | None,
        echo: Echo | None,
        observe: Observer | None,
    ) -> RunContext:
        """Bad input (no command, no workdir) raises BadInput here, before any lock."""
        snapshot = namespace.snapshot
        run_id = new_run_id()
        return cls(
            namespace=namespace,
            snapshot=snapshot,
            agent=agent,
            trigger=trigger,
            run_id=run_id,
            launch=Launch.prepare(snapshot.settings, agent, run_id),
            wait_lock=agent.config.wait_lock if wait_lock is None else wait_lock,
            stop=stop or asyncio.Event(),
            asked=StopSignal(),
            echo=echo,
            record=_Recorder(namespace, agent.name, run_id, trigger, observe),
        )

    @property
    def settings(self) -> Settings:
        return self.snapshot.settings

    @property
    def lock_specs(self) -> list[LockSpec]:
        """The agent's own lock first (its fencing token is the run's), then the one its
        agent.toml names, if any."""
        shared = configured_lock(self.settings, self.agent)
        return [LockSpec.for_agent(self.agent.name), *([shared] if shared else [])]


async def run(
    namespace: Namespace,
    agent: Agent,
    trigger: str = "manual",
    *,
    wait_lock: float | None = None,
    stop: asyncio.Event | None = None,
    echo: Echo | None = None,
    observe: Observer | None = None,
) -> RunResult:
    """Run `agent` once. Bad input (no command, no workdir) raises BadInput before any
    lock is taken; everything else ends as a RunResult with an outcome. `observe` sees
    each of the run's events as it happens (the supervisor's metrics count them)."""
    context = RunContext.prepare(
        namespace, agent, trigger, wait_lock=wait_lock, stop=stop, echo=echo, observe=observe
    )
    with logs.bound(agent=agent.name, run_id=context.run_id):
        return await _lifecycle(context)


async def _lifecycle(run: RunContext) -> RunResult:
    """The run after `RunContext.prepare`, step by step. A step that finds the agent must
    not start raises NotStarted; either way the locks are freed, then the run recorded."""
    # The crontab form may be the first thing to touch a namespace: make sure the
    # events exchange, the run records and the changelog exist (idempotent, cached).
    await run.namespace.ensure_participants([run.agent.address])
    holder = Holder.me(run.agent.name, run.run_id, run.namespace.settings.host)
    # Another lock connection is tried while the run's wait for its locks lasts.
    wait_until = time.monotonic() + run.wait_lock
    while True:
        try:
            ending = await _with_locks(run, holder)
            break
        except _TakingFailed as failed:
            # Leaving the block closed the lock session: the locks are free.
            await run.record.locks_released()
            if time.monotonic() >= wait_until or run.stop.is_set():
                ending = Ending(Outcome.LOCK_LOST, reason=str(failed))
                log.info("not run", outcome=str(ending.outcome), reason=ending.reason)
                break
            log.warning("trying again on a new lock connection", problem=str(failed))
            await asyncio.sleep(TAKE_RETRY_SECONDS)
    # Leaving the block closed the lock session: the locks are free before the bookkeeping.
    await run.record.locks_released()
    return await run.record.finished(ending)


TAKE_RETRY_SECONDS = 1.0  # between lock connections that failed while taking the locks


class _TakingFailed(Exception):
    """The lock connection failed while the locks were being taken, before the agent
    started: another connection may take them (within the run's wait for its locks)."""


async def _with_locks(run: RunContext, holder: Holder) -> Ending:
    """The run on one lock connection, from taking the locks to the agent's end."""
    async with await LockSession.open(run.settings, holder) as locks:
        try:
            await _take_locks(run, locks)
            await _preflight(run)
            news = await _digest(run)
            _hand_out_fencing_tokens(run, locks)
            await _outwait_previous_holders(run, locks)
            _check_clear_to_start(run, locks)
            ending = await _execute(run, locks, news.text)
            if ending.outcome is Outcome.OK and news.upto is not None and locks.valid():
                # Still under the agent's lock: nobody else moves this cursor meanwhile.
                await _advance(locks, run.agent, news.upto)
        except NotStarted as not_started:
            ending = not_started.ending
            log.info("not run", outcome=str(ending.outcome), reason=ending.reason)
    return ending


async def _take_locks(run: RunContext, locks: LockSession) -> None:
    """Each lock in turn, with one wait for each: `--wait-lock` waits for another run of
    this same agent too, not only for the lock it shares with others.

    A broker error here has closed the lock connection (RabbitMQ answers a read of a
    holder note whose quorum queue has lost its leader, and is electing another, with a
    connection error: INTERNAL_ERROR, nodedown), and with it every lock taken so far."""
    try:
        for spec in run.lock_specs:
            asked = time.monotonic()
            taken = await locks.acquire(spec, wait=run.wait_lock, stop=run.stop)
            await run.record.lock_acquired(taken, time.monotonic() - asked)
    except (LockBusy, Interrupted) as not_now:
        outcome = Outcome.SKIPPED_BUSY if isinstance(not_now, LockBusy) else Outcome.STOPPED
        raise NotStarted(Ending(outcome, reason=str(not_now))) from not_now
    except (*BROKER_ERRORS, BrokerUnavailable) as err:  # the latter: a note unconfirmed
        raise _TakingFailed(f"the lock connection failed while taking the locks: {err}") from err


async def _preflight(run: RunContext) -> None:
    """The agent's preflight checks, in order; the first that fails skips the run."""
    for hook in run.agent.config.preflight:
        if reason := await preflight.failure(hook, run.launch.cwd, run.launch.env):
            raise NotStarted(Ending(Outcome.SKIPPED_PREFLIGHT, reason=reason, hook=hook.label))
    if run.stop.is_set():  # asked to stop during the checks: don't start
        raise NotStarted(Ending(Outcome.STOPPED, reason=STOPPED_BEFORE_START))


STOPPED_BEFORE_START = "told to stop before it started"


def _hand_out_fencing_tokens(run: RunContext, locks: LockSession) -> None:
    """To the agent, in its environment, and to the run's events."""
    tokens = {lock.spec.name: lock.token for lock in locks.held}
    run.launch.env["COVEY_FENCING_TOKEN"] = str(tokens[run.lock_specs[0].name])  # its own lock's
    run.launch.env["COVEY_FENCING_TOKENS"] = ",".join(f"{k}={v}" for k, v in tokens.items())
    run.record.tokens = tokens


async def _outwait_previous_holders(run: RunContext, locks: LockSession) -> None:
    """Where a lock's previous holder did not release it cleanly, its agent may still be
    running until its guard stops it: wait out that bound (the lease, the guard's kill
    grace and a margin) before starting ours. The run's events say how long that was."""
    wait = max((lock.takeover_wait() for lock in locks.held), default=0.0)
    if wait <= 0:
        return
    names = ", ".join(lock.spec.name for lock in locks.held if lock.takeover)
    log.info(
        "waiting out the lease of a previous holder that did not release",
        locks=names,
        wait_seconds=round(wait, 2),
    )
    started = time.monotonic()
    lost = asyncio.create_task(locks.lost.wait())
    stopped = asyncio.create_task(run.stop.wait())
    try:
        await asyncio.wait({lost, stopped}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        stopped.cancel()
    run.record.lease_wait = round(time.monotonic() - started, 3) or None


def _check_clear_to_start(run: RunContext, locks: LockSession) -> None:
    """The last word before the agent starts: the locks still ours, no stop asked for."""
    if not locks.valid():
        raise NotStarted(Ending(Outcome.LOCK_LOST, reason="lost the lock before the agent started"))
    if run.stop.is_set():
        raise NotStarted(Ending(Outcome.STOPPED, reason=STOPPED_BEFORE_START))


async def _digest(run: RunContext) -> digest.Digest:
    """The changelog digest for this run; a broker hiccup here costs the digest, not the run."""
    agent = run.agent
    try:
        gateway = await run.namespace.gateway()
        senders = run.snapshot.senders  # who may write as whom
        with translated("read the changelog"):
            return await digest.build(
                gateway, agent.name, agent.config.digest, str(agent.address), senders
            )
    except CoveyError as err:
        log.warning("no digest for this run", agent=agent.name, error=str(err))
        return digest.Digest(agent=agent.name, cursor=None, upto=None, text="")


def _inject(launch: Launch, agent: Agent, text: str) -> bytes | None:
    """Put the digest where the agent reads it; return what goes on its stdin, if anything.
    (Files: run off the event loop.)"""
    launch.run_dir.mkdir(parents=True, exist_ok=True)
    Path(launch.env["COVEY_DIGEST_FILE"]).write_text(text)
    if agent.config.instructions:
        agent_md = agent.folder / INSTRUCTIONS_FILE
        own = agent_md.read_text() if agent_md.is_file() else ""
        rendered = digest.instructions(own, text, digest.uses_covey_mcp(launch.cwd))
        (launch.cwd / agent.config.instructions).write_text(rendered)
    return text.encode() if agent.config.inject == "stdin" else None


async def _advance(locks: LockSession, agent: Agent, offset: int) -> None:
    """Written over the lock connection, so fenced by the broker itself: once it has
    freed the lock (and so closed that connection), a stalled run can write nothing."""
    try:
        with translated("move the changelog cursor"):
            await changelog.advance(locks.gateway, agent.name, offset)
    except CoveyError as err:
        log.warning("cursor not advanced; the next run repeats this news", error=str(err))


def configured_lock(settings: Settings, agent: Agent) -> LockSpec | None:
    name = agent.config.lock
    if name == NO_LOCK:
        return None
    config = settings.locks.get(name)
    return LockSpec(name, config.slots if config else 1)


class _Recorder:
    """Publishes a run's events, and shows each to `observe`; a broker hiccup here is
    logged, never fatal to the run."""

    def __init__(
        self,
        namespace: Namespace,
        agent: str,
        run_id: str,
        trigger: str,
        observe: Observer | None,
    ) -> None:
        self.namespace, self.agent, self.run_id, self.trigger = namespace, agent, run_id, trigger
        self.host = namespace.settings.host
        self.started_at = time.monotonic()
        self.observe = observe
        self._acquired: dict[str, float] = {}  # when each lock was taken, by name, in order
        self.tokens: dict[str, int] = {}  # fencing tokens, by lock, once all are taken
        self.lease_wait: float | None = None  # spent waiting out a previous holder's lease

    async def _publish(self, event: Event) -> None:
        if self.observe is not None:
            self.observe(event)
        try:
            await (await self.namespace.gateway()).publish_event(event)
        except CoveyError as err:
            log.warning("could not publish event", kind=event.kind, error=str(err))

    @property
    def token(self) -> int | None:
        """The fencing token of the agent's own lock (taken first)."""
        return next(iter(self.tokens.values()), None)

    async def lock_acquired(self, lock: HeldLock, waited: float) -> None:
        self._acquired[lock.spec.name] = time.monotonic()
        await self._publish(
            Event(
                kind="lock.acquired",
                host=self.host,
                lock=lock.spec.name,
                agent=self.agent,
                run_id=self.run_id,
                wait_seconds=round(waited, 4),
                fencing_token=lock.token,
                takeover=lock.takeover or None,
            )
        )

    async def locks_released(self) -> None:
        """Every lock `lock_acquired` recorded, in the order they were taken."""
        released = time.monotonic()
        for name, taken in self._acquired.items():
            await self._publish(
                Event(
                    kind="lock.released",
                    host=self.host,
                    lock=name,
                    agent=self.agent,
                    run_id=self.run_id,
                    held_seconds=round(released - taken, 4),
                )
            )
        self._acquired.clear()

    async def started(self) -> None:
        await self._publish(
            Event(
                kind="run.started",
                host=self.host,
                agent=self.agent,
                run_id=self.run_id,
                trigger=self.trigger,
                fencing_token=self.token,
                fencing_tokens=self.tokens or None,
                lease_wait_seconds=self.lease_wait,
            )
        )

    async def finished(self, ending: Ending) -> RunResult:
        duration = time.monotonic() - self.started_at
        await self._publish(
            Event(
                kind="run.finished",
                host=self.host,
                agent=self.agent,
                run_id=self.run_id,
                trigger=self.trigger,
                outcome=str(ending.outcome),
                exit_code=ending.exit_code,
                duration_seconds=round(duration, 3),
                reason=ending.reason,
                hook=ending.hook,
                stopped_by=ending.stopped_by,
                fencing_token=self.token,
                fencing_tokens=self.tokens or None,
                lease_wait_seconds=self.lease_wait,
                **_session_fields(ending.session),
            )
        )
        return RunResult(
            self.agent,
            self.run_id,
            self.trigger,
            ending.outcome,
            ending.exit_code,
            ending.reason,
            duration,
            ending.log_path,
        )


def _session_fields(session: SessionSummary | None) -> dict[str, Any]:
    """What `run.finished` says of the run's session: where it is, and what it lacks."""
    if session is None:  # the agent never started: no session
        return {}
    return {
        "stream": SESSIONS,
        "first_id": session.first_id,
        "since": session.since,
        "session_missing": session.session_missing,
    }


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _before_exec(parent: int, guard: Guard) -> Callable[[], None]:
    """What the agent's process does between fork and exec.

    It tells its guard which process group to stop (before the agent runs a line of
    its own, so no stall of `covey run` can leave it unguarded). And on Linux it has
    the kernel SIGKILL it when its run dies, even by kill -9: a dead run's lock is free
    at once, so an agent that outlived it would run beside the next run of itself.
    (The guard then stops the rest of its process group.)
    """
    arm_pdeathsig: Callable[[], None] | None = None
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # loaded here, not between fork and exec

        def arm_pdeathsig() -> None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def before_exec() -> None:
        guard.announce_from_child()
        if arm_pdeathsig is not None:
            arm_pdeathsig()
            if os.getppid() != parent:  # the run died before the line above took effect
                os._exit(1)

    return before_exec


async def _execute(run: RunContext, locks: LockSession, news: str) -> Ending:
    """Start the agent's process, guarded, and see it to its end; its output goes to the
    run's log, all of it written and the file closed before this returns. From just
    before `run.started` is recorded, a stop request for the run is heard."""
    senders = run.snapshot.senders
    async with listening(run.namespace, run.agent.name, run.run_id, run.asked, senders):
        await run.record.started()
        return await _execute_heard(run, locks, news)


async def _execute_heard(run: RunContext, locks: LockSession, news: str) -> Ending:
    log_path = run.launch.run_dir / f"{run.run_id}.log"
    log.info("started", command=run.launch.argv, log=str(log_path))
    session: SessionWriter | None = None
    try:
        stdin = await asyncio.to_thread(_inject, run.launch, run.agent, news)
        session = SessionWriter.open(
            run.settings,
            run.agent.name,
            run.run_id,
            log_path,
            command=run.launch.argv,
            trigger=run.trigger,
        )
        # What the agent emits joins its output in the session, in order, with seqs.
        emitted = await EmitServer.start(run.launch.run_dir, run.run_id, session.emitted)
        # Closed before the session is: nothing the agent emits can follow `closed`.
        async with emitted, RunLog(log_path) as output:
            run.launch.env.update(emitted.env)  # COVEY_SESSION_SOCKET, for `covey emit`
            ending = await _guarded(run, locks, output, session, stdin)
        if output.failure is not None and ending.outcome in (Outcome.OK, Outcome.FAILED):
            # It may have done its work, but nobody can read what it said: not `ok`.
            ending = Ending(Outcome.FAILED, exit_code=ending.exit_code, reason=output.failure)
    except OSError as err:  # a full disk, an unreadable AGENT.md, an exec that fails
        ending = Ending(Outcome.FAILED, reason=f"could not run it: {err}")
    except BaseException:  # cancelled (a supervisor shutting down): no session to finish
        if session is not None:
            session.abandon()
        raise
    if session is not None:  # bounded: a broker that is away delays the record by seconds
        summary = await session.close(str(ending.outcome), ending.exit_code, ending.reason)
        ending = dataclasses.replace(ending, session=summary)
    log.info("finished", outcome=str(ending.outcome), exit_code=ending.exit_code)
    return dataclasses.replace(ending, log_path=log_path)


async def _guarded(
    run: RunContext,
    locks: LockSession,
    output: RunLog,
    session: SessionWriter,
    stdin: bytes | None,
) -> Ending:
    """Run the process, guarded, to its end, its timeout, a lost lock or a stop; say which."""
    guard = await Guard.start(locks.valid_until, f"{run.agent.name} run {run.run_id}")
    locks.on_renew.append(guard.renew)
    try:
        launch = run.launch
        process = await asyncio.create_subprocess_exec(
            *launch.argv,
            cwd=launch.cwd,
            env=launch.env,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout ends its children too
            preexec_fn=_before_exec(os.getpid(), guard),
        )
        return await _supervise(process, run, locks, guard, output, session, stdin)
    finally:
        locks.on_renew.remove(guard.renew)
        await guard.finish()


async def _supervise(
    process: asyncio.subprocess.Process,
    run: RunContext,
    locks: LockSession,
    guard: Guard,
    output: RunLog,
    session: SessionWriter,
    stdin: bytes | None,
) -> Ending:
    assert process.stdout is not None
    pump = asyncio.create_task(_pump(process.stdout, output, session, run.echo))
    feeding = None
    if stdin is not None:
        assert process.stdin is not None
        feeding = asyncio.create_task(_feed(process.stdin, stdin))
    exited = asyncio.create_task(process.wait())
    lost = asyncio.create_task(locks.lost.wait())
    stopped = asyncio.create_task(run.stop.wait())
    asked = asyncio.create_task(run.asked.wait())
    unguarded = asyncio.create_task(guard.process.wait())
    config = run.agent.config
    try:
        done, _ = await asyncio.wait(
            {exited, lost, stopped, asked, unguarded},
            timeout=config.timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        # A run that wakes from a stall past its lease has lost its locks, whatever
        # else it finds done (its guard has stopped the agent meanwhile).
        if not locks.valid():
            await _terminate(process, config.grace)
            return Ending(Outcome.LOCK_LOST, reason=LOCK_LOST_REASON)
        if exited in done:
            code = exited.result()
            return Ending(Outcome.OK if code == 0 else Outcome.FAILED, exit_code=code)
        await _terminate(process, config.grace)
        if stopped in done:
            return Ending(Outcome.STOPPED, reason="told to stop; the agent was stopped")
        if asked in done and (request := run.asked.request) is not None:
            return Ending(Outcome.STOPPED, reason=request.describe(), stopped_by=request.by)
        if unguarded in done:
            return Ending(Outcome.FAILED, reason="its guard process died; the agent was stopped")
        return Ending(Outcome.TIMEOUT, reason=f"ran past its {config.timeout:g} s timeout")
    finally:
        await _wind_down(pump, exited, lost, stopped, asked, unguarded, feeding)


async def _wind_down(pump: asyncio.Task[None], *watchers: asyncio.Task[object] | None) -> None:
    """Once the agent is done: stop watching it, and let its last output through."""
    for task in watchers:
        if task is not None:
            task.cancel()
    # Output still buffered is worth keeping; a child that holds the pipe open is not
    # worth waiting for.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            await asyncio.shield(pump)
    pump.cancel()


LOCK_LOST_REASON = "the lock connection dropped or its lease lapsed; the agent was stopped"


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    """Write the digest to the agent's stdin and close it; an agent that does not read
    it is its own business."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        pipe.write(data)
        await pipe.drain()
    pipe.close()


async def _pump(
    stream: asyncio.StreamReader, output: RunLog, session: SessionWriter, echo: Echo | None
) -> None:
    """Copy the agent's output line by line, timestamped, to its run log, its session
    (and `echo`).

    It reads chunks, not lines, so a line of any length (a model dumping a JSON blob
    on one line) is copied too, rather than overrunning the reader's line limit."""
    pending = b""
    while chunk := await stream.read(CHUNK_BYTES):
        *lines, pending = (pending + chunk).split(b"\n")
        await _copy_lines(lines, output, session, echo)
    if pending:
        await _copy_lines([pending], output, session, echo)


async def _copy_lines(
    raw: list[bytes], output: RunLog, session: SessionWriter, echo: Echo | None
) -> None:
    if not raw:
        return  # a chunk with no line end yet
    lines = [line.decode(errors="replace") for line in raw]
    arrived = datetime.now(UTC)
    session.lines(lines, arrived)  # queued in memory: it never waits for the broker
    at = arrived.isoformat(timespec="milliseconds")
    await output.write([f"{at} {line}\n" for line in lines])
    if echo is not None:
        echo(lines)  # the chunk's lines together: a fast agent's are hundreds


class RunLog:
    """A run's output file, written on a thread of the run's own: a slow disk holds up
    this run's copying, never the event loop, which serves every other run (and this
    run's lock lease). Each batch of lines is written and flushed before the next is
    read, so lines keep their order, and a slow disk slows the agent (its pipe fills)
    rather than piling its output up in memory. Use `async with`: leaving it waits
    until every line is written and the file closed.

    A write that fails (a full disk) costs the log, not the run: the rest of the output
    is still read — an agent blocked on a full pipe would hold its locks until its
    timeout — but dropped and counted, and `failure` says what was lost and why."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covey-run-log")
        self._file: IO[str] | None = None
        self._error: OSError | None = None
        self._lost = 0  # lines not in the log because of `_error`

    async def __aenter__(self) -> RunLog:
        try:
            self._file = await self._on_thread(partial(self.path.open, "a", encoding="utf-8"))
        except BaseException:
            self._thread.shutdown(wait=False)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._file is not None
        try:
            # Queued behind any write still under way (one thread, first come first served).
            await self._on_thread(self._file.close)
        except OSError as err:  # flushing the last lines failed (the file is closed anyway)
            self._error = self._error or err
        finally:
            self._thread.shutdown(wait=False)  # nothing is left for it: it ends by itself

    async def write(self, lines: list[str]) -> None:
        if self._error is None:
            try:
                await self._on_thread(partial(self._write, lines))
                return
            except OSError as err:
                self._error = err
                log.warning("run log unwritable; the rest of the output is dropped", error=str(err))
        self._lost += len(lines)  # at worst a few of these reached the file before it failed

    @property
    def failure(self) -> str | None:
        """Why the log is incomplete, if it is."""
        if self._error is None:
            return None
        return (
            f"could not write its output to {self.path} ({self._error.strerror or self._error}); "
            f"{self._lost} lines lost"
        )

    def _write(self, lines: list[str]) -> None:  # on the thread
        assert self._file is not None
        self._file.writelines(lines)
        self._file.flush()

    async def _on_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)


async def _terminate(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the whole process group, give it `grace` seconds, then SIGKILL what is left."""
    group = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(group):
        if process.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await process.wait()
        else:  # the leader is gone; a child that ignores SIGTERM gets the rest of the grace
            await asyncio.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    await process.wait()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
