"""Cron schedules, read in the configured time zone (croniter does the parsing).

Five fields (minute hour day month weekday), or six with seconds last —
`* * * * * */10` fires every ten seconds, which is how tests drive the
scheduler without waiting minutes.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from croniter import croniter


class Schedule:
    def __init__(self, expression: str, zone: str = "UTC") -> None:
        self.expression = expression
        self.zone = ZoneInfo(zone)

    def next_after(self, moment: datetime) -> datetime:
        """The first firing strictly after `moment` (an aware datetime), in the zone."""
        nxt: datetime = croniter(self.expression, moment.astimezone(self.zone)).get_next(datetime)
        return nxt

    def __repr__(self) -> str:
        return f"Schedule({self.expression!r}, {self.zone.key!r})"
