"""Showing a session in a terminal, as `covey attach` prints it.

Everything in an event but its kind is the agent's own text, so all of it goes
through `display.printable`: a line the agent printed with an escape sequence
in it shows the escape, it does not restyle the reader's terminal. Tokens (a
model's output as it streams) are printed inline, without newlines of covey's,
until an event of another kind comes; every other kind is a line of its own.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from coordinator.display import printable
from coordinator.session import SessionEvent


def outcome_line(event: SessionEvent) -> str:
    """The last line of an attach: how the run ended."""
    data = event.data or {}
    code = data.get("exit_code")
    reason = data.get("reason")
    return (
        f"[closed] run {printable(event.run_id)} of {printable(event.agent)}: "
        f"{printable(str(data.get('outcome', 'unknown')))}"
        + (f" (exit code {printable(str(code))})" if code is not None else "")
        + (f": {printable(str(reason))}" if reason else "")
    )


def event_line(event_id: int, event: SessionEvent) -> str:
    """One event (not a token) as one line."""
    text, data = printable(event.text), event.data or {}
    if event.kind == "line":
        return text
    if event.kind == "progress":
        fraction = data.get("fraction")
        done = f"{float(fraction) * 100:3.0f}%" if isinstance(fraction, int | float) else "  ?%"
        return f"[progress {done}] {text}".rstrip()
    if event.kind == "missing":
        seqs = ", ".join(f"{a}-{b}" for a, b in _ranges(data.get("seqs")))
        log = printable(str(data.get("log", "the run log")))
        return f"[missing] events (seq {seqs or '?'}) could not be published; {log} has every line"
    if event.kind == "expired":
        return f"[expired] {text}; the run log on its host has every line"
    if event.kind == "opened":
        command = data.get("command")
        shown = " ".join(map(str, command)) if isinstance(command, list) else str(command or "")
        return (
            f"[opened] run {printable(event.run_id)} of {printable(event.agent)} "
            f"(id {event_id}): {printable(shown)}".rstrip(": ")
        )
    if event.kind == "closed":
        return outcome_line(event)
    return f"[{event.kind}] {text}"  # tool, status, result


def _ranges(seqs: Any) -> list[tuple[int, int]]:
    if not isinstance(seqs, list):
        return []
    return [
        (int(pair[0]), int(pair[1]))
        for pair in seqs
        if isinstance(pair, list | tuple) and len(pair) == 2
    ]


def event_json(event_id: int, event: SessionEvent) -> str:
    """One event as one line of JSON, with its id (for `--from`)."""
    return json.dumps({"id": event_id, **event.model_dump(mode="json")})


class SessionPrinter:
    """Prints a session's events to `out` as they come, tokens inline."""

    def __init__(self, out: TextIO, as_json: bool = False) -> None:
        self.out = out
        self.as_json = as_json
        self.in_tokens = False  # a line of tokens is open, not yet ended
        self.last_id: int | None = None

    def show(self, event_id: int, event: SessionEvent) -> None:
        self.last_id = event_id if event.kind != "expired" else self.last_id
        if self.as_json:
            self.out.write(event_json(event_id, event) + "\n")
        elif event.kind == "token":
            self.out.write(printable(event.text, multiline=True))
            self.in_tokens = True
        else:
            self.end_tokens()
            self.out.write(event_line(event_id, event) + "\n")
        self.out.flush()

    def end_tokens(self) -> None:
        if self.in_tokens:
            self.out.write("\n")
            self.in_tokens = False
