"""`covey provision`: one RabbitMQ user per participant and per supervisor host, least privilege.

Users are made through RabbitMQ's management HTTP API (the `rabbitmq_management`
plugin), as the operator in `COVEY_AMQP_URL` (or `management_url`), who must be
a RabbitMQ administrator. Each user may do in this vhost only what its holder
needs (RabbitMQ checks every operation against these regular expressions):

* an agent reads only its own queue, and binds nothing to `covey` (so it cannot
  route anyone's mail to a queue of its own); publishes mail to anyone through
  `covey`, and to `covey.dead` what it dead-letters from its own queue;
  appends to the changelog through the `covey.changelog` exchange and reads the
  stream; takes its own agent lock and the shared locks (`global`, covey.toml's
  `[locks.*]`) and writes their holder notes, never another agent's lock or
  notes; keeps its own changelog cursor. Topic permissions narrow which notes
  (`covey.notes`) and events (`covey.events`) it may touch by routing key;
* a human likewise, without locks, notes or cursor;
* every participant reads every run's session (the `covey.sessions` stream) and
  listens for `session.*` events, but publishes neither: a session is written by
  the `covey run` that runs the agent (an agent's own events reach it through the
  run, not the broker), so no agent can write into another's session;
* a person may stop any run (`covey stop`); an agent may stop none, so no agent
  can stop another's run;
* a supervisor host declares the topology, takes every agent's lock, moves
  cursors, records runs and publishes their sessions, but may not read anyone's
  mailbox queue. Its user has the `management` tag, with which the management API
  shows it this vhost's queues (where their replicas are, replicas.py) and no other
  vhost's.

Nobody but the operator may publish to the default exchange, through which one
could write into any queue. `user_id` does the rest: RabbitMQ refuses a publish
signed as another user, and mailboxes dead-letter mail whose sender is not the
signer's participant (see identity.py).

Each user's AMQP URL, password included, is written to
`<state_dir>/credentials/USER.url` with mode 0600 (or printed, once, with
`--print`). It is one URL, at the first node of `amqp_urls`: its login (user,
password, vhost) is what counts, and covey uses it at every configured node
(`Settings.with_login`), since a cluster's nodes share their users. Re-running
is idempotent: existing users keep their passwords, permissions are set again.
`--rotate NAME` gives one user a new password.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

from coordinator.errors import BadInput, BrokerUnavailable, ConfigError
from coordinator.identity import credentials_file, supervisor_user, url_user, user_of
from coordinator.names import NAME_PATTERN, Address
from coordinator.roster import GLOBAL_LOCK, Roster
from coordinator.settings import Settings
from coordinator.topology import (
    CHANGELOG_EXCHANGE,
    CHANGELOG_STREAM,
    DEAD,
    EVENTS_EXCHANGE,
    MAIL_EXCHANGE,
    NOTES_EXCHANGE,
    RUNS_STREAM,
    SESSIONS,
)

MANAGEMENT_PORT = {"amqp": 15672, "amqps": 15671}
PASSWORD_BYTES = 24
NOTHING = "^$"
MANAGEMENT_TAG = "management"


@dataclass(frozen=True, slots=True)
class Topic:
    """Routing keys one may publish with (write) and bind with (read), on one topic
    exchange: RabbitMQ checks both in addition to the exchange's own permissions."""

    write: str
    read: str


@dataclass(frozen=True, slots=True)
class Grant:
    """What one user may do in the vhost: RabbitMQ's three regular expressions over
    exchange and queue names, and per topic exchange, over routing keys."""

    user: str
    configure: str
    write: str
    read: str
    topics: dict[str, Topic] = field(default_factory=dict)  # per topic exchange
    tags: tuple[str, ...] = ()  # the user's RabbitMQ tags, besides any it has


def _any_of(*names: str) -> str:
    return "^(" + "|".join(names) + ")$"


SERVER_NAMED = r"amq\.gen-.*"  # the private queues a consumer of events declares
LOCK_PREFIX = "covey.lock."  # lock.LOCK_PREFIX, without importing the AMQP client
CURSOR_PREFIX = "covey.cursor."  # changelog.CURSOR_PREFIX, likewise
# What lives beside a lock slot, named after it: its holder note (`.holder`), and any
# other note lock.py keeps there. Covey names hold no dot, so `covey.lock.agent.a.X`
# can only ever belong to agent a's own lock.
SLOT_NOTES = r"(\.[a-z]+)?"


def lock_slots(locks: Mapping[str, int]) -> list[str]:
    """The queues of the shared locks, `NAME` -> slots (`covey.lock.NAME[.N]`)."""
    slots = []
    for name, count in sorted(locks.items()):
        base = LOCK_PREFIX + name
        slots += [base] if count == 1 else [f"{base}.{slot}" for slot in range(count)]
    return slots


def participant_grant(address: Address, prefix: str, locks: Mapping[str, int]) -> Grant:
    """Least privilege for a participant; `locks` are the shared locks (`global` and
    covey.toml's `[locks.*]`, name -> slots) an agent may take.

    Why each part is as it is (every regex anchored, every name escaped):
    * No read on the `covey` mail exchange: binding a queue needs read on the exchange,
      so without it no participant can bind a queue of its own (or the changelog
      stream, which it may write to) to another's routing key. Mail reaches it only
      through the queue the topology bound for it.
    * An agent may declare (configure), write and read only its own agent lock, the
      shared locks and what lives beside them, and its own cursor: never another
      agent's lock (which would keep that agent from running) nor its notes (reading
      a note can take it, purging needs read, deleting needs configure). The topic
      permissions on `covey.notes` say the same for publishing and binding notes.
    """
    # covey.dead: to dead-letter what its own queue held that was not fit to file.
    publish_to = [re.escape(x) for x in (MAIL_EXCHANGE, CHANGELOG_EXCHANGE, EVENTS_EXCHANGE, DEAD)]
    # covey.changelog names the stream it reads and the exchange it appends through;
    # covey.events is bound to for lock releases (topic permissions narrow the keys).
    # covey.sessions: anyone may attach to any run's session.
    readable = [
        re.escape(address.queue),
        re.escape(CHANGELOG_STREAM),
        re.escape(EVENTS_EXCHANGE),
        re.escape(SESSIONS),
    ]
    waits = r"lock\.released\..*"  # to wait for a lock
    heard = [r"session\..*"]  # to learn of sessions: listened for, never published
    if address.kind == "agent":
        own_lock = LOCK_PREFIX + f"agent.{address.name}"
        slots = [re.escape(q) + SLOT_NOTES for q in (own_lock, *lock_slots(locks))]
        cursor = re.escape(CURSOR_PREFIX + address.name)
        mine, notes, events = [SERVER_NAMED, *slots, cursor], _any_of(*slots, cursor), [waits]
        publish_to.append(re.escape(NOTES_EXCHANGE))
        readable.append(re.escape(NOTES_EXCHANGE))  # to bind a note queue to it
    else:  # a person also asks for runs (`covey run NAME --via-supervisor`) and reads them,
        # and stops them (`covey stop`), hearing each end; an agent may stop no run at all
        mine, notes = [SERVER_NAMED], NOTHING
        events = [waits, r"run\.requested\..*", r"stop\.requested\..*"]
        heard.append(r"run\.finished\..*")
        readable.append(re.escape(RUNS_STREAM))
    return Grant(
        user=user_of(address, prefix),
        configure=_any_of(*mine),
        # Writing to a queue is needed to bind it (a note to covey.notes, an event
        # listener to covey.events); publishing goes through the exchanges only.
        write=_any_of(*publish_to, *mine),
        read=_any_of(*readable, *mine),
        topics={
            NOTES_EXCHANGE: Topic(notes, notes),
            EVENTS_EXCHANGE: Topic(_any_of(*events), _any_of(*events, *heard)),
            # Mail to anyone; and belt and braces: even with read on `covey`, no key to
            # bind with.
            MAIL_EXCHANGE: Topic(write=".*", read=NOTHING),
        },
    )


def supervisor_grant(host: str, prefix: str) -> Grant:
    return Grant(
        user=supervisor_user(host, prefix),
        configure=".*",
        write=".*",
        read=r"^(?!(agent|human)\.).*$",  # everything but the mailboxes
        # The management API answers a `management` user about the vhosts it has
        # permissions in, and no others: enough for the supervisor's status and metrics
        # to read where the queues' replicas are (replicas.py), nothing of other vhosts.
        tags=(MANAGEMENT_TAG,),
    )


def host_name(host: str) -> str:
    """A host's name (Settings.host) as a covey name, for its supervisor's user: as it
    is when it is one (a configured host always is); else a machine's name made one
    (its first label, lower case, a-z, 0-9, '-')."""
    if re.fullmatch(NAME_PATTERN, host):
        return host
    name = re.sub(r"[^a-z0-9-]+", "-", host.split(".")[0].lower()).strip("-")
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
    def for_settings(cls, settings: Settings, timeout: float | None = None) -> Management:
        """The API of the broker in `amqp_url` (or at `management_url`); each call
        bounded by `timeout` s (default: connect_timeout)."""
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
        return cls(base, user, password, timeout or settings.connect_timeout)

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

    def user_tags(self, user: str) -> list[str] | None:
        """`user`'s tags; None when there is no such user."""
        found = self.call("GET", f"users/{quote(user, safe='')}")
        return None if found is None else _tags(found.get("tags"))

    def set_password(self, user: str, password: str, tags: list[str]) -> None:
        """Create `user`, or give it a new password, with `tags` (all of them)."""
        body = {"password": password, "tags": ",".join(tags)}
        self.call("PUT", f"users/{quote(user, safe='')}", body)

    def add_tags(self, user: str, tags: tuple[str, ...]) -> None:
        """Give an existing `user` the `tags` it lacks, keeping its password and other tags."""
        found = self.call("GET", f"users/{quote(user, safe='')}")
        if found is None:
            raise BrokerUnavailable(f"broker user {user!r} went away while being provisioned")
        had = _tags(found.get("tags"))
        if all(tag in had for tag in tags):
            return
        # A user is PUT whole: its password hash goes back as it was, so the password
        # (in a credentials file somewhere) still works.
        body = {
            "password_hash": found.get("password_hash", ""),
            "hashing_algorithm": found.get("hashing_algorithm"),
            "tags": ",".join(had + [t for t in tags if t not in had]),
        }
        self.call("PUT", f"users/{quote(user, safe='')}", body)

    def grant(self, vhost: str, grant: Grant) -> None:
        where = f"{quote(vhost, safe='')}/{quote(grant.user, safe='')}"
        rules = {"configure": grant.configure, "write": grant.write, "read": grant.read}
        self.call("PUT", f"permissions/{where}", rules)
        for exchange, keys in grant.topics.items():
            self.call(
                "PUT",
                f"topic-permissions/{where}",
                {"exchange": exchange, "write": keys.write, "read": keys.read},
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
    if "agent" in settings.locks:  # covey.lock.agent[.N] would grant agents' own locks
        raise ConfigError(
            "covey.toml: [locks.agent] shares its queue names with the agents' own locks "
            "(covey.lock.agent.NAME); give the lock another name"
        )
    locks = {GLOBAL_LOCK: 1} | {name: lock.slots for name, lock in settings.locks.items()}
    grants = {str(p): participant_grant(p, prefix, locks) for p in roster.participants()}
    grants[f"supervisor on {host}"] = supervisor_grant(host, prefix)
    if rotate is not None:
        rotate = _holder(rotate, grants)
    api = Management.for_settings(settings)
    amqp = urlsplit(settings.amqp_url)
    vhost = settings.vhost
    done = []
    for holder, grant in grants.items():
        path = credentials_file(settings, grant.user)
        had = api.user_tags(grant.user)
        exists = had is not None
        if exists and holder != rotate:
            api.add_tags(grant.user, grant.tags)
            api.grant(vhost, grant)
            if print_only:
                done.append(Provisioned(grant.user, holder, "kept"))
            elif path.is_file():
                done.append(Provisioned(grant.user, holder, "kept", file=path))
            else:  # its password is not known here: only --rotate makes new credentials
                done.append(Provisioned(grant.user, holder, "kept-without-credentials"))
            continue
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        tags = had or []
        api.set_password(grant.user, password, tags + [t for t in grant.tags if t not in tags])
        api.grant(vhost, grant)
        url = _with_login(amqp, grant.user, password)
        action = "rotated" if exists else "created"
        if print_only:
            done.append(Provisioned(grant.user, holder, action, url=url))
        else:
            write_secret(path, url)
            done.append(Provisioned(grant.user, holder, action, file=path))
    return done


def _tags(tags: object) -> list[str]:
    """A user's tags as the management API gives them: a list (RabbitMQ 3.9 and later)
    or one comma-separated string (before)."""
    if isinstance(tags, str):
        return [t.strip() for t in tags.split(",") if t.strip()]
    return [str(t) for t in tags] if isinstance(tags, list) else []


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


def write_secret(path: Path, text: str) -> None:
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
