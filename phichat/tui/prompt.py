"""The message box: Enter sends, shift+enter / ctrl+j / alt+enter add a newline, up/down walk
the prompts sent before, page up/down scroll the conversation, and a paste is accepted up to
`MAX_CHARS` (refused, with a note, beyond).

Up in an empty box first offers the conversation's last message for editing (`editable`, kept
up to date by the app): sent while editing, it replaces that message and its answer. Up again
walks on through the prompts sent before, as usual.
"""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

from phichat.text import is_blank

MAX_CHARS = 512_000
NEWLINE_KEYS = frozenset({"shift+enter", "ctrl+j", "alt+enter"})
PLACEHOLDER = "Message phichat (Enter sends, shift+enter or ctrl+j: new line)"
EDITING = "editing your last message: Enter replaces it and its answer, {stop} cancels"


class PromptInput(TextArea):
    """A TextArea that sends on Enter and remembers what was sent."""

    class Submitted(Message):
        """The user pressed Enter on a non-empty message (`editing`: one replacing the last)."""

        def __init__(self, text: str, editing: bool = False) -> None:
            super().__init__()
            self.text = text
            self.editing = editing

    class PageScroll(Message):
        """Page up (-1) or down (+1) in the conversation."""

        def __init__(self, direction: int) -> None:
            super().__init__()
            self.direction = direction

    def __init__(self, *, stop_key: str = "Esc", id: str | None = None) -> None:
        """`stop_key`: the key of the stop action, which also leaves editing (for its hint)."""
        super().__init__(
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            highlight_cursor_line=False,
            compact=True,
            placeholder=PLACEHOLDER,
            id=id,
        )
        self.stop_key = stop_key
        self.sent: list[str] = []
        self.editable: str | None = None  # the conversation's last message, offered by Up
        self.editing = False
        self._recalled: int | None = None  # index into history while walking it
        self._draft = ""
        self.pasted = False  # the last change was a paste (the app reads it ahead at once)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if not is_blank(self.text):
                self.post_message(self.Submitted(self.text, self.editing))
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            result = self.replace("\n", *self.selection, maintain_selection_offset=False)
            self.move_cursor(result.end_location)

    async def _on_paste(self, event: events.Paste) -> None:
        size = len(self.text) + len(event.text)
        if size > MAX_CHARS:
            event.stop()
            event.prevent_default()
            self.notify(
                f"paste refused: the message would be {size // 1000} KB; "
                f"the message box takes up to {MAX_CHARS // 1000} KB",
                severity="warning",
            )
        else:
            self.pasted = True

    def accept(self) -> None:
        """Clear the box after a send, remembering the text for up/down."""
        text = self.text
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
        self._recalled = None
        self._draft = ""
        self.stop_editing()
        self.clear()

    def offer_edit(self, text: str) -> None:
        """Offer `text` (the conversation's last message) for editing and sending again."""
        self._recalled = None
        self._draft = ""
        self.editing = True
        self.border_title = EDITING.format(stop=self.stop_key)
        self._show(text)

    def stop_editing(self) -> None:
        """Back to writing a new message (the text stays)."""
        self.editing = False
        self.border_title = None

    def action_cursor_up(self, select: bool = False) -> None:
        """Up in an empty box offers the last message for editing; Up on the first line
        recalls the previous sent prompt."""
        if not select and not self.text and self._recalled is None and self.editable:
            self.offer_edit(self.editable)
            return
        if select or not self.sent or not self.cursor_at_first_line:
            super().action_cursor_up(select)
            return
        if self._recalled is None:
            if self.editing:  # walking on from the message offered for editing
                self.stop_editing()
                skip = self.sent[-1] == self.text
                draft = "" if self.text == self.editable else self.text  # keep any edits
                self._draft, self._recalled = draft, len(self.sent) - skip
            else:
                self._draft, self._recalled = self.text, len(self.sent)
        if self._recalled > 0:
            self._recalled -= 1
            self._show(self.sent[self._recalled])

    def action_cursor_down(self, select: bool = False) -> None:
        """Down on the last line walks forward, back to the unsent draft."""
        if select or self._recalled is None or not self.cursor_at_last_line:
            super().action_cursor_down(select)
            return
        self._recalled += 1
        if self._recalled < len(self.sent):
            self._show(self.sent[self._recalled])
        else:
            self._recalled = None
            self._show(self._draft)

    def action_cursor_page_up(self) -> None:
        """Page up scrolls the conversation (the box is a few lines at most)."""
        self.post_message(self.PageScroll(-1))

    def action_cursor_page_down(self) -> None:
        """Page down scrolls the conversation."""
        self.post_message(self.PageScroll(1))

    def _show(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)
