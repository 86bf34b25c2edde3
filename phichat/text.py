"""Stored text shown in a terminal: on one line (titles, search results), controls escaped."""

from __future__ import annotations

import textwrap

ELLIPSIS = "…"


def one_line(text: str, width: int) -> str:
    """`text` on one line (whitespace collapsed), cut at a word boundary to at most `width`
    characters ending in an ellipsis; mid-word where the first word alone is too long."""
    line = " ".join(text.split())
    if len(line) <= width:
        return line
    short = textwrap.shorten(line, width, placeholder=ELLIPSIS)
    return short if short != ELLIPSIS else line[: width - 1] + ELLIPSIS


# C0 controls but tab and newline, DEL, and C1 controls: ESC starts a terminal's escape sequences
# (colours, clearing the screen, OSC 52 clipboard writes), and U+009B (CSI) does on some.
_CONTROLS = {
    code: f"\\x{code:02x}"
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)]
    if chr(code) not in "\t\n"
}


def escaped(text: str) -> str:
    """`text` with every control character but tab and newline written as `\\xNN` (ESC as
    `\\x1b`), so stored text is shown in a terminal, never obeyed by it."""
    return text.translate(_CONTROLS)
