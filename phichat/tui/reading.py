"""Reading the message while it is typed: after a pause in typing (READ_AHEAD_PAUSE_S) and at
once on a paste, the engine reads the settled part of the next prompt (ChatSession.read_ahead)
on the engine thread, so Enter leaves only the message's last words to read. What is attached
(a long paste, a file) is read with it where it goes whole (`draft_to_read`), and so are the
`/use` folder's chunks for the words typed so far (the session chooses them). It also starts as
an answer ends, on the draft as it is (empty: the next turn's history, which is read again in
full where the next turn moves the cut into old history). Part of the ChatScreen (a mixin: its
handlers go by name).

`[chat] read_ahead = false` turns it off. A read-ahead never runs while an answer is written, a
model loads or the settings are open; Enter, Escape, a switch of conversation or model, opening
the settings and quitting stop it at once (`_stop_reading`). The answer never depends on it:
the engine reads whatever its cache does not share with the prompt sent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from textual.message import Message
from textual.timer import Timer

from phichat.files import Part, with_attachments
from phichat.session import settled_text
from phichat.tui.attach import AttachmentBar
from phichat.tui.prompt import PromptInput

if TYPE_CHECKING:
    from phichat.session import ChatSession
    from phichat.tui.host import ChatHost

READ_AHEAD_PAUSE_S = 0.3  # typing starts a read-ahead this long after it changed the draft
# Tokens per job on the engine thread: other jobs (a file's token count) wait one job at most.
# llama.cpp's default batch: a paste is read in steps as large as a prompt's, as fast.
READ_AHEAD_STEP = 512
READING = "reading ahead…"


@dataclass
class ReadAheadState(Message):
    """The read-ahead stopped by `cancel` started (`running`) or ended (engine thread)."""

    cancel: threading.Event
    running: bool


def draft_to_read(host: ChatHost, session: ChatSession) -> tuple[str, list[Part]]:
    """The message being typed, and what is attached before it (a long paste, a file) where
    that goes whole."""
    prompt = host.query_one(PromptInput)
    bar = host.query_one(AttachmentBar)
    return prompt.text, bar.read_ahead_parts(prompt.editing, session)


class ReadingAhead:
    """Starts and stops read-aheads of the draft in the prompt box."""

    _reading: threading.Event  # set: the read-ahead under way is to stop
    _read_timer: Timer | None = None  # starts the next read-ahead
    _read_text: str | None = None  # the draft the read-ahead under way reads
    _read_again = False  # the draft grew meanwhile: read on once it ends

    def _read_ahead_soon(self: ChatHost, at_once: bool = False) -> None:
        """The draft changed: read it ahead READ_AHEAD_PAUSE_S later (`at_once`: now, as on a
        paste). Typing on at the end lets the read-ahead under way go on (it reads on when it
        ends); an edit before what it reads stops it."""
        running = self._read_text
        if running is not None and not self._reading.is_set():
            draft = with_attachments(*draft_to_read(self, self.session)) if self.session else ""
            if settled_text(draft).startswith(settled_text(running)):
                self._read_again = True
                return
            self._reading.set()
        if at_once:
            self._stop_reading()
            self._read_draft()
        elif self._read_timer is None:
            self._read_timer = self.set_timer(READ_AHEAD_PAUSE_S, self._read_draft)

    def _stop_reading(self: ChatHost) -> None:
        """Stop the read-ahead under way, or about to start, at once."""
        if self._read_timer is not None:
            self._read_timer.stop()
            self._read_timer = None
        self._read_again = False
        self._reading.set()

    def _read_draft(self: ChatHost) -> None:
        self._read_timer = None
        session = self.session
        if session is None or self.busy or self._switching or self._quitting.is_set():
            return
        if not session.settings.chat.read_ahead:
            return
        if self.app.screen is not self:  # the settings or another screen is open, or none left
            return
        prompt = self.query_one(PromptInput)
        self._reading.set()
        draft, parts = draft_to_read(self, session)
        self._reading, self._read_text = threading.Event(), with_attachments(draft, parts)
        editing = prompt.editing
        self._engine_thread.submit(self._read, session, draft, parts, editing, self._reading)

    def _read(
        self: ChatHost,
        session: ChatSession,
        draft: str,
        parts: list[Part],
        editing: bool,
        cancel: threading.Event,
    ) -> None:
        """Read a step of `draft` (with `parts` before it) ahead (engine thread), then queue
        the next step behind what else waits for the engine (a switch, a count). A failure is
        not the user's concern now: the same prompt, sent, reports it."""
        going_on = False
        try:
            if not cancel.is_set():
                self.post_message(ReadAheadState(cancel, True))
                read = session.read_ahead(draft, cancel, editing, READ_AHEAD_STEP, parts)
                going_on = read > 0
        except Exception:  # noqa: BLE001 - said when the message is sent, if it still is
            pass
        finally:
            if going_on and not cancel.is_set():
                self._engine_thread.submit(self._read, session, draft, parts, editing, cancel)
            else:
                self.post_message(ReadAheadState(cancel, False))

    def on_read_ahead_state(self: ChatHost, event: ReadAheadState) -> None:
        if event.cancel is not self._reading:
            return  # one stopped since: what is under way now is shown
        if not event.running:
            self._read_text = None
            if self._read_again:
                self._read_again = False
                self._read_ahead_soon(at_once=True)
        if self.session is not None and not self.busy and not self._switching:
            self._status(READING if self._read_text is not None else "ready")
