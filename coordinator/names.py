"""Names and addresses: who mail can be sent to, and how that maps onto the broker.

An address is what a person types (`agent:scout`, `scout`, `team:research`,
`human:ada`, `all`); its routing key is what the `covey` exchange routes on
(`agent.scout`, `team.research`, `human.ada`, `broadcast`); a participant's
queue is named after its own routing key.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from coordinator.errors import BadInput

NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
_NAME = re.compile(NAME_PATTERN)

Kind = Literal["agent", "human", "team", "all"]
PARTICIPANT_KINDS: tuple[Kind, ...] = ("agent", "human")
_KINDS: tuple[Kind, ...] = ("agent", "human", "team", "all")


def _problem(name: str, what: str) -> str | None:
    if _NAME.fullmatch(name):
        return None
    return (
        f"invalid {what} {name!r}: use 1-64 characters of a-z, 0-9, '_' and '-', "
        "starting with a letter or digit"
    )


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a valid covey name, else raise BadInput saying why."""
    if problem := _problem(name, what):
        raise BadInput(problem)
    return name


def valid_names(names: list[str], what: str) -> list[str]:
    """For pydantic validators: the names if all are valid, else ValueError for the first."""
    for name in names:
        if problem := _problem(name, what):
            raise ValueError(problem)
    return names


@dataclass(frozen=True, slots=True)
class Address:
    """A mail address: a participant (`agent`, `human`), a `team`, or `all` agents."""

    kind: Kind
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse `agent:NAME`, bare `NAME` (an agent), `team:NAME`, `human:NAME` or `all`."""
        return _parse(text)

    @classmethod
    def _parse(cls, text: str) -> Address:
        text = text.strip()
        if text == "all":
            return cls("all")
        kind, sep, name = text.partition(":")
        if not sep:
            kind, name = "agent", text
        if kind not in _KINDS or kind == "all":
            raise BadInput(
                f"invalid address {text!r}: use agent:NAME, NAME, team:NAME, human:NAME or all"
            )
        return cls(kind, check_name(name, f"{kind} name"))

    @classmethod
    def participant(cls, text: str) -> Address:
        """Parse an address that must name one participant (an agent or a human)."""
        address = cls.parse(text)
        if not address.is_participant:
            raise BadInput(f"{text!r} is not a participant: use agent:NAME or human:NAME")
        return address

    @property
    def is_participant(self) -> bool:
        return self.kind in PARTICIPANT_KINDS

    @property
    def routing_key(self) -> str:
        return "broadcast" if self.kind == "all" else f"{self.kind}.{self.name}"

    @property
    def queue(self) -> str:
        """The participant's own durable queue."""
        if not self.is_participant:
            raise ValueError(f"{self} has no queue of its own")
        return self.routing_key

    def __str__(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.name}"


# Every message names a sender and a recipient, parsed at each step; there are few
# distinct addresses, so each is parsed once. (Errors are raised, not cached.)
_parse = functools.lru_cache(maxsize=4096)(Address._parse)
