"""What every figure shares: the Figure record, interleaved repetitions, namespaces (vhosts)
on the broker under test, covey homes, and reading a process's CPU and memory."""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from conftest import ManagementAdmin
from yarl import URL

COVEY = str(Path(sys.executable).parent / "covey")
# The environment the bench was started in, before `cache_bytecode` changed it.
ORIGINAL_ENV = dict(os.environ)
PYTHON = sys.executable
BODY_512 = ("covey bench " * 43)[:512]  # 512 bytes of UTF-8 text


# -- figures ----------------------------------------------------------------------------


@dataclass
class Figure:
    """One row of the table: covey's median against raw aio-pika's, and the target.

    The target is met when every limit given holds: `max_value` (covey's figure,
    in `unit`), `min_ratio` / `max_ratio` (covey/raw)."""

    id: str
    name: str
    unit: str
    covey: float
    raw: float | None
    target: str
    max_value: float | None = None
    min_ratio: float | None = None
    max_ratio: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the figure could not be measured: why

    @classmethod
    def failed(cls, group: str, error: BaseException) -> Figure:
        return cls(
            group,
            f"{group}: not measured",
            "-",
            float("nan"),
            None,
            "-",
            error=f"{type(error).__name__}: {error}".strip(),
        )

    @property
    def ratio(self) -> float | None:
        return self.covey / self.raw if self.raw else None

    @property
    def met(self) -> bool | None:
        if self.error is not None:
            return False
        checks = []
        if self.max_value is not None:
            checks.append(self.covey <= self.max_value)
        ratio = self.ratio
        if self.min_ratio is not None:
            checks.append(ratio is not None and ratio >= self.min_ratio)
        if self.max_ratio is not None:
            checks.append(ratio is not None and ratio <= self.max_ratio)
        return all(checks) if checks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "unit": self.unit,
            "covey": None if self.error else self.covey,
            "raw": self.raw,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            **({"extra": self.extra} if self.extra else {}),
            **({"error": self.error} if self.error else {}),
        }


class Profiler:
    """cProfile switched on only while covey's side of a figure runs (`--profile`)."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile()

    async def around(self, action: Awaitable[float]) -> float:
        self.profile.enable()
        try:
            return await action
        finally:
            self.profile.disable()


PROFILER: Profiler | None = None


async def covey_side(action: Awaitable[float]) -> float:
    """Await covey's side of a figure, under the profiler when there is one."""
    return await (PROFILER.around(action) if PROFILER else action)


async def interleaved(
    covey: Callable[[], Awaitable[float]],
    raw: Callable[[], Awaitable[float]],
    repeats: int,
    runs: dict[str, Any] | None = None,
    raw_first: bool = False,
) -> tuple[float, float]:
    """Medians of `repeats` runs of each, taken covey, raw, covey, raw, … (raw, covey, …
    with `raw_first`); every run is kept in `runs` (for the JSON) when given."""
    covey_runs: list[float] = []
    raw_runs: list[float] = []
    for _ in range(repeats):
        if raw_first:
            raw_runs.append(await raw())
        covey_runs.append(await covey_side(covey()))
        if not raw_first:
            raw_runs.append(await raw())
    if runs is not None:
        runs["covey_runs"] = [round(x, 6) for x in covey_runs]
        runs["raw_runs"] = [round(x, 6) for x in raw_runs]
    return statistics.median(covey_runs), statistics.median(raw_runs)


async def timed(action: Awaitable[object]) -> float:
    started = time.perf_counter()
    await action
    return time.perf_counter() - started


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- the broker under test and its namespaces ---------------------------------------------


class Admin:
    """Creates and removes vhosts, many at a time (each call to rabbitmqctl costs a second
    of Erlang start-up, so a batch is one `eval`)."""

    def add_vhosts(self, names: list[str], user: str) -> None:
        raise NotImplementedError

    def delete_vhosts(self, names: list[str]) -> None:
        raise NotImplementedError


class CtlAdmin(Admin):
    def __init__(self, ctl: Callable[..., str]) -> None:
        self._ctl = ctl

    def add_vhosts(self, names: list[str], user: str) -> None:
        if not names:
            return
        binaries = ",".join(f'<<"{name}">>' for name in names)
        self._ctl(
            "eval",
            f'[begin rabbit_vhost:add(V, <<"covey-bench">>), '
            f'rabbit_auth_backend_internal:set_permissions(<<"{user}">>, V, <<".*">>, '
            f'<<".*">>, <<".*">>, <<"covey-bench">>) end || V <- [{binaries}]], ok.',
        )

    def delete_vhosts(self, names: list[str]) -> None:
        for name in names:
            self._ctl("delete_vhost", name, timeout=600)


class HttpAdmin(Admin):
    """Through the management API (the tests' admin), for `--url` brokers that have it."""

    def __init__(self, management: ManagementAdmin) -> None:
        self.management = management

    def add_vhosts(self, names: list[str], user: str) -> None:
        for name in names:
            self.management.add_vhost(name, user)

    def delete_vhosts(self, names: list[str]) -> None:
        for name in names:
            self.management.delete_vhost(name)


def admin_for_url(url: str) -> Admin:
    """The management API on the broker's host if it answers, else this machine's
    rabbitmqctl; else a one-line error."""
    parsed = URL(url)
    management = ManagementAdmin(
        f"http://{parsed.host}:15672", parsed.user or "guest", parsed.password or "guest"
    )
    if management.answers():
        return HttpAdmin(management)
    if shutil.which("rabbitmqctl"):

        def ctl(*args: str, timeout: float = 60) -> str:
            done = subprocess.run(
                ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=True
            )
            return done.stdout

        return CtlAdmin(ctl)
    raise SystemExit(f"bench: cannot create vhosts on {parsed.host}: enable rabbitmq_management")


@dataclass
class Bench:
    """What a figure gets: the sizes to use and fresh namespaces on the broker under test."""

    base_url: str  # the default vhost's URL
    admin: Admin
    quick: bool
    workdir: Path
    prefix: str
    default_vhost_free: bool = False  # a private node's "/": the first figure may have it
    created: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # handed from one figure to the next
    _pool: list[str] = field(default_factory=list)
    _provisioning: asyncio.Future[None] | None = None

    def provision(self, count: int) -> None:
        """Start creating `count` vhosts in the background (one rabbitmqctl call costs a
        second of Erlang start-up), for `vhost()` to hand out."""
        names = [f"{self.prefix}-{len(self.created) + i}" for i in range(count)]
        self.created += names
        user = URL(self.base_url).user or "guest"

        async def create() -> None:
            await asyncio.to_thread(self.admin.add_vhosts, names, user)
            self._pool += names

        previous = self._provisioning

        async def after_previous() -> None:
            if previous is not None:
                await previous
            await create()

        self._provisioning = asyncio.ensure_future(after_previous())

    async def vhost(self) -> str:
        """The URL of a vhost nobody has used yet."""
        if self.default_vhost_free:
            self.default_vhost_free = False
            return self.base_url
        while not self._pool:
            if self._provisioning is None or self._provisioning.done():
                self.provision(1)
            assert self._provisioning is not None
            await self._provisioning
        return self.url_of(self._pool.pop(0))

    async def settled(self) -> None:
        """Wait for vhosts still being created (before they are deleted)."""
        if self._provisioning is not None:
            await self._provisioning

    def url_of(self, vhost: str) -> str:
        return str(URL(self.base_url).with_path("/" + vhost, encoded=False))

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True)
        return path


def cache_bytecode(folder: Path) -> str | None:
    """Let the processes the bench starts cache their bytecode under `folder`, as an
    installed covey would have it. Returns what PYTHONDONTWRITEBYTECODE was: with it set
    (as here) and covey installed editable, every `covey` command compiled covey's own
    modules from source again."""
    before = os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(folder)
    return before


async def warm_bytecode() -> None:
    """Import every covey module once in a child process, so that bytecode is cached
    before anything is timed."""
    await wall_time(
        [
            PYTHON,
            "-c",
            "import importlib, pkgutil, coordinator\n"
            "for m in pkgutil.iter_modules(coordinator.__path__):\n"
            "    importlib.import_module('coordinator.' + m.name)",
        ],
        dict(os.environ),
    )


# -- covey homes --------------------------------------------------------------------------


def write_home(home: Path, agents: dict[str, list[str]]) -> Path:
    """A covey home with these agents (name -> teams) and the person human:ada."""
    (home / "agents").mkdir(parents=True, exist_ok=True)
    (home / "covey.toml").write_text('identity = "human:ada"\n[humans.ada]\n')
    for name, teams in agents.items():
        folder = home / "agents" / name
        folder.mkdir()
        (folder / "agent.toml").write_text(f'teams = {json.dumps(teams)}\ncommand = "true"\n')
    return home


def write_roster(home: Path, agents: int) -> Path:
    """`agents` agents, each in 2 teams (10 `team*` and 7 `guild*` teams in all)."""
    return write_home(
        home, {f"agent{n:04d}": [f"team{n % 10}", f"guild{n % 7}"] for n in range(agents)}
    )


def covey_env(home: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVEY_")}
    env.update(COVEY_HOME=str(home), COVEY_AMQP_URL=url, COVEY_STATE_DIR=str(home / "state"))
    return env


# -- loading a queue fast ------------------------------------------------------------------

BULK_IN_FLIGHT = 1000


async def bulk_publish(
    url: str, queue: str, messages: list[tuple[bytes, dict[str, Any]]], copies: int = 1
) -> None:
    """Publish each (body, aio-pika Message arguments) `copies` times to `queue` through
    the default exchange, persistent and confirmed, a thousand in flight at a time.
    For set-up only, never measured."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        pending: list[Awaitable[object]] = []
        for body, properties in messages:
            message = aio_pika.Message(
                body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties
            )
            for _ in range(copies):
                pending.append(exchange.publish(message, queue))
                if len(pending) == BULK_IN_FLIGHT:
                    await asyncio.gather(*pending)
                    pending = []
        await asyncio.gather(*pending)


# -- processes ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def wall_time(argv: list[str], env: dict[str, str], check: bool = True) -> float:
    """Seconds from spawning `argv` to its exit."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    took = time.perf_counter() - started
    if check and process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}… exited {process.returncode}: {err.decode()}")
    return took
