"""Errors a user can hit, each with the exit code the CLI gives it.

Every error carries one line that names the problem and the fix; the CLI prints
exactly that line. Exit codes are part of the interface (scripts and crontabs
branch on them), so they live here, in one place.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # a command that ran and did not succeed (e.g. `wait` timed out)
    BAD_INPUT = 2  # invalid arguments, addresses, bodies, config files
    NO_RECIPIENT = 3  # no queue takes the message
    BROKER_UNAVAILABLE = 4  # RabbitMQ unreachable, refused us, or blocked us
    SKIPPED_BUSY = 5  # `covey run`: the lock was held by someone else
    SKIPPED_PREFLIGHT = 6  # `covey run`: a preflight check failed
    TIMED_OUT = 7  # `covey run`: the agent ran past its timeout and was stopped
    LOCK_LOST = 8  # `covey run`: the lock connection dropped mid-run; the agent was stopped
    NOT_RETAINED = 9  # `covey attach`: retention removed the session ([sessions] in covey.toml)
    NOT_RUNNING = 10  # `covey stop`: the run has ended, or the agent is not running
    INTERNAL = 70  # a bug in covey (EX_SOFTWARE)


class CoveyError(Exception):
    """Base of the errors covey reports to a person; `str(err)` is one line."""

    exit_code: ExitCode = ExitCode.FAILED


class BadInput(CoveyError):
    """The caller gave something covey cannot use: fix the input and retry."""

    exit_code = ExitCode.BAD_INPUT


class ConfigError(BadInput):
    """A settings file or roster entry is broken; the message names file and field."""


class TopologyMissing(ConfigError):
    """The namespace lacks covey's exchanges or a participant's queue."""


class NotFound(BadInput):
    """A message id, agent or participant that does not exist."""


class NoRecipient(CoveyError):
    """The recipient is unknown, so no queue takes the message."""

    exit_code = ExitCode.NO_RECIPIENT


class MailboxBusy(CoveyError):
    """Another process held the mailbox's write lock for longer than SQLite waits."""


class BrokerUnavailable(CoveyError):
    """RabbitMQ could not be reached or refused the connection."""

    exit_code = ExitCode.BROKER_UNAVAILABLE


class NotRetained(CoveyError):
    """The run is known (its record says so) but retention has removed its whole session:
    nothing left to show; its run log on the host that ran it has every line."""

    exit_code = ExitCode.NOT_RETAINED


class NotRunning(CoveyError):
    """`covey stop` found nothing to stop: the run has ended, or the agent is not running."""

    exit_code = ExitCode.NOT_RUNNING


class InvalidEnvelope(ValueError):
    """A delivery that is not a valid covey message; `reason` goes into its dead letter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def first_problem(err: ValidationError) -> tuple[str, str]:
    """The field and the problem of a validation error's first complaint, for one line."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return field, "unknown key; check its spelling against the README"
    return field, first["msg"].removeprefix("Value error, ")


class MailboxUnusable(ConfigError):
    """The mailbox file cannot take mail: read-only, corrupt, or its disk full. Exit 2,
    as for a broken config: the fix is on this machine (the line says which), and the
    mail waits with the broker meanwhile."""
