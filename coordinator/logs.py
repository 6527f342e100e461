"""Logging: structlog over the standard library, to stderr; readable, or JSON with
COVEY_LOG_FORMAT=json.

covey's modules log through `get_logger`, which sits on a stdlib logger: in a
program that has not configured logging, covey (a library there) stays quiet
below WARNING. A program that has gets covey's records (loggers `coordinator.*`,
each message structlog's event dict) through its own handlers, at its own
levels: importing covey and its Python API configure nothing, neither logging
nor structlog (tests/test_logging.py holds them to it). Only the `covey`
command calls `configure`, which renders every line — covey's and its
libraries' — the same way, with the run's `agent` and `run_id` bound through
context variables. Logs go to stderr and command results to stdout, so a model
or a script reads an answer without log lines in it.
"""

from __future__ import annotations

import logging
import sys

import structlog

from coordinator.display import printable

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,  # its processors are fixed here: no need to re-bind
    )
    return logger


def _neutralised(
    logger: object, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Participants' text (a dead letter's id, a sender) reaches log lines too: on a
    console it must not carry raw escapes or newlines. (JSON escapes them already.)"""
    return {k: printable(v) if isinstance(v, str) else v for k, v in event_dict.items()}


def configure(log_format: str = "console", level: str = "warning") -> None:
    """Send every log line to stderr, rendered once. It takes over the process's logging
    (the root logger's handlers and level, aio-pika's and aiormq's levels), so only the
    `covey` command's entry point may call it, never the library."""
    renderers: list[structlog.typing.Processor] = (
        [structlog.processors.JSONRenderer()]
        if log_format == "json"
        else [_neutralised, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[
                *_SHARED,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *renderers,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # aio-pika and aiormq log connection trouble themselves; covey reports it once,
    # as one line with the fix, so theirs would only repeat it less clearly.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
