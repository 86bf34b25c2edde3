"""The phichat app: thin. It shows the ChatScreen (chat.py's widgets, the chat's bindings and
behaviour: chat_screen.py) as its first screen and keeps what is app-wide: the stylesheet, the
`[keys]` keymap, quitting (Ctrl+Q, and a stop signal or a lost terminal, with the exit code they
mean) and shutting the chat's engine thread and session down once the app has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from phichat.config import Settings
from phichat.signals import STOP_SIGNALS, Stopper, exit_code, first
from phichat.text import escaped
from phichat.tui.chat_screen import ChatScreen, SessionLoader
from phichat.tui.palette import keymap
from phichat.tui.terminal import (
    TerminalDriver,
    TerminalWatch,
    release_dead_terminal,
    require_terminal,
)

if TYPE_CHECKING:
    from textual.notifications import SeverityLevel


class PhichatApp(App[None]):
    """The chat app."""

    CSS_PATH = "phichat.tcss"
    TITLE = "phichat"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self, settings: Settings, loader: SessionLoader | None = None, signals: bool = False
    ) -> None:
        """`signals`: SIGINT, SIGTERM and SIGHUP quit the app as Ctrl+Q does (`run` sets it;
        tests driving the app leave their process's signals alone) and a terminal that goes
        without one (TerminalWatch, TerminalDriver) does the same."""
        super().__init__(driver_class=TerminalDriver if signals else None)
        self.settings = settings
        self.signals = signals
        self.signum: int | None = None  # the stop signal that ended the app, if one did
        self._signal_loop: asyncio.AbstractEventLoop | None = None  # where signals quit
        self.chat = ChatScreen(settings, loader)

    def get_default_screen(self) -> ChatScreen:
        return self.chat

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """Every notification (a widget's and a screen's come here too) as plain text with
        controls escaped, whatever `markup` says: they name paths, files, models and commands
        and quote what was typed, none of which is Textual markup."""
        message = escaped(message)
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def on_mount(self) -> None:
        self.set_keymap(keymap(self.settings.keys))
        if self.signals:
            loop = self._signal_loop = asyncio.get_running_loop()
            for signum in STOP_SIGNALS:
                signal.signal(signum, lambda signum, _frame: self._signalled(signum, loop))
            if self.signum is not None:  # came while the app was starting
                self._quit()

    def stop_by_signal(self, signum: int) -> None:
        """A stop signal outside the event loop (before it runs, or at shutdown): only flags."""
        self.signum = self.signum or first(signum)
        self.chat.stop_everything()

    def _signalled(self, signum: int, loop: asyncio.AbstractEventLoop) -> None:
        """SIGINT, SIGTERM or SIGHUP (a closed terminal): quit as Ctrl+Q does, in the loop; the
        answer being written is saved, marked stopped. A plain signal handler, not the loop's:
        it runs before Textual's SIGCONT handler, which a hangup sends next."""
        if signum == getattr(signal, "SIGHUP", None):
            release_dead_terminal()
        self.signum = self.signum or first(signum)
        with contextlib.suppress(RuntimeError):  # the loop has closed: run() shuts down
            loop.call_soon_threadsafe(self._quit)

    def terminal_lost(self) -> None:
        """The terminal has gone, or the process that started phichat, without a SIGHUP saying
        so (TerminalWatch, TerminalDriver; from any thread): quit as a hangup does."""
        self.stop_by_signal(signal.SIGHUP)
        loop = self._signal_loop
        if loop is not None:  # else on_mount quits, seeing the signal number
            with contextlib.suppress(RuntimeError):  # the loop has closed: run() shuts down
                loop.call_soon_threadsafe(self._quit)

    async def action_quit(self) -> None:
        """Quit at any moment: stop the answer (saved, marked stopped) or the download."""
        self._quit()

    def _quit(self) -> None:
        self.chat.stop_everything()
        self.exit()

    def shutdown(self) -> None:
        """Once the app has exited: let the chat's engine thread end (within a token of a
        cancel; a model load runs to its end), then close the session and its database."""
        self.chat.shutdown()


def run(settings: Settings) -> int:
    """Run the app until the user quits or a stop signal comes, then shut the engine and the
    session down: 0, or 128 + the signal's number (129 where the terminal went)."""
    require_terminal()
    app = PhichatApp(settings, signals=True)
    with (
        Stopper(app.stop_by_signal) as stopper,  # until the app's loop takes signals over
        TerminalWatch(app.terminal_lost) as watch,
    ):
        try:
            app.run()
        finally:
            stopper.install()  # asyncio resets the handlers as its loop closes
            if watch.check():
                release_dead_terminal()
            app.shutdown()
    signum = app.signum or stopper.signum
    return exit_code(signum) if signum is not None else 0
