"""Tab completion of paths in the prompt box: the name after `/file ` (any of them, quoted when
it holds a space) or after `@`. The word is completed as far as every candidate agrees; a
folder gets a `/`, a file the end of its name (and a space after it); `~` is expanded to look
but left as typed. A pure function of the text before the cursor and the file system."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from phichat.tui.attach import FILE_COMMAND

AT_WORD = re.compile(r"(?<!\S)@(\S*)\Z")
FILE_ARGS = re.compile(rf"\s*{FILE_COMMAND}\s")
QUOTES = "'\""
NEEDS_QUOTES = re.compile(r"[\s'\"\\$`!*?\[\]{}()<>|&;#]")  # what shlex.split would not keep


@dataclass(frozen=True)
class Completion:
    """What Tab does: `text[start:]` of the text before the cursor becomes `word`; `choices`
    are the names that match (a folder's with its `/`), to list when there is nothing to add."""

    start: int
    word: str
    choices: list[str] = field(default_factory=list)


def complete_path(before: str) -> Completion | None:
    """The completion of the path being typed at the end of `before` (the text before the
    cursor), or None where no path is being typed (not after `/file ` or `@`, or a glob)."""
    at = AT_WORD.search(before)
    if at is not None:
        start, quote, typed = at.start(1), None, at.group(1)
    elif FILE_ARGS.match(before):
        start, quote = _last_word(before)
        typed = before[start:].replace("'", "").replace('"', "")
    else:
        return None
    if any(ch in typed for ch in "*?["):
        return None
    if typed == "~":
        return Completion(start, _requote(quote, "~/", False, at is None), ["~/"])
    folder, prefix = typed[: typed.rfind("/") + 1], typed[typed.rfind("/") + 1 :]
    choices = _matches(os.path.expanduser(folder) or ".", prefix)
    if at is not None:
        choices = [name for name in choices if not any(ch.isspace() for ch in name)]
    if not choices:
        return Completion(start, before[start:], [])
    common = os.path.commonprefix(choices)  # noqa: RUF071 - names, by character
    done = len(choices) == 1 and not common.endswith("/")
    word = _requote(quote, folder + common, done, at is None)
    return Completion(start, word + (" " if done else ""), choices)


def _last_word(before: str) -> tuple[int, str | None]:
    """Where the last word of `before` starts (at its opening quote, if any), and the quote
    still open at its end (None: none)."""
    start, quote = 0, None
    for i, ch in enumerate(before):
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in QUOTES:
            quote = ch
        elif ch.isspace():
            start = i + 1
    return start, quote


def _matches(folder: str, prefix: str) -> list[str]:
    """The names in `folder` that start with `prefix`, sorted, a folder's ending in `/`;
    hidden ones only when `prefix` starts with a dot; none in a folder that cannot be read."""
    try:
        with os.scandir(folder) as entries:
            found = []
            for entry in entries:
                if not entry.name.startswith(prefix):
                    continue
                if entry.name.startswith(".") and not prefix.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()  # follows a symlink
                except OSError:
                    is_dir = False
                found.append(entry.name + ("/" if is_dir else ""))
    except OSError:
        return []
    return sorted(found)


def _requote(quote: str | None, word: str, done: bool, shell: bool) -> str:
    """`word` as typed after `/file` (`shell`: quoted where it needs it, in the quote already
    open, closed when `done`) or after `@` (as it is)."""
    if not shell or (quote is None and not NEEDS_QUOTES.search(word)):
        return word
    quote = quote or ("'" if "'" not in word else '"')
    return quote + word + (quote if done else "")
