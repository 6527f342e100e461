"""covey as a library leaves a program's logging as the program set it (issue 12, item 7).

Only the `covey` command configures logging (`logs.configure`: its own root
handler, aio-pika and aiormq muted). A program that imports covey and uses the
Python API keeps its handlers and levels, and gets covey's records through its
own handler, filtered by the levels it chose.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

from conftest import World

# A program with logging of its own: one handler on the root that keeps every record,
# levels of its choosing (none of them what `logs.configure` would set), and covey
# imported only afterwards, so that setup at import time would show too.
PROGRAM = """
import asyncio, json, logging, sys
from pathlib import Path

home, covey_level = Path(sys.argv[1]), int(sys.argv[2])


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)  # the loggers' levels choose, not the handler
        self.records = []

    def emit(self, record):
        self.records.append(record)


kept = Kept()
formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
kept.setFormatter(formatter)
root = logging.getLogger()
root.handlers = [kept]
root.setLevel(logging.ERROR)
logging.getLogger("coordinator").setLevel(covey_level)
logging.getLogger("aio_pika").setLevel(logging.INFO)

import structlog

from coordinator import Covey, Namespace


async def use_covey():
    async with Namespace.load(home) as namespace:
        await namespace.apply_topology()
    async with Covey.open(identity="agent:scout", home=home) as scout:
        await scout.send("agent:writer", "hello", "from scout")
    async with Covey.open(identity="agent:writer", home=home) as writer:
        return [mail.envelope.subject for mail in await writer.inbox()]


subjects = asyncio.run(use_covey())
print(json.dumps({
    "subjects": subjects,
    "same_handlers": root.handlers == [kept] and kept.formatter is formatter,
    "handler_level": kept.level,
    "levels": {
        name: logging.getLogger(name).level
        for name in ("", "coordinator", "aio_pika", "aiormq", "coordinator.client")
    },
    "disabled_below": logging.root.manager.disable,
    "structlog_configured": structlog.is_configured(),
    "records": [[r.name, r.levelno, kept.format(r)] for r in kept.records],
}))
"""


def use_covey_from_a_program(world: World, covey_level: int) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(world.home), str(covey_level)],
        env=world.env,
        cwd=world.home,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # Every record went to the program's handler: nothing was written to stderr behind it.
    assert result.stderr == ""
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["subjects"] == ["hello"]
    return report


def assert_logging_untouched(report: dict[str, Any], covey_level: int) -> None:
    assert report["same_handlers"] is True
    assert report["handler_level"] == logging.DEBUG
    assert report["levels"] == {
        "": logging.ERROR,
        "coordinator": covey_level,
        "aio_pika": logging.INFO,
        "aiormq": logging.NOTSET,  # never set by the program, so not by covey either
        "coordinator.client": logging.NOTSET,
    }
    assert report["disabled_below"] == logging.NOTSET
    assert report["structlog_configured"] is False


def covey_records(report: dict[str, Any]) -> list[tuple[str, int, str]]:
    return [
        (name, level, text)
        for name, level, text in report["records"]
        if name == "coordinator" or name.startswith("coordinator.")
    ]


def test_a_program_that_chose_info_for_covey_gets_its_records_through_its_own_handler(
    world: World,
) -> None:
    report = use_covey_from_a_program(world, logging.INFO)
    assert_logging_untouched(report, logging.INFO)
    records = covey_records(report)
    assert all(level >= logging.INFO for _, level, _ in records), records
    said = {(name, level) for name, level, _ in records}
    assert ("coordinator.client", logging.INFO) in said, records
    texts = " ".join(text for _, _, text in records)
    assert "sent" in texts and "drained" in texts, records


def test_a_program_that_chose_warning_for_covey_gets_none_of_its_info(world: World) -> None:
    report = use_covey_from_a_program(world, logging.WARNING)
    assert_logging_untouched(report, logging.WARNING)
    records = covey_records(report)
    assert all(level >= logging.WARNING for _, level, _ in records), records


def test_a_command_that_logs_nothing_never_imports_structlog(world: World) -> None:
    """structlog (and `rich`, which it imports where installed) costs a cold command a
    third of its start-up, so it is imported on the first line logged; `covey search`
    logs none. A line that is logged (-v) still renders."""
    check = (
        "import sys\n"
        "from coordinator.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('structlog' in sys.modules, code)\n"
    )
    quiet = subprocess.run(
        [sys.executable, "-c", check, "search", "anything", "--as", "scout"],
        env=world.env,
        cwd=world.home,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert quiet.stdout.splitlines()[-1] == "False 0", quiet.stdout + quiet.stderr
    logged = world.covey("inbox", "--as", "scout", "-v")
    assert logged.returncode == 0 and "[info" in logged.stderr and "drained" in logged.stderr
