"""Text shown in one line: titles, search results."""

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
