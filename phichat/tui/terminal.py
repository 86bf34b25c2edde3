"""The terminal the app runs in, and noticing that it has gone.

A terminal can go without a SIGHUP reaching phichat: its window closes while phichat runs in a
process group of its own (under `timeout`, as a job its shell does not tell), or the process
that started phichat dies and leaves it behind. Reading the terminal then gives EOF or EIO and
writing it EIO: Textual's input thread would spin on the reads, and its writer thread would die
on a write and leave the app hanging at exit. So, while the app runs:

- `TerminalWatch` polls the terminal for a hang-up (POLLHUP, which a poll reports without
  reading) a few times a second, and checks that phichat's parent is still the one that
  started it; either loss is reported once, as a hangup (the answer stops and is saved, marked
  stopped, and phichat exits with 129).
- `TerminalDriver` is Textual's own driver writing through a file that reports a failed write
  as the same loss and drops it, so nothing waits on a writer that died.
- `release_dead_terminal` points the dead terminal's file descriptors at /dev/null, so what
  Textual still writes as it shuts down goes nowhere instead of failing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from textual.drivers.linux_driver import LinuxDriver

from phichat.errors import UsageError

POLL_S = 0.25  # how often the watch looks: a lost terminal ends the app within a second
LOST = select.POLLHUP | select.POLLERR | select.POLLNVAL
WATCHED_FDS = (0, 2)  # Textual reads keys from stdin and draws on stderr
TERMINAL_FDS = (0, 1, 2)


def require_terminal() -> None:
    """Refuse to start the app without a terminal to read keys from (stdin at its end would
    have Textual read nothing forever, at full speed) or without stderr to draw on."""
    if not os.isatty(0):
        raise UsageError(
            "the chat app needs a terminal, and stdin is not one (--prompt answers without one)"
        )
    if sys.__stderr__ is None:
        raise UsageError("the chat app draws on stderr, and it is closed")


def _dead(fd: int) -> bool:
    """Whether `fd` is a terminal (or pipe) that has hung up, or is no longer open."""
    poller = select.poll()
    poller.register(fd, 0)  # no events asked for: a hang-up or an error is reported anyway
    return any(mask & LOST for _, mask in poller.poll(0))


class TerminalWatch:
    """Calls `on_lost()` once, from a thread of its own, when the terminal hangs up or the
    parent process that started phichat is gone; `lost` says whether it did."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.lost = False
        self._on_lost = on_lost
        self._parent = os.getppid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="phichat-terminal", daemon=True)

    def __enter__(self) -> TerminalWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> bool:
        """Look once: whether the terminal or the parent is gone (and `lost` from now on)."""
        gone = os.getppid() != self._parent or any(_dead(fd) for fd in WATCHED_FDS)
        self.lost = self.lost or gone
        return self.lost

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            if self.check():
                self._on_lost()
                return


class _SurvivingFile:
    """The file Textual draws on, where a failed write calls `on_error()` (once) and is
    dropped instead of ending Textual's writer thread."""

    def __init__(self, file: TextIO, on_error: Callable[[], None]) -> None:
        self._file = file
        self._on_error = on_error
        self._failed = False

    def _failing(self, call: Callable[[], object]) -> None:
        if self._failed:
            return
        try:
            call()
        except (OSError, ValueError):  # EIO from a terminal gone; a closed file
            self._failed = True
            self._on_error()

    def write(self, text: str) -> None:
        self._failing(lambda: self._file.write(text))

    def flush(self) -> None:
        self._failing(self._file.flush)

    def fileno(self) -> int:
        return self._file.fileno()

    def isatty(self) -> bool:
        return self._file.isatty()


class TerminalDriver(LinuxDriver):
    """Textual's Linux driver; a write that fails tells the app (`terminal_lost`) instead of
    killing the writer thread."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        drawn_on = self._file  # sys.__stderr__
        assert drawn_on is not None, "require_terminal() refuses a closed stderr"
        self._file = _SurvivingFile(drawn_on, app.terminal_lost)  # type: ignore[assignment]


def release_dead_terminal() -> None:
    """After a hangup (the terminal closed, `tmux kill-session`) every write to the terminal
    fails, and Textual, which writes from a thread through a bounded queue, would wait forever
    to shut down; it would also try to resume on the SIGCONT that follows a hangup. So point
    the dead descriptors at /dev/null and take SIGCONT back. A `kill -HUP` with the terminal
    still there changes nothing: the app quits normally and restores the terminal."""
    import termios

    gone = []
    for fd in TERMINAL_FDS:
        try:
            termios.tcgetattr(fd)
        except termios.error as exc:
            if exc.args[0] == errno.EIO:
                gone.append(fd)
                continue
        with contextlib.suppress(OSError):
            if _dead(fd):
                gone.append(fd)
    if not gone:
        return
    signal.signal(signal.SIGCONT, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in gone:
        os.dup2(devnull, fd)
    os.close(devnull)
