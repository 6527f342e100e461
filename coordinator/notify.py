"""`covey notify`: one short line about new mail, for a live session's hooks, or nothing at all.

Pushing a message into a model's context while it works does not work (it is
ignored); telling it, at the bottom of its context, that mail is waiting, and
letting it pull the mail with its inbox tool, does. Claude Code runs a
`PostToolUse` or `UserPromptSubmit` hook after every tool call or prompt, and
adds what the hook prints to the context. So this prints nothing when nothing
is new (no context spent) and one line when something is:

    2 new messages, from human:ada and agent:scout — check your inbox

and each message is told once. It reads the participant's local mailbox, which
`covey mcp` keeps filed as mail arrives (and `covey inbox` or `wait` otherwise),
and remembers the last message it told of in a file beside the mailbox.

It runs after every tool call, so it must cost next to nothing: this module
imports only the standard library (no pydantic, no AMQP client), finds the
settings it needs (identity, state dir, broker URL) the way settings.py does —
`COVEY_*` variables first, then covey.toml, then the defaults — and opens the
mailbox read-only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

from coordinator.display import printable
from coordinator.errors import BadInput, ConfigError
from coordinator.home import find_home, mailbox_file, read_config, setting
from coordinator.names import Address

MAX_SENDERS = 3  # named in the line; more are counted
TOLD_SUFFIX = ".told"  # beside the mailbox: the last message seq already told of


def news(identity: str | None, form: str = "text", hook_input: str | None = None) -> str:
    """What to print: "" when nothing is new, else the line (in a hook's JSON for
    `form == "claude-hook"`). Marks what it tells of as told."""
    line = _new_mail_line(_mailbox(identity))
    if not line:
        return ""
    if form == "text":
        return line
    event = _hook_event(hook_input)
    return json.dumps({"hookSpecificOutput": {"hookEventName": event, "additionalContext": line}})


def _mailbox(identity: str | None) -> Path:
    config = read_config(find_home())
    who = identity or os.environ.get("COVEY_AGENT") or setting("identity", config)
    if not who:
        raise BadInput("whose mail? give NAME, --as, COVEY_AGENT, or identity in covey.toml")
    return mailbox_file(Address.participant(who), config)


def _new_mail_line(mailbox: Path) -> str:
    """The line for unread mail filed since the last one told of; "" for none."""
    if not mailbox.is_file():
        return ""  # no mail was ever filed here
    told_file = mailbox.with_name(mailbox.name + TOLD_SUFFIX)
    try:
        told = int(told_file.read_text() or 0)
    except FileNotFoundError:
        told = 0
    except (OSError, ValueError):
        told = 0  # unreadable: better to tell again than to stay silent for good
    try:
        with sqlite3.connect(f"file:{mailbox}?mode=ro", uri=True, timeout=1.0) as db:
            rows = db.execute(
                "SELECT seq, sender FROM messages WHERE status = 'unread' AND seq > ? ORDER BY seq",
                (told,),
            ).fetchall()
    except sqlite3.Error as err:
        raise ConfigError(f"cannot read the mailbox {mailbox} ({err})") from None
    if not rows:
        return ""
    try:
        told_file.write_text(str(rows[-1][0]))  # told once: silent until more comes
    except OSError as err:  # a full disk, say: the news is still told, and again next time
        print(f"covey notify: cannot note what it told ({err})", file=sys.stderr)
    senders = list(dict.fromkeys(printable(sender) for _, sender in rows))
    named = senders[:MAX_SENDERS]
    if len(senders) > MAX_SENDERS:
        named.append(f"{len(senders) - MAX_SENDERS} more")
    who = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    count = f"{len(rows)} new message{'s' if len(rows) != 1 else ''}"
    return f"{count}, from {who} — check your inbox"


def _hook_event(hook_input: str | None) -> str:
    """The hook event Claude Code said it runs us for (on stdin), else PostToolUse."""
    try:
        data = json.loads(hook_input) if hook_input else {}
    except json.JSONDecodeError:
        data = {}
    event = data.get("hook_event_name") if isinstance(data, dict) else None
    return event if event in ("PostToolUse", "UserPromptSubmit") else "PostToolUse"


def hook_input_from_stdin() -> str | None:
    """What Claude Code sends a hook on stdin; None from a terminal."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    try:
        return sys.stdin.read()
    except OSError:
        return None
