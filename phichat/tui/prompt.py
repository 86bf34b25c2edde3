"""The message box: Enter sends, shift+enter / ctrl+j / alt+enter add a newline (the `send` and
`newline` keys: `[keys]` remaps them, and the placeholder says the keys in use),
up/down walk the prompts sent before, page up/down scroll the conversation, Tab completes a path
after `/file ` or `@` (completion.py), and a paste is accepted up to `MAX_CHARS` (refused, with a
note, beyond); a paste of more than a screenful is attached instead (`LongPaste`).

Up in an empty box first offers the conversation's last message for editing (`editable`, kept
up to date by the app): sent while editing, it replaces that message and its answer. Up again
walks on through the prompts sent before, as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import events
from textual.actions import SkipAction
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import TextArea

from phichat.config import KeySettings, key_list
from phichat.text import is_blank
from phichat.tui.attach import screenful
from phichat.tui.completion import complete_path
from phichat.tui.palette import key_hint

MAX_CHARS = 512_000
MAX_CHOICES = 40  # names a Tab lists
PLACEHOLDER = "Message phichat ({send} sends, {newline}: new line)"
EDITING = "editing your last message: {send} replaces it and its answer, {stop} cancels"


class PromptInput(TextArea):
    """A TextArea that sends on Enter (its `send` key) and remembers what was sent."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("tab", "complete_path", show=False)]

    @dataclass
    class Submitted(Message):
        """The user sent a non-empty message (`editing`: one replacing the last)."""

        text: str
        editing: bool = False

    @dataclass
    class PageScroll(Message):
        """Page up (-1) or down (+1) in the conversation."""

        direction: int

    @dataclass
    class LongPaste(Message):
        """A paste of more than a screenful: attached, not put in the box."""

        text: str

    def __init__(self, keys: KeySettings, *, id: str | None = None) -> None:
        """`keys`: the configured keys, for the hints (stop also leaves editing)."""
        hints = {
            "send": key_hint(keys, "send"),
            "newline": key_hint(keys, "newline", most=2),
            "stop": key_hint(keys, "stop"),
        }
        super().__init__(
            soft_wrap=True,
            tab_behavior="focus",
            show_line_numbers=False,
            highlight_cursor_line=False,
            compact=True,
            placeholder=PLACEHOLDER.format(**hints),
            id=id,
        )
        self.editing_hint = EDITING.format(**hints)
        self.send_keys = frozenset(key_list(keys.send))
        self.newline_keys = frozenset(key_list(keys.newline))
        self.sent: list[str] = []
        self.editable: str | None = None  # the conversation's last message, offered by Up
        self.editing = False
        self._recalled: int | None = None  # index into history while walking it
        self._draft = ""
        self.pasted = False  # the last change was a paste (the app reads it ahead at once)

    async def _on_key(self, event: events.Key) -> None:
        """Send and newline are handled here, in the box's own queue, so that they come in
        order with the keys typed before them (an app-level binding could run ahead of them)."""
        if event.key in self.send_keys:
            event.stop()
            event.prevent_default()
            self.action_send()
        elif event.key in self.newline_keys:
            event.stop()
            event.prevent_default()
            self.action_newline()

    def action_send(self) -> None:
        """Send the message (a blank one is not sent)."""
        if not is_blank(self.text):
            self.post_message(self.Submitted(self.text, self.editing))

    def action_newline(self) -> None:
        """A new line at the cursor (in place of the selection)."""
        result = self.replace("\n", *self.selection, maintain_selection_offset=False)
        self.move_cursor(result.end_location)

    def action_complete_path(self) -> None:
        """Tab after `/file ` or `@`: complete the path being typed as far as the names that
        match agree; with nothing to add, list them. Anywhere else Tab moves on, as ever."""
        cursor = self.cursor_location
        before = self.document.get_text_range((0, 0), cursor)
        found = complete_path(before) if self.selection.is_empty else None
        typed = before[found.start :] if found else "\n"
        if found is None or "\n" in typed:
            raise SkipAction
        start = (cursor[0], cursor[1] - len(typed))
        if typed != found.word:
            self.move_cursor(self.replace(found.word, start, cursor).end_location)
        elif found.choices:
            more = len(found.choices) - MAX_CHOICES
            shown = found.choices[:MAX_CHOICES] + ([f"… and {more:,} more"] if more > 0 else [])
            self.notify("  ".join(shown))
        else:
            self.notify("no file or folder starts with that", severity="warning")

    async def _on_paste(self, event: events.Paste) -> None:
        if screenful(event.text, self.app.size.width, self.app.size.height):
            event.stop()
            event.prevent_default()
            self.post_message(self.LongPaste(event.text))
            return
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
        self.border_title = self.editing_hint
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
