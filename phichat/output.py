"""Writing to stdout: a reader that goes away ends phichat quietly, a failed write is one line.
And `print_warning`, the one way a warning line reaches stderr.

`phichat history | head -1` closes the pipe early: like other Unix tools phichat then stops
without a message, with exit code 141 (128 + SIGPIPE, what a shell reports for a tool that
SIGPIPE ended). A write that fails otherwise (a full disk, `> /dev/full`, a terminal gone) is
a one-line error with exit code 1. Either way stdout is pointed at /dev/null afterwards, so
Python's own flush at exit has nothing left to complain about.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TextIO

from phichat.errors import PhichatError

PIPE_CLOSED_EXIT = 141  # 128 + SIGPIPE


class OutputClosed(PhichatError):
    """Whoever read stdout has gone (a closed pipe): stop quietly."""

    def __init__(self) -> None:
        super().__init__("", exit_code=PIPE_CLOSED_EXIT)


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """Around writes to stdout: OSErrors from them become OutputClosed or a one-line error."""
    try:
        yield
    except BrokenPipeError:
        _discard_stdout()
        raise OutputClosed() from None
    except OSError as exc:
        _discard_stdout()
        raise PhichatError(f"cannot write to stdout: {exc.strerror or exc}") from None


def stdout() -> TextIO:
    """sys.stdout, or a one-line error where phichat was started without one (`>&-`)."""
    if sys.stdout is None:
        raise PhichatError("cannot write to stdout: it is closed")
    return sys.stdout


def emit(text: object = "") -> None:
    """print() to stdout, with write errors turned into OutputClosed or a one-line error."""
    out = stdout()
    with writing():
        print(text, file=out)


def print_warning(message: object) -> None:
    """One line on stderr: `phichat: warning: <message>`."""
    print(f"phichat: warning: {message}", file=sys.stderr)


def flush() -> None:
    """Flush stdout (where a block-buffered write to a file or pipe fails at the latest)."""
    if sys.stdout is None:  # nothing was written to it
        return
    with writing():
        sys.stdout.flush()


def _discard_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, dropping what is still buffered."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.stdout.flush()
