"""One run of an agent, through the whole lifecycle:

    locks -> preflight -> digest -> the agent's process -> outcome -> release

`covey run NAME` (the crontab form, no daemon needed) and `covey supervise`
both run agents through `run`. Each run takes the agent's own lock (so an
agent never runs twice at once, on any host) and the lock its agent.toml names
(`global` unless it says another, or `none`). Every run ends in a
`run.finished` event with its outcome, kept in the `covey.runs` stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import structlog

from coordinator import changelog, digest, preflight
from coordinator.errors import BadInput, CoveyError
from coordinator.events import Event
from coordinator.gateway import translated
from coordinator.guard import Guard
from coordinator.identity import url_for
from coordinator.lock import HeldLock, Holder, Interrupted, LockBusy, LockSession, LockSpec
from coordinator.logs import get_logger
from coordinator.namespace import Namespace
from coordinator.outcome import Outcome as Outcome  # re-exported: `runner.Outcome` still works
from coordinator.roster import AGENT_FILE, INSTRUCTIONS_FILE, NO_LOCK, Agent
from coordinator.settings import Settings

log = get_logger(__name__)

CHUNK_BYTES = 64 * 1024
Echo = Callable[[str], None]
Observer = Callable[[Event], None]


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
        env = {
            **os.environ,
            **agent.config.env,
            "PATH": path,
            "COVEY_AGENT": agent.name,
            "COVEY_RUN_ID": run_id,
            "COVEY_AMQP_URL": url_for(settings, agent.address),
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
    run_id = new_run_id()
    launch = Launch.prepare(namespace.settings, agent, run_id)
    with structlog.contextvars.bound_contextvars(agent=agent.name, run_id=run_id):
        return await _lifecycle(
            namespace, agent, trigger, run_id, launch, wait_lock, stop, echo, observe
        )


async def _lifecycle(
    namespace: Namespace,
    agent: Agent,
    trigger: str,
    run_id: str,
    launch: Launch,
    wait_lock: float | None,
    stop: asyncio.Event | None,
    echo: Echo | None,
    observe: Observer | None,
) -> RunResult:
    started = time.monotonic()
    record = _Recorder(namespace, agent.name, run_id, trigger, started, observe)
    # The crontab form may be the first thing to touch a namespace: make sure the
    # events exchange, the run records and the changelog exist (idempotent, cached).
    await namespace.ensure_participants([agent.address])

    async with await LockSession.open(namespace.settings, Holder.me(agent.name, run_id)) as locks:
        try:
            specs = [LockSpec.for_agent(agent.name)]
            # One wait for every lock the run needs: `--wait-lock` waits for another run
            # of this same agent too, not only for the lock it shares with others.
            wait = agent.config.wait_lock if wait_lock is None else wait_lock
            waits = [wait]
            if (spec := configured_lock(namespace.settings, agent)) is not None:
                specs.append(spec)
                waits.append(wait)
            for spec, wait in zip(specs, waits, strict=True):
                asked = time.monotonic()
                taken = await locks.acquire(spec, wait=wait, stop=stop)
                await record.lock_acquired(taken, time.monotonic() - asked)
        except (LockBusy, Interrupted) as not_now:
            held = list(locks.held)
            await locks.close()  # free what was taken before announcing it
            await record.locks_released(held)
            outcome = Outcome.SKIPPED_BUSY if isinstance(not_now, LockBusy) else Outcome.STOPPED
            log.info("not run", outcome=str(outcome), reason=str(not_now))
            return await record.finished(outcome, reason=str(not_now))
        held = list(locks.held)

        for hook in agent.config.preflight:
            if reason := await preflight.failure(hook, launch.cwd, launch.env):
                await locks.close()  # free the locks at once, not after the bookkeeping
                await record.locks_released(held)
                log.info("skipped, preflight failed", reason=reason)
                return await record.finished(
                    Outcome.SKIPPED_PREFLIGHT, reason=reason, hook=hook.label
                )
        if stop is not None and stop.is_set():  # asked to stop during the checks: don't start
            await locks.close()
            await record.locks_released(held)
            return await record.finished(Outcome.STOPPED, reason="told to stop before it started")

        news = await _digest(namespace, agent)
        tokens = {lock.spec.name: lock.token for lock in held}
        launch.env["COVEY_FENCING_TOKEN"] = str(tokens[specs[0].name])  # the agent's own lock
        launch.env["COVEY_FENCING_TOKENS"] = ",".join(f"{k}={v}" for k, v in tokens.items())
        record.tokens = tokens
        if waited := await _outwait_previous_holders(held, locks, stop):
            record.lease_wait = waited
        if not locks.valid() or (stop is not None and stop.is_set()):
            lost = not locks.valid()
            await locks.close()
            await record.locks_released(held)
            outcome = Outcome.LOCK_LOST if lost else Outcome.STOPPED
            reason = (
                "lost the lock before the agent started"
                if lost
                else "told to stop before it started"
            )
            return await record.finished(outcome, reason=reason)
        await record.started()
        log_path = launch.run_dir / f"{run_id}.log"
        log.info("started", command=launch.argv, log=str(log_path))
        try:
            stdin = _inject(launch, agent, news.text)
            with log_path.open("a", encoding="utf-8") as output:
                outcome, code, reason = await _execute(
                    launch, agent, locks, stop or asyncio.Event(), output, echo, stdin
                )
        except OSError as err:  # a full disk, an unreadable AGENT.md, an exec that fails
            outcome, code, reason = Outcome.FAILED, None, f"could not run it: {err}"
        if outcome is Outcome.OK and news.upto is not None and locks.valid():
            # Still under the agent's lock: nobody else moves this cursor meanwhile.
            await _advance(locks, agent, news.upto)
    await record.locks_released(held)
    log.info("finished", outcome=str(outcome), exit_code=code)
    return await record.finished(outcome, exit_code=code, reason=reason, log_path=log_path)


async def _outwait_previous_holders(
    held: list[HeldLock], locks: LockSession, stop: asyncio.Event | None
) -> float | None:
    """Where a lock's previous holder did not release it cleanly, its agent may still be
    running until its guard stops it: wait out that bound (the lease, the guard's kill
    grace and a margin) before starting ours. Returns how long that was, if at all."""
    wait = max((lock.takeover_wait() for lock in held), default=0.0)
    if wait <= 0:
        return None
    names = ", ".join(lock.spec.name for lock in held if lock.takeover)
    log.info(
        "waiting out the lease of a previous holder that did not release",
        locks=names,
        wait_seconds=round(wait, 2),
    )
    started = time.monotonic()
    lost = asyncio.create_task(locks.lost.wait())
    stopped = asyncio.create_task((stop or asyncio.Event()).wait())
    try:
        await asyncio.wait({lost, stopped}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        stopped.cancel()
    return round(time.monotonic() - started, 3)


async def _digest(namespace: Namespace, agent: Agent) -> digest.Digest:
    """The changelog digest for this run; a broker hiccup here costs the digest, not the run."""
    try:
        gateway = await namespace.gateway()
        senders = namespace.snapshot.senders  # who may write as whom
        with translated("read the changelog"):
            return await digest.build(
                gateway, agent.name, agent.config.digest, str(agent.address), senders
            )
    except CoveyError as err:
        log.warning("no digest for this run", agent=agent.name, error=str(err))
        return digest.Digest(agent=agent.name, cursor=None, upto=None, text="")


def _inject(launch: Launch, agent: Agent, text: str) -> bytes | None:
    """Put the digest where the agent reads it; return what goes on its stdin, if anything."""
    launch.run_dir.mkdir(parents=True, exist_ok=True)
    Path(launch.env["COVEY_DIGEST_FILE"]).write_text(text)
    if agent.config.instructions:
        agent_md = agent.folder / INSTRUCTIONS_FILE
        own = agent_md.read_text() if agent_md.is_file() else ""
        (launch.cwd / agent.config.instructions).write_text(digest.instructions(own, text))
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
        started: float,
        observe: Observer | None,
    ) -> None:
        self.namespace, self.agent, self.run_id, self.trigger = namespace, agent, run_id, trigger
        self.started_at = started
        self.observe = observe
        self._acquired: dict[str, float] = {}
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
                lock=lock.spec.name,
                agent=self.agent,
                run_id=self.run_id,
                wait_seconds=round(waited, 4),
                fencing_token=lock.token,
                takeover=lock.takeover or None,
            )
        )

    async def locks_released(self, held: list[HeldLock]) -> None:
        for lock in held:
            taken = self._acquired.pop(lock.spec.name, None)
            await self._publish(
                Event(
                    kind="lock.released",
                    lock=lock.spec.name,
                    agent=self.agent,
                    run_id=self.run_id,
                    held_seconds=None if taken is None else round(time.monotonic() - taken, 4),
                )
            )

    async def started(self) -> None:
        await self._publish(
            Event(
                kind="run.started",
                agent=self.agent,
                run_id=self.run_id,
                trigger=self.trigger,
                fencing_token=self.token,
                fencing_tokens=self.tokens or None,
                lease_wait_seconds=self.lease_wait,
            )
        )

    async def finished(
        self,
        outcome: Outcome,
        *,
        exit_code: int | None = None,
        reason: str | None = None,
        hook: str | None = None,
        log_path: Path | None = None,
    ) -> RunResult:
        duration = time.monotonic() - self.started_at
        await self._publish(
            Event(
                kind="run.finished",
                agent=self.agent,
                run_id=self.run_id,
                trigger=self.trigger,
                outcome=str(outcome),
                exit_code=exit_code,
                duration_seconds=round(duration, 3),
                reason=reason,
                hook=hook,
                fencing_token=self.token,
                fencing_tokens=self.tokens or None,
                lease_wait_seconds=self.lease_wait,
            )
        )
        return RunResult(
            self.agent, self.run_id, self.trigger, outcome, exit_code, reason, duration, log_path
        )


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


async def _execute(
    launch: Launch,
    agent: Agent,
    locks: LockSession,
    stop: asyncio.Event,
    output: IO[str],
    echo: Echo | None,
    stdin: bytes | None,
) -> tuple[Outcome, int | None, str | None]:
    """Run the process, guarded, to its end, its timeout, a lost lock or a stop; say which."""
    guard = await Guard.start(locks.valid_until, f"{agent.name} run {launch.env['COVEY_RUN_ID']}")
    locks.on_renew.append(guard.renew)
    try:
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
        return await _supervise(process, agent, locks, guard, stop, output, echo, stdin)
    finally:
        locks.on_renew.remove(guard.renew)
        await guard.finish()


async def _supervise(
    process: asyncio.subprocess.Process,
    agent: Agent,
    locks: LockSession,
    guard: Guard,
    stop: asyncio.Event,
    output: IO[str],
    echo: Echo | None,
    stdin: bytes | None,
) -> tuple[Outcome, int | None, str | None]:
    assert process.stdout is not None
    pump = asyncio.create_task(_pump(process.stdout, output, echo))
    feeding = None
    if stdin is not None:
        assert process.stdin is not None
        feeding = asyncio.create_task(_feed(process.stdin, stdin))
    exited = asyncio.create_task(process.wait())
    lost = asyncio.create_task(locks.lost.wait())
    stopped = asyncio.create_task(stop.wait())
    unguarded = asyncio.create_task(guard.process.wait())
    try:
        done, _ = await asyncio.wait(
            {exited, lost, stopped, unguarded},
            timeout=agent.config.timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        # A run that wakes from a stall past its lease has lost its locks, whatever
        # else it finds done (its guard has stopped the agent meanwhile).
        if not locks.valid():
            await _terminate(process, agent.config.grace)
            return Outcome.LOCK_LOST, None, LOCK_LOST_REASON
        if exited in done:
            code = exited.result()
            return (Outcome.OK if code == 0 else Outcome.FAILED), code, None
        await _terminate(process, agent.config.grace)
        if stopped in done:
            return Outcome.STOPPED, None, "told to stop; the agent was stopped"
        if unguarded in done:
            return Outcome.FAILED, None, "its guard process died; the agent was stopped"
        return Outcome.TIMEOUT, None, f"ran past its {agent.config.timeout:g} s timeout"
    finally:
        for task in (exited, lost, stopped, unguarded, feeding):
            if task is not None:
                task.cancel()
        # Output still buffered is worth keeping; a child that holds the pipe open is not
        # worth waiting for.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pump), 2.0)
        pump.cancel()


LOCK_LOST_REASON = "the lock connection dropped or its lease lapsed; the agent was stopped"


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    """Write the digest to the agent's stdin and close it; an agent that does not read
    it is its own business."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        pipe.write(data)
        await pipe.drain()
    pipe.close()


async def _pump(stream: asyncio.StreamReader, output: IO[str], echo: Echo | None) -> None:
    """Copy the agent's output line by line, timestamped, to its run log (and `echo`).

    It reads chunks, not lines, so a line of any length (a model dumping a JSON blob
    on one line) is copied too, rather than overrunning the reader's line limit."""
    pending = b""
    while chunk := await stream.read(CHUNK_BYTES):
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            _copy_line(raw, output, echo)
    if pending:
        _copy_line(pending, output, echo)


def _copy_line(raw: bytes, output: IO[str], echo: Echo | None) -> None:
    line = raw.decode(errors="replace")
    output.write(f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {line}\n")
    output.flush()
    if echo is not None:
        echo(line)


async def _terminate(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the whole process group, give it `grace` seconds, then SIGKILL what is left."""
    group = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(group):
        if process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 0.1)
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
