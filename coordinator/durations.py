"""Durations as people write them in config files and flags: `90`, `90s`, `5m`, `1h30m`, `2d`."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import BeforeValidator

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float) -> float:
    """Seconds in `text`; a bare number is seconds. Raises ValueError naming the format."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        compact = text.strip().replace(" ", "")
        try:
            seconds = float(compact)
        except ValueError:
            parts = _PART.findall(compact)
            if not parts or "".join(n + u for n, u in parts) != compact:
                raise ValueError(
                    f"invalid duration {text!r}: use seconds or e.g. 90s, 5m, 1h30m, 2d"
                ) from None
            seconds = sum(float(n) * _SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds):  # float() takes "inf" and "nan"
        raise ValueError(f"invalid duration {text!r}: use seconds or e.g. 90s, 5m, 1h30m, 2d")
    if seconds < 0:
        raise ValueError(f"invalid duration {text!r}: it cannot be negative")
    return seconds


Seconds = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type: accepts `90`, `"90s"`, `"5m"`, … and holds seconds."""


def parse_since(text: str) -> int | datetime:
    """A point in a stream, as people write it: an offset (`123` or `#123`), an ISO time
    (UTC unless it says), or a duration back from now (`2h`). ValueError naming the
    three forms otherwise."""
    offset = text.lstrip("#")
    if offset.isascii() and offset.isdigit():  # "²" is a digit to isdigit, not to int
        return int(offset)
    try:
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    except ValueError:
        pass
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except (ValueError, OverflowError):  # OverflowError: further back than year 1
        raise ValueError(
            f"{text!r} is not an offset, an ISO time or a duration (e.g. 120, 2026-11-26T08:00, 2h)"
        ) from None
