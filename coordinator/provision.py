"""`covey provision`: one RabbitMQ user per participant and per supervisor host, least privilege.

Users are made through RabbitMQ's management HTTP API (the `rabbitmq_management`
plugin), as the operator in `COVEY_AMQP_URL` (or `management_url`), who must be
a RabbitMQ administrator. Each user may do in this vhost only what its holder
needs (RabbitMQ checks every operation against these regular expressions):

* an agent reads only its own queue; publishes mail to anyone through `covey`,
  and to `covey.dead` what it dead-letters from its own queue;
  appends to the changelog through the `covey.changelog` exchange and reads the
  stream; takes lock slots (exclusive `covey.lock.*` queues) and writes their
  holder notes; keeps its own changelog cursor. Topic permissions narrow which
  notes (`covey.notes`) and events (`covey.events`) it may touch by routing key;
* a human likewise, without locks or cursor;
* a supervisor host declares the topology, takes every agent's lock, moves
  cursors and records runs, but may not read anyone's mailbox queue.

Nobody but the operator may publish to the default exchange, through which one
could write into any queue. `user_id` does the rest: RabbitMQ refuses a publish
signed as another user, and mailboxes dead-letter mail whose sender is not the
signer's participant (see identity.py).

Each user's AMQP URL, password included, is written to
`<state_dir>/credentials/USER.url` with mode 0600 (or printed, once, with
`--print`). Re-running is idempotent: existing users keep their passwords,
permissions are set again. `--rotate NAME` gives one user a new password.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

from coordinator.errors import BadInput, BrokerUnavailable, ConfigError
from coordinator.identity import credentials_file, supervisor_user, url_user, user_of
from coordinator.names import Address
from coordinator.roster import Roster
from coordinator.settings import Settings
from coordinator.topology import (
    CHANGELOG_EXCHANGE,
    CHANGELOG_STREAM,
    DEAD,
    EVENTS_EXCHANGE,
    MAIL_EXCHANGE,
    NOTES_EXCHANGE,
    RUNS_STREAM,
)

MANAGEMENT_PORT = {"amqp": 15672, "amqps": 15671}
PASSWORD_BYTES = 24
NOTHING = "^$"


@dataclass(frozen=True, slots=True)
class Grant:
    """What one user may do in the vhost: RabbitMQ's three regular expressions over
    exchange and queue names, and per topic exchange, over routing keys."""

    user: str
    configure: str
    write: str
    read: str
    topics: dict[str, str] = field(default_factory=dict)  # exchange -> routing-key regex


def _any_of(*names: str) -> str:
    return "^(" + "|".join(names) + ")$"


SERVER_NAMED = r"amq\.gen-.*"  # the private queues a consumer of events declares
LOCKS = re.escape("covey.lock.") + ".*"


def participant_grant(address: Address, prefix: str) -> Grant:
    shared_exchanges = [
        re.escape(x) for x in (MAIL_EXCHANGE, CHANGELOG_EXCHANGE, NOTES_EXCHANGE, EVENTS_EXCHANGE)
    ]
    # covey.dead: to dead-letter what its own queue held that was not fit to file.
    publish_only = [re.escape(DEAD)]
    readable = [re.escape(address.queue), re.escape(CHANGELOG_STREAM)]
    waits = r"lock\.released\..*"  # to wait for a lock
    if address.kind == "agent":
        cursor = re.escape(f"covey.cursor.{address.name}")
        mine, notes, events = [SERVER_NAMED, LOCKS, cursor], _any_of(LOCKS, cursor), _any_of(waits)
    else:  # a person also asks for runs (`covey run NAME --via-supervisor`) and reads them
        mine, notes, events = [SERVER_NAMED], NOTHING, _any_of(waits, r"run\.requested\..*")
        readable.append(re.escape(RUNS_STREAM))
    return Grant(
        user=user_of(address, prefix),
        configure=_any_of(*mine),
        # Writing to a queue is needed to bind it (a note to covey.notes, an event
        # listener to covey.events); publishing goes through the exchanges only.
        write=_any_of(*shared_exchanges, *publish_only, *mine),
        read=_any_of(*readable, *shared_exchanges, *mine),
        topics={NOTES_EXCHANGE: notes, EVENTS_EXCHANGE: events},
    )


def supervisor_grant(host: str, prefix: str) -> Grant:
    return Grant(
        user=supervisor_user(host, prefix),
        configure=".*",
        write=".*",
        read=r"^(?!(agent|human)\.).*$",  # everything but the mailboxes
    )


def host_name() -> str:
    """This machine's name, as a covey name (a-z, 0-9, '-')."""
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return name or "localhost"


@dataclass
class Provisioned:
    user: str
    holder: str  # the participant, or `supervisor on HOST`
    action: str  # created, rotated, kept, or kept-without-credentials
    url: str | None = None  # with the password: only when it was just set
    file: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"user": self.user, "for": self.holder, "action": self.action}
        if self.file is not None:
            data["file"] = str(self.file)
        if self.url is not None:
            data["url"] = self.url
        return data


class Management:
    """The few calls of RabbitMQ's management HTTP API that provisioning needs."""

    def __init__(self, base: str, user: str, password: str, timeout: float) -> None:
        self.base = base.rstrip("/")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
        self._timeout = timeout

    @classmethod
    def for_settings(cls, settings: Settings) -> Management:
        amqp = urlsplit(settings.amqp_url)
        if settings.management_url:
            api = urlsplit(settings.management_url)
            user = unquote(api.username or url_user(settings.amqp_url))
            password = unquote(api.password or amqp.password or "guest")
            base = urlunsplit((api.scheme, _host_port(api), api.path, "", ""))
        else:
            scheme = "https" if amqp.scheme == "amqps" else "http"
            base = f"{scheme}://{amqp.hostname}:{MANAGEMENT_PORT[amqp.scheme]}"
            user, password = url_user(settings.amqp_url), unquote(amqp.password or "guest")
        return cls(base, user, password, settings.connect_timeout)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        try:
            request = urllib.request.Request(
                f"{self.base}/api/{path}", data=data, method=method, headers=self._headers
            )
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as err:
            if err.code == 404 and method == "GET":
                return None
            if err.code == 401:
                raise BrokerUnavailable(
                    f"the management API at {self.base} refused the operator's login: "
                    "COVEY_AMQP_URL (or management_url) must name a RabbitMQ administrator"
                ) from None
            raise BrokerUnavailable(
                f"the management API at {self.base} answered {err.code} to {method} /api/{path}: "
                f"{err.read().decode(errors='replace')[:200]}"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ's management API at {self.base} ({err}): enable it "
                "(rabbitmq-plugins enable rabbitmq_management) or set management_url"
            ) from None
        except ValueError as err:  # urllib: not a URL it can use
            raise ConfigError(
                f"management_url {self.base!r}: {err}; use http(s)://HOST:PORT"
            ) from None
        try:
            return json.loads(text) if text else None
        except ValueError:
            raise BrokerUnavailable(
                f"{self.base} answered {method} /api/{path} with something other than JSON: "
                "point management_url at RabbitMQ's management API"
            ) from None

    def user_exists(self, user: str) -> bool:
        return self.call("GET", f"users/{quote(user, safe='')}") is not None

    def set_password(self, user: str, password: str) -> None:
        self.call("PUT", f"users/{quote(user, safe='')}", {"password": password, "tags": ""})

    def grant(self, vhost: str, grant: Grant) -> None:
        where = f"{quote(vhost, safe='')}/{quote(grant.user, safe='')}"
        rules = {"configure": grant.configure, "write": grant.write, "read": grant.read}
        self.call("PUT", f"permissions/{where}", rules)
        for exchange, keys in grant.topics.items():
            self.call(
                "PUT",
                f"topic-permissions/{where}",
                {"exchange": exchange, "write": keys, "read": keys},
            )


def provision(
    settings: Settings,
    roster: Roster,
    host: str,
    rotate: str | None = None,
    print_only: bool = False,
) -> list[Provisioned]:
    """Make sure every participant and this supervisor host has a user with its grant.

    The caller applies the topology first: permissions name what it declares.
    """
    prefix = settings.user_prefix
    grants = {str(p): participant_grant(p, prefix) for p in roster.participants()}
    grants[f"supervisor on {host}"] = supervisor_grant(host, prefix)
    if rotate is not None:
        rotate = _holder(rotate, grants)
    api = Management.for_settings(settings)
    amqp = urlsplit(settings.amqp_url)
    vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    done = []
    for holder, grant in grants.items():
        path = credentials_file(settings, grant.user)
        exists = api.user_exists(grant.user)
        if exists and holder != rotate:
            api.grant(vhost, grant)
            if print_only:
                done.append(Provisioned(grant.user, holder, "kept"))
            elif path.is_file():
                done.append(Provisioned(grant.user, holder, "kept", file=path))
            else:  # its password is not known here: only --rotate makes new credentials
                done.append(Provisioned(grant.user, holder, "kept-without-credentials"))
            continue
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        api.set_password(grant.user, password)
        api.grant(vhost, grant)
        url = _with_login(amqp, grant.user, password)
        action = "rotated" if exists else "created"
        if print_only:
            done.append(Provisioned(grant.user, holder, action, url=url))
        else:
            _write_secret(path, url)
            done.append(Provisioned(grant.user, holder, action, file=path))
    return done


def _holder(name: str, grants: dict[str, Grant]) -> str:
    """The key in `grants` that `--rotate NAME` means: a participant, or `supervisor`."""
    if name in grants:
        return name
    if name == "supervisor":
        return next(h for h in grants if h.startswith("supervisor on "))
    try:
        address = str(Address.participant(name))
    except BadInput:
        address = name
    if address not in grants:
        raise BadInput(f"--rotate {name}: not a participant in the roster, nor `supervisor`")
    return address


def _host_port(url: SplitResult) -> str:
    return f"{url.hostname}:{url.port}" if url.port else str(url.hostname)


def _with_login(amqp: SplitResult, user: str, password: str) -> str:
    login = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return urlunsplit(amqp._replace(netloc=f"{login}@{_host_port(amqp)}"))


def _write_secret(path: Path, text: str) -> None:
    """Write `text` readable by this user only, replacing any old file in one step."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    draft = path.with_suffix(".tmp")
    try:
        draft.unlink(missing_ok=True)  # a leftover draft could have another mode
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text + "\n")
        os.replace(draft, path)
    except OSError as err:
        raise ConfigError(f"cannot write credentials to {path} ({err}): check state_dir") from None
