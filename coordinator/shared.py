"""An answer shared by every caller that can take it: `/api/agents` at a thousand agents.

Looking at every agent costs thousands of round trips (a passive declare for each
mail queue and each lock slot: 0.7-1.4 s at 1,000 agents, by the hour). Fifty pages
that refetch after the same run event would ask for fifty such sweeps at once, and a
dashboard refreshed every few seconds does not need a sweep of its own each time.

So each caller says how old an answer it takes (`max_age`, seconds) and gets the
newest answer that began no earlier than that: the last one if it is young enough,
else the sweep under way if that began late enough, else a new sweep, which every
caller arriving meanwhile joins. `max_age=0` asks for a sweep that began after the
call: it sees every change made before it. At most one sweep runs at a time; a
caller who cannot take the running one waits for it to end and then starts (or
joins) the next, so callers that come while a sweep runs share the one after it:
fifty at once cost two sweeps, not fifty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Sweep(Generic[T]):
    began: float  # the event loop's clock
    of: object  # what it is an answer of (see `get`)
    task: asyncio.Task[T]


class SharedAnswer(Generic[T]):
    """`await shared.get(max_age, compute, of)`: a value of `compute()` begun at most
    `max_age` seconds ago, and how many seconds ago it began (see the module
    docstring). Every caller's `compute` for the same `of` (what the answer is of: a
    roster, by identity) must come to the same answer, as the one that begins a sweep
    serves all the callers that join it; an answer of another `of` is never taken."""

    def __init__(self) -> None:
        self._last: _Sweep[T] | None = None  # the newest answer (its task is done)
        self._running: _Sweep[T] | None = None

    async def get(
        self, max_age: float, compute: Callable[[], Coroutine[Any, Any, T]], of: object = None
    ) -> tuple[T, float]:
        loop = asyncio.get_running_loop()
        oldest = loop.time() - max_age
        while True:
            last = self._last
            if last is not None and last.of is of and last.began >= oldest:
                return last.task.result(), loop.time() - last.began
            sweep = self._running
            if sweep is None:
                task = asyncio.create_task(compute())
                task.add_done_callback(self._ended)
                sweep = self._running = _Sweep(loop.time(), of, task)
            elif sweep.of is not of or sweep.began < oldest:
                # Not one this caller takes: once it ends, the next begins late enough.
                await asyncio.wait([sweep.task])
                continue
            # Shielded: a caller that leaves (a page closed) does not end it for the others.
            value = await asyncio.shield(sweep.task)
            return value, loop.time() - sweep.began

    def _ended(self, task: asyncio.Task[T]) -> None:
        sweep, self._running = self._running, None
        assert sweep is not None and sweep.task is task
        if task.cancelled():
            return
        if task.exception() is None:  # retrieved: those who waited for it got it
            self._last = sweep
