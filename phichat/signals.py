"""SIGINT, SIGTERM and SIGHUP stop phichat the way Ctrl+C does, whenever they come.

Until an answer starts there is nothing to save, so the first line of the `phichat` command
(`exit_at_once`) makes them end the process at once, quietly, also in the middle of imports or
of llama.cpp loading a model (a KeyboardInterrupt would be swallowed there, inside llama.cpp's
log callback). While an answer streams (`Stopper`), they set its cancel flag instead: what was
streamed is saved, marked stopped. Either way the exit code is 128 + the number of the first
signal that came (`first`): 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP), also when a second one
ends the process while it saves.
"""

from __future__ import annotations  # no `typing` import: this runs before anything else

import os
import signal
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)

Handler = Callable[[int, FrameType | None], object] | int | None  # what signal.getsignal gives


_first: list[int] = []  # the first stop signal this process got: it decides the exit code


def exit_code(signum: int) -> int:
    """The shell's exit code for a process ended by signal `signum`."""
    return 128 + signum


def first(signum: int) -> int:
    """Note that stop signal `signum` came; return the first one that did."""
    if not _first:
        _first.append(signum)
    return _first[0]


def _exit_now(signum: int, _frame: FrameType | None) -> None:
    os._exit(exit_code(first(signum)))


def exit_at_once() -> None:
    """Make each stop signal end the process at once with its exit code (nothing to save yet)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _exit_now)


def ignore_from_now() -> None:
    """Ignore stop signals from now on: for when phichat's work is done and its exit code
    decided. Python's teardown puts the default handlers back, so a signal then (a second one,
    after Ctrl+C) would end the process as killed by it: 143 instead of 130."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class Stopper:
    """While entered, a stop signal calls `on_signal(signum)` (which must only set flags: it
    runs between two Python instructions of the main thread) and is remembered in `signum`.
    The handlers there before are put back on exit."""

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self.on_signal = on_signal
        self.signum: int | None = None
        self._previous: dict[int, Handler] = {}

    def __enter__(self) -> Stopper:
        self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: asyncio, for one, resets them when its loop closes."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = self.signum or first(signum)
        self.on_signal(signum)

    @property
    def exit_code(self) -> int | None:
        """128 + the first signal's number, or None when none came."""
        return exit_code(self.signum) if self.signum is not None else None
