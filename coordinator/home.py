"""The covey home (the folder with covey.toml and agents/), and where a mailbox lives.

The home is found the way git finds a repository.

Standard library only, and nothing else imported: the commands that must start in
a few milliseconds (`covey notify`, run after every tool call of a live session)
find the home and read covey.toml without loading pydantic (settings.py re-exports
all of this).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from coordinator.errors import ConfigError
from coordinator.names import Address

CONFIG_FILE = "covey.toml"
ROSTER_DIR = "agents"
AGENT_FILE = "agent.toml"  # in ROSTER_DIR/NAME/
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_STATE_DIR = "~/.local/state/covey"  # expanded where it is used


def find_home(start: Path | None = None) -> Path | None:
    """`COVEY_HOME` if set, else the nearest directory at or above `start` that holds
    `covey.toml` or `agents/`; None when there is none. A `COVEY_HOME` that is not a
    directory raises ConfigError: it is a mistake, never a reason to look elsewhere."""
    if explicit := os.environ.get("COVEY_HOME"):
        home = Path(explicit).expanduser().resolve()
        if not home.is_dir():
            what = "is not a directory" if home.exists() else "does not exist"
            raise ConfigError(
                f"COVEY_HOME={explicit} {what}: point it at the folder that holds covey.toml "
                "and agents/, or unset it to find the home from the working directory"
            )
        return home
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / CONFIG_FILE).is_file() or (directory / ROSTER_DIR).is_dir():
            return directory
    return None


def require_home(start: Path | None = None) -> Path:
    """The home (see `find_home`), or ConfigError saying none was found and how to make one.

    The command line needs one: outside a home there is no roster, and every command
    would fail later with a message about an unknown agent or identity instead."""
    home = find_home(start)
    if home is None:
        here = (start or Path.cwd()).resolve()
        raise ConfigError(
            f"no covey home found from {here} (no {CONFIG_FILE} or {ROSTER_DIR}/ here or "
            f"above): run covey inside one, set COVEY_HOME to one, or make one here with a "
            f"{CONFIG_FILE} and an {ROSTER_DIR}/ folder"
        )
    return home


def store_path(state_dir: Path, amqp_url: str, participant: str) -> Path:
    """Where a participant's mailbox lives: one folder per namespace (vhost). Standard
    library only: `covey notify` finds the mailbox without loading anything else."""
    vhost = unquote(urlsplit(amqp_url).path).lstrip("/") or "default"
    return state_dir / quote(vhost, safe="") / "mail" / f"{participant.replace(':', '.')}.sqlite3"


# -- the settings a mailbox needs, without the settings model --------------------------
# The commands that must start fast (`covey notify`; `read`, `done` and `search` when
# the identity is plain) rank the same sources as settings.py: a `COVEY_*` variable,
# then covey.toml, then the default.


def read_config(home: Path | None) -> dict[str, object]:
    """covey.toml as TOML says (not checked as settings.py checks it); {} without one."""
    if home is None or not (home / CONFIG_FILE).is_file():
        return {}
    try:
        with (home / CONFIG_FILE).open("rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{home / CONFIG_FILE}: cannot be read ({err})") from None


def setting(name: str, config: dict[str, object]) -> str | None:
    """`COVEY_NAME`, else covey.toml's `name`."""
    value = os.environ.get(f"COVEY_{name.upper()}") or config.get(name)
    return str(value) if value else None


def broker_url(config: dict[str, object]) -> str:
    """One of the broker's URLs, as settings.py ranks them (the environment over
    covey.toml; in each, amqp_urls over amqp_url): only its vhost matters for a mailbox,
    and every entry of amqp_urls has the same."""
    listed = config.get("amqp_urls")
    for value in (
        _first(os.environ.get("COVEY_AMQP_URLS")),
        os.environ.get("COVEY_AMQP_URL"),
        _first(listed) if isinstance(listed, str) else None,
        listed[0] if isinstance(listed, list) and listed else None,
        config.get("amqp_url"),
    ):
        if value:
            return str(value)
    return DEFAULT_AMQP_URL


def _first(urls: str | None) -> str | None:
    """The first of comma-separated URLs."""
    return urls.split(",")[0].strip() if urls else None


def mailbox_file(participant: Address, config: dict[str, object]) -> Path:
    """Where `participant`'s mailbox is, by these settings."""
    state_dir = Path(setting("state_dir", config) or DEFAULT_STATE_DIR).expanduser()
    return store_path(state_dir, broker_url(config), str(participant))
