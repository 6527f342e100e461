"""SharedAnswer (coordinator/shared.py), which `/api/agents` answers from: callers at the same
moment share one look, and none is ever given a look older than it asked for, whatever
the order in which callers come, leave or fail. The looks here read a counter that the
test changes; the web test (test_web_agents) does the same over a real broker."""

from __future__ import annotations

import asyncio
import random

import pytest

from coordinator.shared import SharedAnswer


class World:
    """A value that changes, and a look at it that takes `seconds`: what it returns is
    the value as it was when the look began."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.value = 0
        self.looks = 0
        self.seconds = seconds
        self.fail_next = False

    async def look(self) -> int:
        self.looks += 1
        seen = self.value
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("lost the broker")
        await asyncio.sleep(self.seconds)
        return seen


async def test_callers_at_the_same_moment_share_two_looks() -> None:
    """The first caller's look begins as it calls, so before the others' calls: they
    share the next one, begun after theirs. Fifty callers, two looks."""
    world, shared = World(), SharedAnswer[int]()
    answers = await asyncio.gather(*(shared.get(0, world.look) for _ in range(50)))
    assert [value for value, _ in answers] == [0] * 50
    assert world.looks == 2


async def test_callers_that_take_a_look_under_way_share_it() -> None:
    world, shared = World(), SharedAnswer[int]()
    answers = await asyncio.gather(*(shared.get(1, world.look) for _ in range(50)))
    assert [value for value, _ in answers] == [0] * 50
    assert world.looks == 1


async def test_a_caller_never_gets_a_look_begun_before_the_change_it_follows() -> None:
    world, shared = World(), SharedAnswer[int]()
    first = asyncio.create_task(shared.get(0, world.look))
    await asyncio.sleep(0.05)  # the first look is under way, and has seen 0
    world.value = 1
    later = [asyncio.create_task(shared.get(0, world.look)) for _ in range(10)]
    assert (await first)[0] == 0
    assert [(await task)[0] for task in later] == [1] * 10
    assert world.looks == 2  # the ten shared the one begun after the first ended


async def test_an_answer_as_old_as_the_caller_takes_is_reused_and_says_its_age() -> None:
    world, shared = World(seconds=0.01), SharedAnswer[int]()
    await shared.get(0, world.look)
    world.value = 1
    await asyncio.sleep(0.1)
    value, age = await shared.get(5, world.look)
    assert (value, world.looks) == (0, 1) and 0.1 <= age < 5
    value, age = await shared.get(0.05, world.look)  # older than that: a new look
    assert (value, world.looks) == (1, 2) and age < 0.05


async def test_an_answer_of_another_roster_is_never_taken() -> None:
    world, shared = World(seconds=0.01), SharedAnswer[int]()
    before, after = object(), object()
    await shared.get(60, world.look, before)
    world.value = 1
    assert (await shared.get(60, world.look, after))[0] == 1
    assert world.looks == 2


async def test_a_caller_that_leaves_does_not_end_the_look_for_the_others() -> None:
    world, shared = World(), SharedAnswer[int]()
    leaving = asyncio.create_task(shared.get(0, world.look))
    staying = asyncio.create_task(shared.get(1, world.look))  # takes the leaver's look
    await asyncio.sleep(0.05)
    leaving.cancel()
    assert (await staying)[0] == 0
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert world.looks == 1


async def test_a_failed_look_fails_its_callers_and_is_not_kept() -> None:
    world, shared = World(), SharedAnswer[int]()
    world.fail_next = True
    results = await asyncio.gather(
        *(shared.get(60, world.look) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in results)
    assert (await shared.get(60, world.look))[0] == 0  # the next caller looks again
    assert world.looks == 2


async def test_callers_coming_and_leaving_at_random_get_no_look_older_than_they_asked() -> None:
    """200 callers, at random moments and with random ages, some leaving early, while
    the value keeps changing: each answer is a value that was current at some moment
    within the caller's max_age before its call, or later."""
    world, shared = World(seconds=0.02), SharedAnswer[int]()
    loop = asyncio.get_running_loop()
    history: list[tuple[float, int]] = [(loop.time(), 0)]  # when each value became current
    rng = random.Random(17)

    async def changing() -> None:
        for value in range(1, 60):
            await asyncio.sleep(rng.uniform(0, 0.02))
            world.value = value
            history.append((loop.time(), value))

    async def caller() -> None:
        await asyncio.sleep(rng.uniform(0, 1.0))
        max_age = rng.choice([0, 0, 0.01, 0.05, 0.2])
        called = loop.time()
        task = asyncio.create_task(shared.get(max_age, world.look))
        if rng.random() < 0.2:
            await asyncio.sleep(rng.uniform(0, 0.03))
            task.cancel()
            return
        value, age = await task
        # The value was current at (called - max_age) or after: not replaced before then.
        replaced = [at for at, v in history if v == value + 1]
        assert not replaced or replaced[0] >= called - max_age - 0.001, (value, max_age)
        assert age <= loop.time() - called + max_age + 0.001

    changes = asyncio.create_task(changing())
    await asyncio.gather(*(caller() for _ in range(200)))
    await changes
    assert world.looks < 200
