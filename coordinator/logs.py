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

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from coordinator.display import printable

if TYPE_CHECKING:
    import structlog

# structlog is imported on the first line that passes its logger's level, not before:
# most commands log nothing, and importing it (with what it pulls in) is a good part of
# a cold command's start-up.


class Logger:
    """A covey module's logger: structlog's stdlib BoundLogger over the stdlib logger of
    the same name, made on the first call whose level is enabled there."""

    __slots__ = ("_bound", "_stdlib")

    def __init__(self, name: str) -> None:
        self._stdlib = logging.getLogger(name)
        self._bound: structlog.stdlib.BoundLogger | None = None

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        if not self._stdlib.isEnabledFor(level):
            return
        if self._bound is None:
            self._bound = _wrap(self._stdlib)
        getattr(self._bound, method)(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the exception being handled (call it in an `except` block)."""
        self._emit(logging.ERROR, "exception", event, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def _wrap(stdlib: logging.Logger) -> structlog.stdlib.BoundLogger:
    import structlog

    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        stdlib,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,  # its processors are fixed here: no need to re-bind
    )
    return logger


@contextlib.contextmanager
def bound(**fields: str) -> Iterator[None]:
    """Every line logged in the block (in this task and those it starts) carries
    `fields`, e.g. the run's agent and run_id."""
    import structlog.contextvars

    with structlog.contextvars.bound_contextvars(**fields):
        yield


def _neutralised(
    logger: object, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Participants' text (a dead letter's id, a sender) reaches log lines too: on a
    console it must not carry raw escapes or newlines. (JSON escapes them already.)"""
    return {k: printable(v) if isinstance(v, str) else v for k, v in event_dict.items()}


class _Formatter(logging.Formatter):
    """structlog's ProcessorFormatter, made on the first record it formats."""

    def __init__(self, log_format: str) -> None:
        super().__init__()
        self._log_format = log_format
        self._made: logging.Formatter | None = None

    def format(self, record: logging.LogRecord) -> str:
        if self._made is None:
            self._made = _processor_formatter(self._log_format)
        return self._made.format(record)


def _processor_formatter(log_format: str) -> logging.Formatter:
    import structlog

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderers: list[structlog.typing.Processor] = (
        [structlog.processors.JSONRenderer()]
        if log_format == "json"
        else [_neutralised, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *renderers,
        ],
    )


def configure(log_format: str = "console", level: str = "warning") -> None:
    """Send every log line to stderr, rendered once. It takes over the process's logging
    (the root logger's handlers and level, aio-pika's and aiormq's levels), so only the
    `covey` command's entry point may call it, never the library."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(log_format))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # aio-pika and aiormq log connection trouble themselves; covey reports it once,
    # as one line with the fix, so theirs would only repeat it less clearly.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
