"""The roster: which participants exist, and the teams agents belong to.

Agents are folders, `agents/NAME/agent.toml` (settings) beside `AGENT.md` (the
agent's instructions); humans are `[humans.NAME]` tables in covey.toml. The
roster is what `covey topology apply` turns into queues and bindings, and what
`send` checks a recipient against before publishing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from coordinator.errors import BadInput, ConfigError, first_problem
from coordinator.names import Address, check_name
from coordinator.settings import CONFIG_FILE, ROSTER_DIR, Settings

AGENT_FILE = "agent.toml"
INSTRUCTIONS_FILE = "AGENT.md"


class AgentConfig(BaseModel):
    """`agents/NAME/agent.toml`. Unknown keys are refused, so a typo is caught."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    teams: list[str] = Field(default_factory=list)
    command: list[str] | str | None = None
    workdir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("teams")
    @classmethod
    def _valid_team_names(cls, teams: list[str]) -> list[str]:
        for team in teams:
            try:
                check_name(team, "team name")
            except BadInput as err:
                raise ValueError(str(err)) from None
        return teams


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

    @classmethod
    def load(cls, settings: Settings) -> Roster:
        """Read every agent folder and the humans in settings.

        A broken file raises ConfigError naming the file, the field and the problem.
        """
        home = settings.home
        for human in settings.humans:
            try:
                check_name(human, "human name")
            except BadInput as err:
                raise ConfigError(f"{home}/{CONFIG_FILE}: humans: {err}") from None
        folder = home / ROSTER_DIR if home is not None else None
        agents = {}
        if folder is not None and folder.is_dir():
            for agent_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                if (agent_dir / AGENT_FILE).is_file():
                    agent = _load_agent(agent_dir)
                    agents[agent.name] = agent
        return cls(agents=agents, humans=frozenset(settings.humans))

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

    def teams_of(self, address: Address) -> list[str]:
        agent = self.agents.get(address.name) if address.kind == "agent" else None
        return list(agent.config.teams) if agent else []

    def agent(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            known = ", ".join(self.agents) or "none"
            raise BadInput(f"unknown agent {name!r} (known: {known})") from None


def _load_agent(agent_dir: Path) -> Agent:
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
    return Agent(name=name, folder=agent_dir, config=config)
