"""Reading the message while it is typed: after a pause in typing (READ_AHEAD_PAUSE_S) and at
once on a paste, the engine reads the settled part of the next prompt (ChatSession.read_ahead)
on the engine thread, so Enter leaves only the message's last words to read. Part of
PhichatApp (a mixin: its handlers go by name).

A read-ahead never runs while an answer is written, a model loads or the settings are open;
Enter, Escape, a switch of conversation or model, opening the settings and quitting stop it at
once (`_stop_reading`). The answer never depends on it: the engine reads whatever its cache
does not share with the prompt sent.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from textual.message import Message
from textual.timer import Timer

from phichat.session import settled_text
from phichat.tui.prompt import PromptInput

if TYPE_CHECKING:
    from phichat.session import ChatSession
    from phichat.tui.app import PhichatApp

READ_AHEAD_PAUSE_S = 0.3  # typing starts a read-ahead this long after it changed the draft
READ_AHEAD_STEP = 64  # tokens per job on the engine thread: other jobs wait one step at most
READING = "reading ahead…"


class ReadAheadState(Message):
    """The read-ahead stopped by `cancel` started (`running`) or ended (engine thread)."""

    def __init__(self, cancel: threading.Event, running: bool) -> None:
        super().__init__()
        self.cancel, self.running = cancel, running


class ReadingAhead:
    """Starts and stops read-aheads of the draft in the prompt box."""

    _reading: threading.Event  # set: the read-ahead under way is to stop
    _read_timer: Timer | None = None  # starts the next read-ahead
    _read_text: str | None = None  # the draft the read-ahead under way reads
    _read_again = False  # the draft grew meanwhile: read on once it ends

    def _read_ahead_soon(self: PhichatApp, at_once: bool = False) -> None:
        """The draft changed: read it ahead READ_AHEAD_PAUSE_S later (`at_once`: now, as on a
        paste). Typing on at the end lets the read-ahead under way go on (it reads on when it
        ends); an edit before what it reads stops it."""
        running = self._read_text
        if running is not None and not self._reading.is_set():
            draft = self.query_one(PromptInput).text
            if settled_text(draft).startswith(settled_text(running)):
                self._read_again = True
                return
            self._reading.set()
        if at_once:
            self._stop_reading()
            self._read_draft()
        elif self._read_timer is None:
            self._read_timer = self.set_timer(READ_AHEAD_PAUSE_S, self._read_draft)

    def _stop_reading(self: PhichatApp) -> None:
        """Stop the read-ahead under way, or about to start, at once."""
        if self._read_timer is not None:
            self._read_timer.stop()
            self._read_timer = None
        self._read_again = False
        self._reading.set()

    def _read_draft(self: PhichatApp) -> None:
        self._read_timer = None
        session = self.session
        if session is None or self.busy or self._switching or self._quitting.is_set():
            return
        if len(self.screen_stack) != 1:  # the settings or another screen is open, or none left
            return
        prompt = self.query_one(PromptInput)
        self._reading.set()
        self._reading, self._read_text = threading.Event(), prompt.text
        self._engine_thread.submit(self._read, session, prompt.text, prompt.editing, self._reading)

    def _read(
        self: PhichatApp,
        session: ChatSession,
        draft: str,
        editing: bool,
        cancel: threading.Event,
    ) -> None:
        """Read a step of `draft` ahead (engine thread), then queue the next step behind what
        else waits for the engine (a switch, a count). A failure is not the user's concern
        now: the same prompt, sent, reports it."""
        going_on = False
        try:
            if not cancel.is_set():
                self.post_message(ReadAheadState(cancel, True))
                going_on = session.read_ahead(draft, cancel, editing, READ_AHEAD_STEP) > 0
        except Exception:  # noqa: BLE001 - said when the message is sent, if it still is
            pass
        finally:
            if going_on and not cancel.is_set():
                self._engine_thread.submit(self._read, session, draft, editing, cancel)
            else:
                self.post_message(ReadAheadState(cancel, False))

    def on_read_ahead_state(self: PhichatApp, event: ReadAheadState) -> None:
        if event.cancel is not self._reading:
            return  # one stopped since: what is under way now is shown
        if not event.running:
            self._read_text = None
            if self._read_again:
                self._read_again = False
                self._read_ahead_soon(at_once=True)
        if self.session is not None and not self.busy and not self._switching:
            self._status(READING if self._read_text is not None else "ready")
