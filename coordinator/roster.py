"""The roster: which participants exist, and the teams agents belong to.

Agents are folders, `agents/NAME/agent.toml` (settings) beside `AGENT.md` (the
agent's instructions); humans are `[humans.NAME]` tables in covey.toml. The
roster is what `covey topology apply` turns into queues and bindings, and what
`send` checks a recipient against before publishing.

A broken `agent.toml` affects only its agent: the roster keeps it aside, with
its problem (one line: file, key, what is wrong), and loads the others.
Whatever names that agent (mail to it, running it, acting as it, its digest)
is refused with that line; everything else works, and `covey status` shows it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coordinator.durations import Seconds
from coordinator.errors import BadInput, ConfigError, first_problem
from coordinator.home import AGENT_FILE as AGENT_FILE  # re-exported
from coordinator.names import Address, check_name, valid_names
from coordinator.settings import CONFIG_FILE, ROSTER_DIR, Settings

INSTRUCTIONS_FILE = "AGENT.md"


NO_LOCK = "none"
GLOBAL_LOCK = "global"


class PreflightHook(BaseModel):
    """`[[preflight]]`: a check that must pass before the agent's command starts.

    Either `command` (passes on exit 0) or `http` (passes on `expect_status`,
    else any 2xx), each within `timeout`.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    command: list[str] | None = Field(default=None, min_length=1)
    http: str | None = None
    expect_status: int | None = Field(default=None, ge=100, le=599)
    timeout: Seconds = 10.0

    @model_validator(mode="after")
    def _one_kind(self) -> PreflightHook:
        if (self.command is None) == (self.http is None):
            raise ValueError("give exactly one of command = [...] or http = URL")
        if self.expect_status is not None and self.http is None:
            raise ValueError("expect_status applies to http checks only")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.command[0] if self.command else str(self.http)


class DigestConfig(BaseModel):
    """`[digest]` in agent.toml: how the changelog digest is fitted for this agent."""

    model_config = ConfigDict(extra="forbid")

    max_chars: int = Field(default=4000, ge=200)
    max_entries: int = Field(default=50, ge=1)
    first_run_entries: int = Field(default=20, ge=0)  # for an agent with no cursor yet
    include_own: bool = False
    group_by: Literal["author", "tag", "none"] = "author"


class AgentConfig(BaseModel):
    """`agents/NAME/agent.toml`. Unknown keys are refused, so a typo is caught."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    teams: list[str] = Field(default_factory=list)
    command: list[str] | str | None = None
    workdir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    schedule: str | None = None
    wake_on_mail: bool = False
    lock: str = GLOBAL_LOCK
    wait_lock: Seconds = 0.0
    timeout: Seconds = 3600.0
    grace: Seconds = 10.0
    preflight: list[PreflightHook] = Field(default_factory=list)
    digest: DigestConfig = Field(default_factory=DigestConfig)
    inject: Literal["file", "stdin"] = "file"  # the digest file always; stdin too if asked
    instructions: str | None = None  # e.g. "CLAUDE.md": AGENT.md + digest, in the workdir

    @field_validator("instructions")
    @classmethod
    def _plain_filename(cls, name: str | None) -> str | None:
        if name is not None and (not name or "/" in name or name in (".", "..")):
            raise ValueError("give a file name in the workdir, such as CLAUDE.md")
        return name

    @field_validator("command")
    @classmethod
    def _not_empty(cls, command: list[str] | str | None) -> list[str] | str | None:
        if command is not None and not (command if isinstance(command, list) else command.strip()):
            raise ValueError("command is empty")
        return command

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, schedule: str | None) -> str | None:
        if schedule is not None:
            from croniter import croniter  # only rosters with schedules pay for the import

            if not croniter.is_valid(schedule):
                raise ValueError(
                    f"invalid cron expression {schedule!r}: use 5 fields (minute hour day "
                    "month weekday), or 6 with seconds last"
                )
        return schedule

    @field_validator("lock")
    @classmethod
    def _valid_lock_name(cls, lock: str) -> str:
        return valid_names([lock], "lock name")[0]

    @field_validator("teams")
    @classmethod
    def _valid_team_names(cls, teams: list[str]) -> list[str]:
        return valid_names(teams, "team name")


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    folder: Path
    config: AgentConfig

    @property
    def address(self) -> Address:
        return Address("agent", self.name)


@dataclass(frozen=True, slots=True)
class Roster:
    agents: dict[str, Agent]
    humans: frozenset[str]
    broken: dict[str, str] = field(default_factory=dict)  # agent -> its problem, one line

    @classmethod
    def load(cls, settings: Settings, problems: dict[str, str] | None = None) -> Roster:
        """Read every agent folder and the humans in settings.

        A broken agent file leaves that agent out: its problem (naming the file, the
        field and what is wrong) goes into `broken`, and into `problems` when given.
        A broken list of humans is covey.toml's problem, and raises ConfigError.
        """
        home = settings.home
        for human in settings.humans:
            try:
                check_name(human, "human name")
            except BadInput as err:
                raise ConfigError(f"{home}/{CONFIG_FILE}: humans: {err}") from None
        folder = home / ROSTER_DIR if home is not None else None
        agents, broken = {}, {}
        if folder is not None and folder.is_dir():
            for agent_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                if not (agent_dir / AGENT_FILE).is_file():
                    continue
                try:
                    agent = _load_agent(agent_dir, settings)
                except ConfigError as err:
                    broken[agent_dir.name] = str(err)
                    continue
                agents[agent.name] = agent
        if problems is not None:
            problems.update(broken)
        return cls(agents=agents, humans=frozenset(settings.humans), broken=broken)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, Address):
            return False
        if address.kind == "agent":
            return address.name in self.agents
        if address.kind == "human":
            return address.name in self.humans
        if address.kind == "team":
            return any(address.name in a.config.teams for a in self.agents.values())
        return bool(self.agents)  # `all` reaches every agent, so it needs one

    def participants(self) -> Iterator[Address]:
        for name in self.agents:
            yield Address("agent", name)
        for name in sorted(self.humans):
            yield Address("human", name)

    def reached_by(self, address: Address) -> list[Address]:
        """The participants mail to `address` reaches (for `all`: every agent)."""
        if address.kind == "all":
            return [agent.address for agent in self.agents.values()]
        if address.kind == "team":
            return [a.address for a in self.agents.values() if address.name in a.config.teams]
        return [address] if address in self else []

    def teams_of(self, address: Address) -> list[str]:
        agent = self.agents.get(address.name) if address.kind == "agent" else None
        return list(agent.config.teams) if agent else []

    def check(self, address: Address) -> None:
        """Raise ConfigError with its problem if `address` is a broken agent."""
        if address.kind == "agent" and address.name in self.broken:
            raise ConfigError(self.broken[address.name])

    def agent(self, name: str) -> Agent:
        self.check(Address("agent", name))
        try:
            return self.agents[name]
        except KeyError:
            known = ", ".join(self.agents) or "none"
            raise BadInput(f"unknown agent {name!r} (known: {known})") from None


def _load_agent(agent_dir: Path, settings: Settings) -> Agent:
    path = agent_dir / AGENT_FILE
    try:
        name = check_name(agent_dir.name, "agent folder name")
    except BadInput as err:
        raise ConfigError(f"{agent_dir}: {err}") from None
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as err:
        field, problem = first_problem(err)
        raise ConfigError(f"{path}: {field}: {problem}") from None
    if config.lock not in (GLOBAL_LOCK, NO_LOCK, *settings.locks):
        raise ConfigError(
            f"{path}: lock: no lock {config.lock!r}; declare [locks.{config.lock}] in "
            f"{CONFIG_FILE}, or use {GLOBAL_LOCK!r} or {NO_LOCK!r}"
        )
    return Agent(name=name, folder=agent_dir, config=config)
