"""How a run ended: the outcome every `run.finished` event carries, and `covey run`'s exit code.

Its own module (the runner re-exports it) so that the events and the metrics,
which the runner imports, can use it too without importing the runner.
"""

from __future__ import annotations

from enum import StrEnum

from coordinator.errors import ExitCode


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SKIPPED_BUSY = "skipped:busy"
    SKIPPED_PREFLIGHT = "skipped:preflight"
    LOCK_LOST = "lock-lost"
    STOPPED = "stopped"  # told to stop (SIGTERM, or the supervisor's grace ran out)

    @property
    def exit_code(self) -> ExitCode:
        return _EXIT_CODES[self]

    @property
    def is_failure(self) -> bool:
        """The agent ran and did not end well: failed, timed out or lost its lock. (A
        stopped run was told to stop; a skipped one never started.)"""
        return self in _FAILURES

    @property
    def is_skip(self) -> bool:
        """The agent was not started (busy, or a preflight check failed)."""
        return self in _SKIPS

    @classmethod
    def parse(cls, value: str | None) -> Outcome | None:
        """The outcome an event names; None for none, or for one this version does not
        know (a newer publisher's)."""
        try:
            return cls(value) if value is not None else None
        except ValueError:
            return None


_EXIT_CODES = {
    Outcome.OK: ExitCode.OK,
    Outcome.FAILED: ExitCode.FAILED,
    Outcome.TIMEOUT: ExitCode.TIMED_OUT,
    Outcome.SKIPPED_BUSY: ExitCode.SKIPPED_BUSY,
    Outcome.SKIPPED_PREFLIGHT: ExitCode.SKIPPED_PREFLIGHT,
    Outcome.LOCK_LOST: ExitCode.LOCK_LOST,
    Outcome.STOPPED: ExitCode.FAILED,
}
_FAILURES = frozenset({Outcome.FAILED, Outcome.TIMEOUT, Outcome.LOCK_LOST})
_SKIPS = frozenset({Outcome.SKIPPED_BUSY, Outcome.SKIPPED_PREFLIGHT})
