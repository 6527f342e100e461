"""Logging: structlog to stderr, readable by default, JSON with COVEY_LOG_FORMAT=json.

Logs go to stderr and command results to stdout, so a model or a script can
read a command's answer without the log lines in it.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(log_format: str = "console", level: str = "warning") -> None:
    """Configure logging for this process; called once, by the entry point."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aio-pika and aiormq log connection trouble themselves; covey reports it once,
    # as one line with the fix, so theirs would only repeat it less clearly.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
