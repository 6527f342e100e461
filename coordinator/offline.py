"""One's own mailbox, opened with the standard library alone: `covey read`, `done`, `search`.

These commands touch nothing but the participant's SQLite mailbox, yet through the
namespace (coordinator.client) a cold one spends most of its time importing pydantic,
the settings model and the roster's: about 250 ms where the interpreter takes 25.
So the command line first tries this way, which finds the mailbox as `covey notify`
does (home.py: the same sources, ranked as settings.py ranks them) and checks that
the identity is one the roster's files plainly list.

Anything less plain goes the usual way, whose checks then say what is wrong in the
usual words: no home, no identity, an address that is not a participant, one the
files do not list, or people given in COVEY_HUMANS rather than covey.toml. What
this way does not check is the rest of the configuration: a participant reads its
own mail even while covey.toml or its own agent.toml has a mistake, which every
command that needs the broker or the roster still reports.
"""

from __future__ import annotations

import os
from pathlib import Path

from coordinator.errors import BadInput
from coordinator.home import AGENT_FILE, ROSTER_DIR, find_home, mailbox_file, read_config, setting
from coordinator.mailbox import MailStore
from coordinator.names import Address


def own_mailbox(identity: str | None) -> tuple[Address, MailStore] | None:
    """Who `identity` is (else COVEY_AGENT, else covey.toml's identity) and its mailbox,
    when that is plainly a participant of this home; None when anything is not plain."""
    home = find_home()
    if home is None or os.environ.get("COVEY_HUMANS"):
        return None
    config = read_config(home)
    text = identity or os.environ.get("COVEY_AGENT") or setting("identity", config)
    try:
        me = Address.participant(text) if text else None
    except BadInput:
        return None
    if me is None or not _listed(me, home, config):
        return None
    return me, MailStore(mailbox_file(me, config))


def _listed(participant: Address, home: Path, config: dict[str, object]) -> bool:
    """Whether the roster's files list `participant`: an agent's folder with its
    agent.toml (valid or not: that takes the roster's model), or a person's
    [humans.NAME] in covey.toml."""
    if participant.kind == "agent":
        return (home / ROSTER_DIR / participant.name / AGENT_FILE).is_file()
    humans = config.get("humans")
    return isinstance(humans, dict) and participant.name in humans
