"""Preflight hooks: cheap checks before an agent starts, so a run does not burn its time
(or a model call) while what it needs is down.

A hook is a command (passes on exit 0) or an HTTP URL (passes on the expected
status, else any 2xx), each with a timeout. The first failure skips the run
with the hook's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

from coordinator.roster import PreflightHook


async def failure(hook: PreflightHook, cwd: Path, env: dict[str, str]) -> str | None:
    """Why `hook` fails, in one line; None when it passes."""
    if hook.command is not None:
        return await _command_failure(hook, hook.command, cwd, env)
    return await asyncio.to_thread(_http_failure, hook, str(hook.http))


async def _command_failure(
    hook: PreflightHook, command: list[str], cwd: Path, env: dict[str, str]
) -> str | None:
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as err:
        return f"{hook.label}: cannot run {command[0]!r} ({err.strerror})"
    try:
        async with asyncio.timeout(hook.timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        return f"{hook.label}: no answer within {hook.timeout:g} s"
    if process.returncode == 0:
        return None
    lines = output.decode(errors="replace").strip().splitlines()
    said = f": {lines[-1][:200]}" if lines else ""
    return f"{hook.label}: exited with {process.returncode}{said}"


def _http_failure(hook: PreflightHook, url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=hook.timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"{hook.label}: {url} did not answer ({reason})"
    passed = status == hook.expect_status if hook.expect_status else 200 <= status < 300
    if passed:
        return None
    expected = hook.expect_status or "2xx"
    return f"{hook.label}: {url} answered {status}, expected {expected}"
