"""Text shown in a terminal: checked for being blank, cut short, on one line (titles, search
results), controls escaped."""

from __future__ import annotations

import json
import re
import textwrap
import unicodedata
from typing import Any

ELLIPSIS = "…"


def is_blank(text: str) -> bool:
    """Whether `text` holds nothing to read: only whitespace, NULs or other control characters
    (the one test of an empty message, prompt, title or setting)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def clipped(text: str, width: int) -> str:
    """`text` where it fits in `width` characters, else its first `width - 1` and an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


def one_line(text: str, width: int) -> str:
    """`text` on one line (whitespace collapsed), cut at a word boundary to at most `width`
    characters ending in an ellipsis; mid-word where the first word alone is too long."""
    line = " ".join(text.split())
    if len(line) <= width:
        return line
    short = textwrap.shorten(line, width, placeholder=ELLIPSIS)
    return short if short != ELLIPSIS else clipped(line, width)


# C0 controls but tab and newline, DEL, and C1 controls: ESC starts a terminal's escape sequences
# (colours, clearing the screen, OSC 52 clipboard writes), and U+009B (CSI) does on some.
_CONTROLS = {
    code: f"\\x{code:02x}"
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)]
    if chr(code) not in "\t\n"
}
# The bidirectional embeddings, overrides and isolates: they reorder what follows them on the
# screen, so a line can show other than what it holds ("Trojan Source").
_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_SHOWN = _CONTROLS | {code: f"\\u{code:04x}" for code in _BIDI}
# What JSON leaves raw (with ensure_ascii=False) that a terminal would obey or reorder.
_JSON_RAW = re.compile("[\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escaped(text: str) -> str:
    """`text` with every control character but tab and newline written as `\\xNN` (ESC as
    `\\x1b`) and each bidirectional override as `\\uNNNN`, so stored text is shown in a
    terminal as it is, never obeyed by it."""
    return text.translate(_SHOWN)


def json_text(value: object, **dumps: Any) -> str:
    """json.dumps(value, ensure_ascii=False, **dumps) with DEL, the C1 controls and the bidi
    overrides written as `\\uNNNN` too (JSON escapes only the C0 controls): the same JSON,
    read back the same, that a terminal shows and never obeys."""
    text = json.dumps(value, ensure_ascii=False, **dumps)
    return _JSON_RAW.sub(lambda raw: f"\\u{ord(raw.group()):04x}", text)
