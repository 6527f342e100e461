"""Settings: where the broker is, where state lives, who "I" am, and the limits.

Precedence, highest first: keyword arguments, `COVEY_*` environment variables,
the home's `covey.toml`, defaults. The home is found the way git finds a
repository (see `find_home`), so every command works from anywhere inside it.

The broker's address is one setting given one of two ways: `amqp_url` (one node) or
`amqp_urls` (a cluster's nodes; `COVEY_AMQP_URLS` comma-separated). The highest
source that gives either decides, as for any other setting: `COVEY_AMQP_URL` in the
environment beats `amqp_urls` in covey.toml. Where one source gives both, `amqp_urls`
is the list and `amqp_url` must be one of its entries (the supervisor hands an agent
both: the list for covey, one URL for tools that know of one), else a ConfigError.
After loading, `amqp_urls` is always the list and `amqp_url` its first entry: the
login (user, password, vhost), which every entry must share, as a cluster's nodes do.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit
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
    NoDecode,
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
from coordinator.names import valid_names


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
    # Before amqp_url: a broken entry is reported as amqp_urls', whose first entry
    # amqp_url is (pydantic reports fields in this order).
    amqp_urls: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="a cluster's nodes, tried in `amqp_order`; unset: [amqp_url]",
    )
    amqp_url: str = Field(default=DEFAULT_AMQP_URL, description="the broker, or amqp_urls[0]")
    amqp_order: Literal["shuffle", "listed"] = Field(
        default="shuffle",
        description="the order amqp_urls are tried in: shuffled for each connection "
        "(spreads clients over the nodes), or as listed",
    )
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    identity: str | None = Field(
        default=None, description="who I am when neither --as nor COVEY_AGENT says"
    )
    # The default is not checked (pydantic leaves defaults alone): a machine's own name
    # is recorded as it is, as before this setting existed; `covey provision` makes a
    # broker user name of it (provision.host_name).
    host: str = Field(
        default_factory=socket.gethostname,
        description="the host name runs and lock holders record (two supervisors on one "
        "machine, each its own, act as two hosts); unset: this machine's",
    )
    max_body_bytes: int = Field(default=256 * 1024, gt=0)
    delivery_limit: int = Field(
        default=10, gt=0, description="deliveries before a message is dead-lettered"
    )
    dead_lettering: Literal["at-most-once", "at-least-once"] = Field(
        default="at-most-once", description="the broker's strategy; see topology.py for why"
    )
    connect_timeout: float = Field(
        default=10.0,
        gt=0,
        description="bounds connecting, over all of amqp_urls (each node gets a share)",
    )
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
        return _checked_url(url)

    @field_validator("amqp_urls", mode="before")
    @classmethod
    def _split_urls(cls, urls: object) -> object:
        return _url_list(urls) if isinstance(urls, str) else urls

    @field_validator("amqp_urls")
    @classmethod
    def _amqp_urls(cls, urls: list[str] | None) -> list[str] | None:
        if urls is None:
            return None
        if not urls:
            raise ValueError("an empty list: give at least one amqp:// URL, or unset it")
        for number, url in enumerate(urls, 1):
            try:
                _checked_url(url)
            except ValueError as err:
                raise ValueError(f"entry {number} ({_redacted(url)}): {err}") from None
            if _login(url) != _login(urls[0]):
                raise ValueError(
                    f"entry {number} ({_redacted(url)}) has another user, password or vhost "
                    "than entry 1: a cluster's nodes share them, so write the same "
                    "USER:PASSWORD@ and /VHOST in every entry"
                )
        return urls

    @model_validator(mode="after")
    def _one_list(self) -> Settings:
        # The sources give both or neither (see _BrokerAddress); neither: the default.
        if self.amqp_urls is None:
            self.amqp_urls = [self.amqp_url]
        return self

    @property
    def vhost(self) -> str:
        """The vhost in amqp_url (every node's URL names the same one): `/` when none."""
        path = urlsplit(self.amqp_url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    @property
    def broker_urls(self) -> list[str]:
        """Every node's URL, as listed (amqp_urls, else [amqp_url])."""
        return self.amqp_urls if self.amqp_urls is not None else [self.amqp_url]

    def with_login(self, url: str) -> Settings:
        """These settings logging in with `url`'s user, password and vhost, at every
        node: how a participant's own credentials (one URL, as `covey provision` wrote
        it) apply to a cluster."""
        urls = [_logged_in(node, url) for node in self.broker_urls]
        return self.model_copy(update={"amqp_url": urls[0], "amqp_urls": urls})

    @model_validator(mode="after")
    def _client_certificate_whole(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both, or neither")
        return self

    @field_validator("host")
    @classmethod
    def _host_name(cls, host: str) -> str:
        return valid_names([host], "host name")[0]

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
        assert isinstance(init_settings, InitSettingsSource)
        sources: list[PydanticBaseSettingsSource] = [
            _BrokerAddress(init_settings, "the settings given: amqp_url and amqp_urls"),
            _BrokerAddress(env_settings, "COVEY_AMQP_URL and COVEY_AMQP_URLS"),
        ]
        home = init_settings.init_kwargs.get("home")
        if home is not None:
            toml = TomlConfigSettingsSource(settings_cls, Path(home) / CONFIG_FILE)
            where = f"{Path(home) / CONFIG_FILE}: amqp_url and amqp_urls"
            sources.append(_BrokerAddress(toml, where))
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


class _BrokerAddress(PydanticBaseSettingsSource):
    """One source, whose `amqp_url` and `amqp_urls` come out as one address: both set,
    or neither. Sources are merged key by key, so without this a COVEY_AMQP_URL in the
    environment would leave covey.toml's `amqp_urls` in force beside it."""

    def __init__(self, inner: PydanticBaseSettingsSource, where: str) -> None:
        super().__init__(inner.settings_cls)
        self._inner = inner
        self._where = where

    def _set_current_state(self, state: dict[str, Any]) -> None:
        self._inner._set_current_state(state)

    def _set_settings_sources_data(self, states: dict[str, dict[str, Any]]) -> None:
        self._inner._set_settings_sources_data(states)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        state = self._inner()
        url, urls = state.get("amqp_url"), state.get("amqp_urls")
        if urls is None:
            if url is not None:
                state["amqp_urls"] = [url]
            return state
        listed = _url_list(urls) if isinstance(urls, str) else urls
        if isinstance(listed, list) and listed and all(isinstance(u, str) for u in listed):
            if url is not None and url not in listed:
                raise ConfigError(
                    f"{self._where} both name the broker and disagree "
                    f"({_redacted(str(url))} is not in the list): keep one"
                )
            state["amqp_url"] = listed[0]
        return state


def _url_list(text: str) -> list[str]:
    """`COVEY_AMQP_URLS`' form: comma-separated (a comma in a password is written %2C)."""
    return [url.strip() for url in text.split(",") if url.strip()]


def _checked_url(url: str) -> str:
    # urllib's, not yarl's (which aio-pika uses): a command that never connects (`covey
    # search`) need not import yarl to check the setting.
    try:
        parsed = urlsplit(url)
        _ = parsed.port  # a port that is not a number fails here
    except ValueError as err:
        raise ValueError(f"not a URL ({err})") from None
    if parsed.scheme not in ("amqp", "amqps") or not parsed.hostname:
        raise ValueError("use amqp://USER:PASSWORD@HOST:PORT/VHOST (or amqps://)")
    return url


def _login(url: str) -> tuple[str, str]:
    """What a URL logs in with, wherever it points: userinfo and vhost."""
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[0], parts.path


def _logged_in(node: str, login: str) -> str:
    """`node`'s scheme, host and port, with `login`'s user, password and vhost."""
    at, credentials = urlsplit(node), urlsplit(login)
    userinfo = credentials.netloc.rpartition("@")[0]
    place = at.netloc.rpartition("@")[2]
    netloc = f"{userinfo}@{place}" if userinfo else place
    return urlunsplit((at.scheme, netloc, credentials.path, at.query, at.fragment))


def _redacted(url: str) -> str:
    """`url` without its password (for error lines)."""
    parts = urlsplit(url)
    userinfo, _, place = parts.netloc.rpartition("@")
    if ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{place}"))


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
