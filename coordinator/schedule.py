"""Cron schedules, read in the configured time zone (croniter does the parsing).

Five fields (minute hour day month weekday), or six with seconds last —
`* * * * * */10` fires every ten seconds, which is how tests drive the
scheduler without waiting minutes.

Firings are computed on the zone's wall clock but handed out, compared and
waited for as aware UTC datetimes: two aware datetimes in one zone compare by
wall-clock time, which is wrong for the hour that repeats when the clocks go back.

Daylight saving, the way Vixie cron (and systemd's OnCalendar) do it:

* a *fixed-time* job — neither its minute nor its hour field starts with `*`,
  e.g. `30 2 * * *` — fires once a day: when the clocks go back, at the first
  of the two 02:30s; when they go forward past its time (02:30 does not exist),
  once, right after the jump (03:00 local);
* every other job (`*/20 * * * *`, `50 * * * *`, `0 * * * *`, seconds
  schedules) follows real time: it fires at every real moment whose wall-clock
  time matches — twice in the repeated hour, not at all in the skipped one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

_MAX_SKIPS = 8  # second occurrences skipped in a row; one is all a real zone needs


class Schedule:
    def __init__(self, expression: str, zone: str = "UTC") -> None:
        self.expression = expression
        self.zone = ZoneInfo(zone)
        # After croniter expanded aliases (`@daily` is `0 0 * * *`).
        minute, hour = croniter(expression).expressions[:2]
        self.fixed_time = not str(minute).startswith("*") and not str(hour).startswith("*")

    def next_after(self, moment: datetime) -> datetime:
        """The first firing strictly after `moment` (an aware datetime), in UTC."""
        after = moment.astimezone(UTC)
        local = after.astimezone(self.zone)
        for _ in range(_MAX_SKIPS):
            nxt: datetime = croniter(self.expression, local).get_next(datetime)
            at = nxt.astimezone(UTC)
            if at > after and not (self.fixed_time and _second_occurrence(nxt)):
                return at
            local = nxt  # a repeated wall time this job already had, or not later: step on
        return at  # unreachable with real zones; never loop forever on a broken one

    def __repr__(self) -> str:
        return f"Schedule({self.expression!r}, {self.zone.key!r})"


def _second_occurrence(local: datetime) -> bool:
    """Whether `local` is the second time its wall-clock time happens (clocks went back)."""
    return local.fold == 1 and local.utcoffset() != local.replace(fold=0).utcoffset()


@dataclass(frozen=True, slots=True)
class Due:
    """The next moment anything is due (UTC), and who is due then."""

    at: datetime
    names: tuple[str, ...]


def next_due(schedules: Mapping[str, Schedule], after: datetime) -> Due | None:
    """What fires next strictly after `after`, across all `schedules`; None if none.
    Compared in UTC, so a job in the repeated hour is not taken for a later one."""
    due = {name: schedule.next_after(after) for name, schedule in schedules.items()}
    if not due:
        return None
    at = min(due.values())
    return Due(at, tuple(sorted(name for name, when in due.items() if when == at)))
