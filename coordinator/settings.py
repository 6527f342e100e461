"""Settings: where the broker is, where state lives, who "I" am, and the limits.

Precedence, highest first: keyword arguments, `COVEY_*` environment variables,
the home's `covey.toml`, defaults. The home is found the way git finds a
repository (see `find_home`), so every command works from anywhere inside it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from coordinator.durations import Seconds
from coordinator.errors import ConfigError, first_problem

# Re-exported: where the home is needs no pydantic (see home.py).
from coordinator.home import CONFIG_FILE as CONFIG_FILE
from coordinator.home import DEFAULT_AMQP_URL as DEFAULT_AMQP_URL
from coordinator.home import DEFAULT_STATE_DIR
from coordinator.home import ROSTER_DIR as ROSTER_DIR
from coordinator.home import find_home as find_home
from coordinator.home import require_home as require_home


class HumanConfig(BaseModel):
    """A person who gets mail: `[humans.NAME]` in covey.toml."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""


class LockConfig(BaseModel):
    """`[locks.NAME]` in covey.toml: a named lock, or with `slots > 1` a semaphore."""

    model_config = ConfigDict(extra="forbid")

    slots: int = Field(default=1, ge=1)


class ChangelogConfig(BaseModel):
    """`[changelog]` in covey.toml: how long the broker keeps entries, and how many bytes."""

    model_config = ConfigDict(extra="forbid")

    max_age: str = Field(default="30D", pattern=r"^[1-9][0-9]*[YMDhms]$")  # RabbitMQ's units
    max_bytes: int = Field(default=1024**3, ge=1024 * 1024)


class SessionsConfig(BaseModel):
    """`[sessions]` in covey.toml: how long the broker keeps runs' live output (every
    run's, in one stream), and how many bytes of it."""

    model_config = ConfigDict(extra="forbid")

    max_age: str = Field(default="7D", pattern=r"^[1-9][0-9]*[YMDhms]$")  # RabbitMQ's units
    max_bytes: int = Field(default=1024**3, ge=1024 * 1024)


class Settings(BaseSettings):
    """covey's settings; see the module docstring for where each value comes from."""

    model_config = SettingsConfigDict(env_prefix="COVEY_", extra="forbid")

    home: Path | None = Field(default=None, description="the covey home (found, not configured)")
    amqp_url: str = DEFAULT_AMQP_URL
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    identity: str | None = Field(
        default=None, description="who I am when neither --as nor COVEY_AGENT says"
    )
    max_body_bytes: int = Field(default=256 * 1024, gt=0)
    delivery_limit: int = Field(
        default=10, gt=0, description="deliveries before a message is dead-lettered"
    )
    dead_lettering: Literal["at-most-once", "at-least-once"] = Field(
        default="at-most-once", description="the broker's strategy; see topology.py for why"
    )
    connect_timeout: float = Field(default=10.0, gt=0)
    replicas: int = Field(
        default=3,
        ge=1,
        description="how many nodes hold each queue and stream covey creates (RabbitMQ "
        "caps it at the cluster's size, so 3 on one node is 1); counts only at creation",
    )
    tls_ca: Path | None = Field(default=None, description="CA bundle that signs the broker's cert")
    tls_cert: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    tls_key: Path | None = Field(default=None, description="the client certificate's key")
    user_prefix: str = Field(
        default="covey.",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="how `covey provision` names broker users: PREFIX + agent.NAME",
    )
    trust_local: bool | None = Field(
        default=None,
        description="accept mail and changelog entries not signed by a participant's own "
        "user as from anyone; unset: on, unless the namespace is provisioned",
    )
    management_url: str | None = Field(
        default=None, description="RabbitMQ's management API, for `covey provision`"
    )
    log_format: Literal["console", "json"] = "console"
    timezone: str = Field(default="UTC", description="the zone cron schedules are read in")
    shutdown_grace: Seconds = Field(
        default=30.0, description="how long `covey supervise` lets runs finish on SIGTERM"
    )
    busy_retry: Seconds = Field(
        default=60.0,
        gt=0,
        description="how soon `covey supervise` tries again for mail whose run found the lock busy",
    )
    humans: dict[str, HumanConfig] = Field(default_factory=dict)
    locks: dict[str, LockConfig] = Field(default_factory=dict)
    changelog: ChangelogConfig = Field(default_factory=ChangelogConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, url: str) -> str:
        from yarl import URL  # comes with aio-pika

        try:
            parsed = URL(url)
            _ = parsed.port  # a port that is not a number fails here
        except ValueError as err:
            raise ValueError(f"not a URL ({err})") from None
        if parsed.scheme not in ("amqp", "amqps") or not parsed.host:
            raise ValueError("use amqp://USER:PASSWORD@HOST:PORT/VHOST (or amqps://)")
        return url

    @model_validator(mode="after")
    def _client_certificate_whole(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both, or neither")
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {zone!r}: use an IANA name such as Europe/Paris"
            ) from None
        return zone

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        assert isinstance(init_settings, InitSettingsSource)
        home = init_settings.init_kwargs.get("home")
        if home is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, Path(home) / CONFIG_FILE))
        return tuple(sources)

    @classmethod
    def load(cls, home: Path | None = None, **overrides: Any) -> Settings:
        """Settings for `home` (found with `find_home` when not given).

        A broken value raises ConfigError naming the file or variable and the field.
        """
        home = home if home is not None else find_home()
        try:
            return cls(home=home, **overrides)
        except tomllib.TOMLDecodeError as err:
            where = home / CONFIG_FILE if home is not None else CONFIG_FILE
            raise ConfigError(f"{where}: not valid TOML ({err})") from None
        except ValidationError as err:
            raise ConfigError(_describe(err, home)) from None

    @property
    def expanded_state_dir(self) -> Path:
        return self.state_dir.expanduser()

    @property
    def credentials_dir(self) -> Path:
        """Where `covey provision` keeps each broker user's URL (files of mode 0600)."""
        return self.expanded_state_dir / "credentials"


def _describe(err: ValidationError, home: Path | None) -> str:
    """One line for the first problem: where it came from, which field, what is wrong."""
    field, problem = first_problem(err)
    variable = f"COVEY_{field.split('.')[0].upper()}"
    if field and variable in os.environ:
        where = f"environment variable {variable}"
    elif home is not None:
        where = str(home / CONFIG_FILE)
    else:
        where = "covey settings"
    return f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
