"""Cron across daylight saving (issue 11, item 9): each firing exactly once, on a fake clock.

The expected firings come from an oracle that walks real time (UTC) second by second or
minute by minute and asks what the wall clock in the zone says then — not from croniter's
arithmetic, which is what is under test. The policy (see coordinator/schedule.py): a
fixed-time job (`30 2 * * *`) fires once a day — at the first 02:30 when the clocks go
back, right after the jump when they go forward past it; every other job fires at every
real moment whose wall-clock time matches.
"""

from __future__ import annotations

import itertools
import signal
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from conftest import World, start
from test_run import stamping_agent, wait_for
from test_supervisor import starts

from coordinator.localbroker import free_port
from coordinator.schedule import Schedule, next_due

# The four changes of 2026: (zone, the day, its UTC midnight-to-midnight window).
DAYS = [
    ("Europe/Paris", "2026-03-29"),  # 02:00 -> 03:00
    ("Europe/Paris", "2026-10-25"),  # 03:00 -> 02:00
    ("America/New_York", "2026-03-08"),  # 02:00 -> 03:00
    ("America/New_York", "2026-11-01"),  # 02:00 -> 01:00
]
MINUTE_SCHEDULES = ["30 2 * * *", "30 1 * * *", "*/20 * * * *", "50 * * * *", "0 * * * *"]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def window(zone: str, day: str) -> tuple[datetime, datetime]:
    """Real time from the local midnight before `day` to the local midnight after it."""
    z = ZoneInfo(zone)
    first = datetime.fromisoformat(day).replace(tzinfo=z)
    return first.astimezone(UTC), (first + timedelta(days=1)).astimezone(UTC)


def _matches(expression: str, wall: datetime) -> bool:
    """Whether a 5- or 6-field cron expression (only `*`, `*/N` and numbers, as used
    here) matches a wall-clock time."""
    fields = expression.split()
    values = [wall.minute, wall.hour, wall.day, wall.month, wall.isoweekday() % 7]
    if len(fields) == 6:
        values.append(wall.second)
    for field, value in zip(fields, values, strict=True):
        if field == "*":
            continue
        if field.startswith("*/"):
            if value % int(field[2:]):
                return False
        elif int(field) != value:
            return False
    return len(fields) == 6 or wall.second == 0


def expected(expression: str, zone: str, begin: datetime, end: datetime) -> list[datetime]:
    """The firings in [begin, end) the policy asks for, found by walking real time."""
    z = ZoneInfo(zone)
    step = timedelta(seconds=1 if len(expression.split()) == 6 else 60)
    fixed = not expression.split()[0].startswith("*") and not expression.split()[1].startswith("*")
    found: list[datetime] = []
    seen_walls: set[datetime] = set()
    moment = begin
    while moment < end:
        local = moment.astimezone(z)
        wall = local.replace(tzinfo=None)
        if _matches(expression, wall) and not (fixed and wall in seen_walls):
            found.append(moment)  # a fixed job: the first of two equal wall times only
        seen_walls.add(wall)
        if fixed:
            # Spring forward: the wall clock jumped over the job's time (02:30 never
            # happened today): it fires once, at the first moment after the jump.
            before = (moment - step).astimezone(z).replace(tzinfo=None)
            skipped = before + timedelta(seconds=step.total_seconds())
            while skipped < wall:
                if _matches(expression, skipped):
                    found.append(moment)
                    break
                skipped += step
        moment += step
    return found


def fired(schedule: Schedule, begin: datetime, end: datetime) -> list[datetime]:
    """What the schedule fires in [begin, end), firing by firing, as the supervisor asks."""
    out = []
    moment = begin - timedelta(microseconds=1)  # "strictly after": include `begin` itself
    while (moment := schedule.next_after(moment)) < end:
        assert moment.utcoffset() == timedelta(0), "a firing not in UTC"
        out.append(moment)
    return out


@pytest.mark.parametrize(("zone", "day"), DAYS)
@pytest.mark.parametrize("expression", MINUTE_SCHEDULES)
def test_each_firing_happens_exactly_once_across_a_dst_change(
    expression: str, zone: str, day: str
) -> None:
    begin, end = window(zone, day)
    want = expected(expression, zone, begin, end)
    got = fired(Schedule(expression, zone), begin, end)
    assert want, "the oracle found nothing: the test would prove nothing"
    assert got == want, [f"{m:%H:%M}Z" for m in got]


@pytest.mark.parametrize(("zone", "day"), DAYS)
def test_a_seconds_schedule_fires_at_every_real_moment_across_the_change(
    zone: str, day: str
) -> None:
    expression = "* * * * * */20"
    begin, end = window(zone, day)
    # The two hours around the change, second by second (the whole day is 4,320 firings).
    change = next(
        m
        for m in (begin + timedelta(hours=h) for h in range(24))
        if m.astimezone(ZoneInfo(zone)).utcoffset()
        != (m + timedelta(hours=1)).astimezone(ZoneInfo(zone)).utcoffset()
    )
    begin, end = change, change + timedelta(hours=2)
    want = expected(expression, zone, begin, end)
    assert len(want) == 2 * 60 * 3  # every 20 s of real time, none lost, none doubled
    assert fired(Schedule(expression, zone), begin, end) == want


def test_the_fixed_time_policy_on_the_paris_days() -> None:
    """The policy, spelled out: one 02:30 on the fall-back day (the first, 00:30Z), and
    on the spring-forward day one firing right after the jump (03:00 local, 01:00Z)."""
    daily = Schedule("30 2 * * *", "Europe/Paris")
    assert fired(daily, *window("Europe/Paris", "2026-10-25")) == [utc("2026-10-25T00:30")]
    assert fired(daily, *window("Europe/Paris", "2026-03-29")) == [utc("2026-03-29T01:00")]
    hourly = Schedule("50 * * * *", "Europe/Paris")
    fall_back = fired(hourly, *window("Europe/Paris", "2026-10-25"))
    assert utc("2026-10-25T00:50") in fall_back and utc("2026-10-25T01:50") in fall_back
    assert len(fall_back) == 25  # the day has 25 real hours
    assert Schedule("@daily", "Europe/Paris").fixed_time
    assert not Schedule("@hourly", "Europe/Paris").fixed_time


def test_next_due_across_agents_compares_real_time() -> None:
    """`*/20` and `50 *` in Paris after 00:40Z on 2026-10-25: next is the 00:50Z firing
    (02:50 CEST), not the */20 one at 01:00Z (02:00 CET, earlier on the wall clock)."""
    schedules = {
        "twenty": Schedule("*/20 * * * *", "Europe/Paris"),
        "fifty": Schedule("50 * * * *", "Europe/Paris"),
    }
    moment = utc("2026-10-25T00:40")
    steps = []
    while moment < utc("2026-10-25T02:00"):
        due = next_due(schedules, moment)
        assert due is not None
        steps.append((f"{due.at:%H:%M}", due.names))
        moment = due.at
    assert steps == [
        ("00:50", ("fifty",)),
        ("01:00", ("twenty",)),
        ("01:20", ("twenty",)),
        ("01:40", ("twenty",)),
        ("01:50", ("fifty",)),
        ("02:00", ("twenty",)),
    ]
    assert next_due({}, moment) is None


def test_agents_due_at_the_same_moment_fire_together() -> None:
    schedules = {
        "a": Schedule("0 * * * *", "Europe/Paris"),
        "b": Schedule("*/20 * * * *", "Europe/Paris"),
        "c": Schedule("0 * * * *", "America/New_York"),
    }
    due = next_due(schedules, utc("2026-10-25T00:45"))
    assert due is not None and due.at == utc("2026-10-25T01:00") and due.names == ("a", "b", "c")


@pytest.mark.slow
def test_the_supervisor_fires_seconds_schedules_in_real_time(applied: World) -> None:
    """The real daemon, in a zone other than UTC, with two seconds schedules that are due
    at different moments: each fires on its own beat, neither starves the other."""
    applied.extra_env["COVEY_TIMEZONE"] = "Europe/Paris"
    log = stamping_agent(applied, "every2", 0.1, 'schedule = "* * * * * */2"\nlock = "none"')
    stamping_agent(applied, "every3", 0.1, 'schedule = "* * * * * */3"\nlock = "none"')
    supervisor = start(applied, "supervise", "--metrics-port", str(free_port()))
    try:
        wait_for(lambda: len(starts(log, "every2")) >= 5 and len(starts(log, "every3")) >= 3, 60)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        _, err = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, err
    assert "zone=Europe/Paris" in err
    for name, beat in (("every2", 2), ("every3", 3)):
        times = starts(log, name)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Never twice for one tick; a tick that finds the last run still going is skipped.
        assert all(beat - 1.0 < gap < 3 * beat + 1.0 for gap in gaps), (name, gaps)
