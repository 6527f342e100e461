"""Identity: which broker user speaks for which participant, and whether a sender is genuine.

covey takes identity from RabbitMQ rather than from the envelope. Every publish
carries the AMQP `user_id` property set to the connection's own user, and the
broker refuses a publish whose `user_id` is another user's. So `user_id` is
the one fact about a message its sender cannot make up, and a mailbox checks
the envelope's `sender` against it before filing the message (`SenderCheck`);
a message that fails is dead-lettered as `spoofed`.

In a provisioned namespace (`covey provision`) each participant has a user of
its own, named `PREFIX + kind.name` (`covey.agent.scout`), and mail signed by
one participant's user must name that participant as its sender. In the open
set-up everyone shares one user (guest, say): with `trust_local` that user, or
a message without `user_id`, may speak for any participant, which is what
"everything on this machine trusts everything else" means. `trust_local` is on
unless the namespace is provisioned (`provisioned`): there a participant's user
may publish without `user_id`, and that must not make it anyone it likes.

The same check judges every record that names its author: mail (`sender`),
changelog entries (`author`, see changelog.py), and dead letters (dead.py).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from coordinator.errors import BadInput, ConfigError
from coordinator.names import Address
from coordinator.settings import Settings

DEFAULT_USER = "guest"  # what an AMQP URL without a user logs in as


def user_of(address: Address, prefix: str) -> str:
    """The broker user `covey provision` makes for a participant."""
    return f"{prefix}{address.routing_key}"


SUPERVISOR = "supervisor."


def supervisor_user(host: str, prefix: str) -> str:
    return f"{prefix}{SUPERVISOR}{host}"


def is_supervisor_user(user: str, prefix: str) -> bool:
    return user.startswith(prefix + SUPERVISOR)


def participant_of(user: str | None, prefix: str) -> Address | None:
    """The participant a provisioned user speaks for; None for any other user."""
    if user is None or not user.startswith(prefix):
        return None
    kind, _, name = user[len(prefix) :].partition(".")
    try:
        address = Address.parse(f"{kind}:{name}")
    except BadInput:
        return None
    return address if address.is_participant else None


def url_user(amqp_url: str) -> str:
    """The user an AMQP URL logs in as."""
    user = urlsplit(amqp_url).username
    return unquote(user) if user else DEFAULT_USER


def credentials_file(settings: Settings, user: str) -> Path:
    return settings.credentials_dir / f"{user}.url"


def provisioned_as(settings: Settings) -> Address | None:
    """The participant whose own user `settings` connect as, if it is one."""
    return participant_of(url_user(settings.amqp_url), settings.user_prefix)


def provisioned(settings: Settings) -> bool:
    """Whether this is a provisioned namespace, as far as this process can tell: it
    connects as a user `covey provision` made (a participant's or a supervisor's), or
    `covey provision` wrote credentials into this home's state dir. There, no user
    but a participant's own speaks for that participant (`trust_local` is off)."""
    me, prefix = url_user(settings.amqp_url), settings.user_prefix
    if participant_of(me, prefix) is not None or is_supervisor_user(me, prefix):
        return True
    try:
        return any(settings.credentials_dir.glob(glob.escape(prefix) + "*.url"))
    except OSError:  # an unreadable state dir says nothing either way
        return False


def url_for(settings: Settings, address: Address) -> str:
    """The AMQP URL to hand a participant: its own credentials once `covey provision`
    wrote them; the shared URL in the open set-up. One URL: `Settings.with_login`
    applies its login to every node of `amqp_urls`. A provisioned supervisor never
    hands out its own (ConfigError instead)."""
    path = credentials_file(settings, user_of(address, settings.user_prefix))
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ConfigError(f"cannot read {address}'s credentials in {path} ({err})") from None
    if is_supervisor_user(url_user(settings.amqp_url), settings.user_prefix):
        raise ConfigError(
            f"no credentials for {address} in {path}: run `covey provision` (as the operator)"
        )
    return settings.amqp_url


@dataclass(frozen=True, slots=True)
class SenderCheck:
    """Whether a delivery's `user_id` may speak for the envelope's `sender`."""

    prefix: str
    trust_local: bool

    @classmethod
    def for_settings(cls, settings: Settings) -> SenderCheck:
        trust = settings.trust_local
        if trust is None:
            trust = not provisioned(settings)
        return cls(settings.user_prefix, trust)

    def problem(self, sender: str, user_id: str | None) -> str | None:
        """None when the sender is genuine, else one line saying why it is not."""
        speaks_for = participant_of(user_id, self.prefix)
        if speaks_for is not None and str(speaks_for) == sender:
            return None
        if speaks_for is None and self.trust_local and not _is_covey_user(user_id, self.prefix):
            return None
        if user_id is None:
            return f"claims to be from {sender} but carries no user_id, and trust_local is off"
        return f"claims to be from {sender} but was published by broker user {user_id!r}"


def _is_covey_user(user: str | None, prefix: str) -> bool:
    """A user `covey provision` made (a supervisor's, say): never a stand-in for others."""
    return bool(prefix) and user is not None and user.startswith(prefix)
