"""The chat column: user and assistant messages; an answer streams in as Markdown.

The decode thread never waits on the screen: it appends text to a `TokenPipe` and wakes the event
loop once per batch. The loop takes whatever has arrived and writes it to a `MarkdownStream`
(which batches further while a render is in progress), then renders the whole answer once at the
end so code fences come out right.

Frames are paced by what they cost. On the CPU, llama.cpp keeps every core busy, and a thread
that takes a core from it stalls its other threads at the next barrier too; a frame also costs
the terminal (and Textual's writer thread) about as much again as this thread. So while an answer
streams on the CPU, this thread's share of one core is held to `CPU_UI_SHARE` (a ~6 ms frame
every ~0.75 s); with the model on a GPU or a server the cores are free and the share is
`GPU_UI_SHARE`.
Frames come at least `MIN_FPS` and at most `MAX_FPS` times a second.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from textual import events
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Markdown, Static

from phichat.config import KeySettings
from phichat.store import Role, Status
from phichat.tui.palette import key_hint

MAX_FPS = 20
MIN_FPS = 1
CPU_UI_SHARE = 0.008
GPU_UI_SHARE = 0.2
WELCOME = (
    "Type a message and press {send} ({newline}: new line, up/down: sent prompts).\n"
    "{stop} stops an answer · {toggle_side} conversations and search · {new_conversation} new "
    "chat · {settings} settings · ctrl+q quits."
)  # the actions' keys filled in from the keymap
STATUS_NOTES = {Status.STOPPED: "stopped"}
REPLACED_NOTE = "replaced"


def code_blocks(text: str) -> list[tuple[str, str]]:
    """The code blocks of a Markdown text, in order, as (language or '', code): fenced ones
    (an answer cut off inside a fence included) and indented ones."""
    from markdown_it import MarkdownIt

    return [
        (token.info.strip().split(" ")[0] if token.type == "fence" else "", token.content)
        for token in MarkdownIt("commonmark").parse(text)
        if token.type in ("fence", "code_block")
    ]


class TokenPipe:
    """Answer text from the decode thread to the event loop, batched.

    `put` and `close` run on the decode thread and cost a lock and an append; the loop is woken
    (call_soon_threadsafe) only when the pipe goes from empty to non-empty.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._woken = False
        self._closed = False
        self.error: str | None = None

    def put(self, text: str) -> None:
        """Queue a chunk (decode thread)."""
        with self._lock:
            self._parts.append(text)
            wake, self._woken = not self._woken, True
        if wake:
            self._wake()

    def close(self, error: str | None = None) -> None:
        """No more text; `error` says why the answer failed, if it did (decode thread)."""
        with self._lock:
            self._closed, self.error = True, error
        self._wake()

    def _wake(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> tuple[str, bool]:
        """Everything queued since the last call, and whether the pipe is closed (event loop)."""
        await self._ready.wait()
        with self._lock:
            self._ready.clear()
            text = "".join(self._parts)
            self._parts.clear()
            self._woken = False
            return text, self._closed


class UserMessage(Static):
    """What the user sent, shown as typed (never parsed as markup)."""

    def __init__(self, text: str, message_id: int | None = None) -> None:
        super().__init__(text, markup=False, classes="message")
        self.text = text
        self.message_id = message_id


class AnswerMessage(Vertical):
    """One assistant answer: Markdown, and a note when it was stopped or failed."""

    def __init__(self, text: str = "", note: str = "", message_id: int | None = None) -> None:
        super().__init__(classes="message")
        self.text = text
        self.message_id = message_id
        self._note = note

    def compose(self) -> Iterable[Widget]:
        yield Markdown(self.text)
        note = Static(self._note, markup=False, classes="note")
        note.display = bool(self._note)
        yield note

    def set_note(self, note: str) -> None:
        """Mark the answer (stopped, max tokens, error); empty hides the note."""
        label = self.query_one(".note", Static)
        label.update(note)
        label.display = bool(note)

    async def stream_from(self, pipe: TokenPipe, share: float) -> None:
        """Show text from `pipe` as it arrives, the screen taking at most `share` of a core,
        then render the full answer once."""
        markdown = self.query_one(Markdown)
        stream = Markdown.get_stream(markdown)
        cpu = time.thread_time()
        try:
            while True:
                text, closed = await pipe.get()
                self.text += text
                await stream.write(text)
                if closed:
                    break
                now = time.thread_time()  # this thread's CPU since the last frame: its cost
                await asyncio.sleep(min(1 / MIN_FPS, max(1 / MAX_FPS, (now - cpu) / share)))
                cpu = now
        finally:
            await stream.stop()
        await markdown.update(self.text)


class ChatView(VerticalScroll):
    """The conversation, oldest first; follows the bottom only while the user is at it.

    Focused (Tab or a click), one message is selected: up and down move the selection, Enter
    asks for that message's actions and c copies it (`Picked` tells the app).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "select(-1)", "Previous message", show=False),
        Binding("down", "select(1)", "Next message", show=False),
        Binding("enter", "pick('actions')", "Actions"),
        Binding("c", "pick('copy')", "Copy"),
    ]

    @dataclass
    class Picked(Message):
        """The user asked for something (`action`: actions | copy) on a message widget."""

        widget: UserMessage | AnswerMessage
        action: str

    def __init__(self, keys: KeySettings, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.selected: UserMessage | AnswerMessage | None = None
        actions = ("send", "stop", "toggle_side", "new_conversation", "settings")
        hints = {action: key_hint(keys, action) for action in actions}
        self.welcome = WELCOME.format(newline=key_hint(keys, "newline", most=2), **hints)

    def on_mount(self) -> None:
        self.anchor()
        self.mount(Static(self.welcome, markup=False, id="welcome"))

    def messages(self) -> list[UserMessage | AnswerMessage]:
        """The message widgets shown, oldest first (replaced ones only when shown)."""
        return list(self.query(".message"))  # type: ignore[arg-type]

    def last_exchange(self) -> list[UserMessage | AnswerMessage]:
        """The last user message shown and the answers after it (not replaced ones)."""
        current = [w for w in self.messages() if not w.has_class("-replaced")]
        starts = [i for i, w in enumerate(current) if isinstance(w, UserMessage)]
        return current[starts[-1] :] if starts else current

    def last_answer(self) -> AnswerMessage | None:
        """The newest answer that is not replaced, if any."""
        answers = [w for w in self.last_exchange() if isinstance(w, AnswerMessage)]
        return answers[-1] if answers else None

    async def show(self, messages: Iterable[Any], show_replaced: bool = False) -> None:
        """Replace the view with stored messages (objects with .id .role .content .status and
        .replaced); replaced ones are left out unless `show_replaced`."""
        await self.remove_children()
        self.selected = None
        widgets: list[Widget] = []
        for message in messages:
            replaced = getattr(message, "replaced", False)
            if replaced and not show_replaced:
                continue
            widget: UserMessage | AnswerMessage
            if message.role == Role.USER:
                widget = UserMessage(message.content, message.id)
            elif message.role == Role.ASSISTANT:
                note = REPLACED_NOTE if replaced else STATUS_NOTES.get(message.status, "")
                widget = AnswerMessage(message.content, note, message.id)
            else:
                continue
            widgets.append(widget.set_class(replaced, "-replaced"))
        await self.mount_all(widgets or [Static(self.welcome, markup=False, id="welcome")])
        self.anchor()

    async def add_user(self, text: str) -> UserMessage:
        """Append what the user just sent and follow the bottom again."""
        await self.query("#welcome").remove()
        widget = UserMessage(text)
        await self.mount(widget)
        self.anchor()
        return widget

    async def take_back_last(self) -> None:
        """Remove the last message (a queued prompt the user took back)."""
        messages = self.query(".message")
        if messages:
            await messages.last().remove()

    async def retire(self, widgets: Sequence[UserMessage | AnswerMessage], shown: bool) -> None:
        """Messages replaced by a regenerate or an edit: marked replaced when replaced ones
        are `shown`, else removed from the view."""
        for widget in widgets:
            if shown:
                widget.add_class("-replaced")
                if isinstance(widget, AnswerMessage):
                    widget.set_note(REPLACED_NOTE)
            else:
                if widget is self.selected:
                    self.selected = None
                await widget.remove()

    async def add_answer(self) -> AnswerMessage:
        """Append an empty answer to stream into."""
        widget = AnswerMessage()
        await self.mount(widget)
        return widget

    def reveal(self, message_id: int) -> bool:
        """Scroll a stored message to the top of the view and highlight it."""
        for widget in self.query(".message"):
            if getattr(widget, "message_id", None) == message_id:
                widget.add_class("-found")
                self.scroll_to_widget(widget, top=True, animate=False)
                return True
        return False

    # Selecting a message -----------------------------------------------------------------------

    def select(self, widget: UserMessage | AnswerMessage | None) -> None:
        """Make `widget` the selected message and bring it into view."""
        if self.selected is not None:
            self.selected.remove_class("-selected")
        self.selected = widget
        if widget is not None:
            widget.add_class("-selected")
            self.scroll_to_widget(widget, animate=False)

    def action_select(self, step: int) -> None:
        """Select the message `step` places after the selected one (or the last one)."""
        messages = self.messages()
        if not messages:
            return
        if self.selected not in messages:
            self.select(messages[-1])
            return
        at = messages.index(self.selected) + step
        self.select(messages[max(0, min(at, len(messages) - 1))])

    def action_pick(self, action: str) -> None:
        if self.selected is not None:
            self.post_message(self.Picked(self.selected, action))

    def on_focus(self) -> None:
        if self.selected is None:
            self.action_select(0)
        else:
            self.selected.add_class("-selected")

    def on_blur(self) -> None:
        if self.selected is not None:
            self.selected.remove_class("-selected")

    def on_click(self, event: events.Click) -> None:
        node = event.widget
        while node is not None and node is not self:
            if isinstance(node, UserMessage | AnswerMessage):
                self.select(node)
                self.focus()
                return
            node = node.parent  # type: ignore[assignment]
