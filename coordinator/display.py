"""Showing a participant's text: control characters neutralised, wherever it is printed.

Subjects, bodies, ids, addresses, changelog entries, dead letters and run
reasons are someone else's words. Printed raw, an escape sequence restyles or
retitles a terminal, a carriage return overwrites what covey printed, and a
newline in a one-line field starts a line that looks like covey's own (a fake
`From:` header above the real ones). `printable` is the one place that turns
them into visible escapes; the CLI, logs, and any later face (web, MCP) use it.
"""

from __future__ import annotations

import unicodedata

# Unicode categories shown as escapes: controls (C0, DEL, C1 — ESC and CSI among them),
# format characters (bidi overrides, zero-width joiners), surrogates, private use and
# unassigned code points; and the line and paragraph separators, which some viewers
# break lines on.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(text: str, multiline: bool = False) -> str:
    """`text` with every control character as a visible escape (`\\x1b`, `\\u202e`).

    One-line fields (the default) keep nothing: a newline or a tab is shown as
    `\\x0a` / `\\x09`. `multiline` text (a body) keeps its newlines and tabs.
    """
    keep = "\n\t" if multiline else ""
    return "".join(
        ch if ch in keep or unicodedata.category(ch) not in _HIDDEN else _escape(ord(ch))
        for ch in text
    )


def _escape(code: int) -> str:
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
