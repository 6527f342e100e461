"""Web tokens: who a request to the web app's actions comes from.

`covey web token NAME` makes a token for a person (a human in the roster) and
prints it, once. Only its SHA-256 is kept, in `<state_dir>/web-tokens.json`
(mode 0600, beside `covey provision`'s credentials): a copy of the file lets
nobody act as anyone. The token is 32 random bytes, so a plain hash is enough
(there is nothing to guess, unlike a password); presented tokens are compared
with `hmac.compare_digest`. Making a token again replaces that person's; `--revoke`
removes it. The web server reads the file again whenever it changes, so a new or
revoked token counts at once, without a restart.

A token says who a person is to the web app only. What that person may then do
on the broker is still the broker's decision: in a provisioned namespace the app
acts with the person's own broker user (see actions.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.errors import BadInput, ConfigError, NotFound
from coordinator.names import Address, check_name

if TYPE_CHECKING:
    from coordinator.roster import Roster
    from coordinator.settings import Settings

TOKENS_FILE = "web-tokens.json"
TOKEN_PREFIX = "covey_"  # tells a covey token apart in a leaked paste or a secret scan
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 200  # a presented token longer than this is not one of ours


def tokens_path(settings: Settings) -> Path:
    return settings.expanded_state_dir / TOKENS_FILE


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def person_named(roster: Roster, name: str) -> Address:
    """`ada` or `human:ada`, a human in the roster; BadInput or NotFound otherwise."""
    address = Address.parse(name) if ":" in name else Address("human", check_name(name))
    if address.kind != "human":
        raise BadInput(f"{name!r} is not a person: web tokens are for humans (human:NAME)")
    if address.name not in roster.humans:
        raise NotFound(f"{address} is not in the roster: add [humans.{address.name}] to covey.toml")
    return address


@dataclass(frozen=True, slots=True)
class Issued:
    person: str
    token: str
    path: Path


def issue(settings: Settings, person: Address) -> Issued:
    """A new token for `person`, replacing theirs if they had one; only its hash is kept."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    path = tokens_path(settings)
    with _locked(path):
        tokens = _read(path)
        tokens[str(person)] = {"sha256": digest(token), "created_at": _now()}
        _write(path, tokens)
    return Issued(str(person), token, path)


def revoke(settings: Settings, person: Address) -> bool:
    """Remove `person`'s token; False when they had none."""
    path = tokens_path(settings)
    with _locked(path):
        tokens = _read(path)
        if tokens.pop(str(person), None) is None:
            return False
        _write(path, tokens)
    return True


class TokenStore:
    """The server's view of the tokens file, read again whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None  # inode, size, mtime of what we read
        self._hashes: dict[str, str] = {}  # person -> sha256

    def person_of(self, token: str) -> str | None:
        """Whose token this is (`human:ada`), or None."""
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            return None
        presented = digest(token)
        found = None
        # Every entry compared, each in constant time: how long this takes says nothing
        # about which hash came close.
        for person, stored in self._current().items():
            if hmac.compare_digest(presented, stored):
                found = person
        return found

    def _current(self) -> dict[str, str]:
        try:
            status = self.path.stat()
        except FileNotFoundError:
            self._seen, self._hashes = None, {}
            return self._hashes
        seen = (status.st_ino, status.st_size, status.st_mtime_ns)
        if seen != self._seen:
            self._hashes = {
                person: str(entry.get("sha256", ""))
                for person, entry in _read(self.path).items()
                if isinstance(entry, dict)
            }
            self._seen = seen
        return self._hashes


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path} ({err}): remove it and make new tokens") from None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, dict):
        raise ConfigError(f"{path} is not a covey tokens file: remove it and make new tokens")
    return tokens


def _write(path: Path, tokens: dict[str, Any]) -> None:
    from coordinator.provision import write_secret

    write_secret(path, json.dumps({"version": 1, "tokens": tokens}, indent=2, sort_keys=True))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One change to the file at a time (two `covey web token` at once lose none). The
    lock is a file of its own: the tokens file is replaced, not written in place."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = path.with_name(path.name + ".lock")
    try:
        descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as err:
        raise ConfigError(f"cannot write {lock} ({err}): check state_dir") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
