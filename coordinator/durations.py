"""Durations as people write them in config files and flags: `90`, `90s`, `5m`, `1h30m`, `2d`."""

from __future__ import annotations

import math
import re
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
