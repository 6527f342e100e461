"""The guard: stops an agent whose run can no longer prove it holds the lock.

A lock is bound to its holder's connection, but a holder that is only stalled
(SIGSTOP, a VM pause, a long GC or IO stall) does not know when the broker
frees its lock, and its agent — in a process group of its own — keeps working
beside the next holder's. So beside every agent `covey run` starts a guard: a
tiny separate process, not frozen with `covey run`, that knows the agent's
process group and the holder's lease deadline. `covey run` moves the deadline
on after each renewal (a round trip on the lock connection that proves it
still owns the lock). When the deadline passes unrenewed, the guard SIGTERMs
the agent's group, SIGKILLs what is left after `GRACE_SECONDS`, and exits.

The deadline is a CLOCK_MONOTONIC reading, shared by every process on the host,
so the guard and `covey run` agree on it without a clock of their own; the
broker and other hosts are never asked what time it is.

Protocol on the guard's stdin, one line each:

* ``P <pgid>`` — the agent's process group; written by the agent itself, between
  fork and exec, so the guard knows it before the agent runs a line of its own.
* ``R <deadline>`` — the lease now lasts until this monotonic time.
* ``D`` — the run is over and has ended its agent itself (or the agent exited):
  exit without touching anything.

End of input without ``D`` means `covey run` died: the group is stopped at once
(this also covers grandchildren that the kernel's parent-death signal misses).

This file runs as ``python -I -S guard.py DEADLINE LABEL`` and imports only what
it needs from the standard library, so it starts in a few tens of milliseconds.
The half that `covey run` uses (`Guard`) lives here too, with its imports kept
inside, so that both ends of the protocol are in one place.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

# Not `typing.TYPE_CHECKING`: importing typing (or contextlib) would double the guard's
# start-up time. Type checkers treat any name TYPE_CHECKING the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio

GRACE_SECONDS = 2.0  # SIGTERM, then this long, then SIGKILL: fixed, so the next holder knows
POLL_SECONDS = 0.05  # how often the group is checked during the grace


def _kill_group(pgid: int, why: str, label: str) -> None:
    print(f"covey guard: {why}; stopping {label} (process group {pgid})", file=sys.stderr)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(POLL_SECONDS)
    try:  # noqa: SIM105 (contextlib is not imported here, for a quick start)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def serve(deadline: float, label: str, stdin: int = 0) -> int:
    """Watch `stdin` until told done, or until the lease lapses or its writer dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the protocol ends a guard
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pgid: int | None = None
    pending = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 and pgid is not None:
            _kill_group(pgid, "the lock's lease lapsed (its holder stalled or lost it)", label)
            return 0
        # With no group yet there is nothing to stop: wait for one, or for the end.
        ready, _, _ = select.select([stdin], [], [], max(left, 0) if pgid is not None else None)
        if not ready:
            continue
        chunk = os.read(stdin, 4096)
        if not chunk:
            if pgid is not None:
                _kill_group(pgid, "its `covey run` went away without a word", label)
            return 0
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            what, _, value = line.decode("ascii", "replace").partition(" ")
            if what == "D":
                return 0
            if what == "P":
                pgid = int(value)
            elif what == "R":
                deadline = float(value)


class Guard:
    """`covey run`'s end of a guard: start it, tell it the group, renew, finish."""

    def __init__(self, process: asyncio.subprocess.Process, pipe: int) -> None:
        self.process = process
        self._pipe = pipe

    @classmethod
    async def start(cls, deadline: float, label: str) -> Guard:
        import asyncio

        read, write = os.pipe()  # not inherited across exec: only the guard keeps `read`
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                __file__,
                repr(deadline),
                label,
                stdin=read,
                stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # not stopped by the terminal's ^Z or ^C with covey run
            )
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        os.set_blocking(write, False)
        return cls(process, write)

    def announce_from_child(self) -> None:
        """In the agent, between fork and exec: tell the guard which group to stop.

        Only async-signal-safe work here (one write to an fd the child inherited)."""
        os.write(self._pipe, b"P %d\n" % os.getpid())

    def renew(self, deadline: float) -> None:
        self._send(b"R %r\n" % deadline)

    def _send(self, line: bytes) -> None:
        try:
            os.write(self._pipe, line)
        except BlockingIOError:
            pass  # a guard 64 KiB behind is stalled itself; the next renewal tries again
        except BrokenPipeError:
            pass  # the guard is gone; the runner notices its exit

    async def finish(self) -> None:
        """Tell the guard the run is over (its agent ended, or the run stopped it), and
        let it go."""
        import asyncio
        import contextlib

        if self._pipe >= 0:
            self._send(b"D\n")
            os.close(self._pipe)
            self._pipe = -1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


if __name__ == "__main__":
    sys.exit(serve(float(sys.argv[1]), sys.argv[2]))
