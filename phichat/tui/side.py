"""The side pane: the conversation list (open, rename, delete, pin, archive; pinned ones first,
a fork under its parent) and search over every stored message, or those of the open
conversation ("this chat only"), over the chunks of the indexed folders, or both (the scope
button), updated as you type (debounced, run in a worker thread). With the search box empty,
the pane shows what is related to the prompt being typed. A file chunk found is shown, with its
path and lines, in a dialog."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on, work
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Input, Label, OptionList, TextArea
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from phichat.errors import UsageError, describe
from phichat.memory import Hit, similarity_text
from phichat.store import UNTITLED
from phichat.text import escaped, is_blank, one_line
from phichat.tui.report import reported, show_error
from phichat.tui.screens import ConfirmScreen, RenameScreen

if TYPE_CHECKING:
    from phichat.session import ChatSession
    from phichat.store import Chunk, Conversation

DEBOUNCE_S = 0.25
RESULTS = 8
SNIPPET = 200
PINNED = "★ "
FORK = "↳ "
SCOPES = ("chats", "files", "both")  # what the search looks in, in the order a press cycles


def as_tree(conversations: list[Conversation]) -> list[tuple[Conversation, int]]:
    """The conversations in their order, each fork moved under its parent (when that is
    listed), with its depth."""
    listed = {c.id for c in conversations}
    forks: dict[int, list[Conversation]] = {}
    for c in conversations:
        if c.parent in listed:
            forks.setdefault(c.parent, []).append(c)
    ordered: list[tuple[Conversation, int]] = []
    stack = [(c, 0) for c in reversed(conversations) if c.parent not in listed]
    while stack:
        conversation, depth = stack.pop()
        ordered.append((conversation, depth))
        stack += [(fork, depth + 1) for fork in reversed(forks.get(conversation.id, []))]
    return ordered


class ConversationList(OptionList):
    """Conversations, pinned ones first, then newest first; r renames, d or Delete deletes
    (after a confirmation), p pins or unpins, a archives."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "rename", "Rename"),
        Binding("d,delete", "delete", "Delete"),
        Binding("p", "flip('pinned')", "Pin"),
        Binding("a", "flip('archived')", "Archive"),
    ]

    @dataclass
    class Toggle(Message):
        """Pin or unpin (`flag` "pinned"), or archive (`flag` "archived"), the highlighted one."""

        flag: str

    def action_flip(self, flag: str) -> None:
        self.post_message(self.Toggle(flag))

    class Rename(Message):
        """Rename the highlighted conversation."""

    class Delete(Message):
        """Delete the highlighted conversation."""

    def action_rename(self) -> None:
        self.post_message(self.Rename())

    def action_delete(self) -> None:
        self.post_message(self.Delete())


class SidePane(Vertical):
    """Conversations and search; posts `Open` for the app to show a conversation and `Delete`
    for it to delete one."""

    @dataclass
    class Open(Message):
        """Show conversation `conversation_id`, scrolled to `message_id` when given."""

        conversation_id: int
        message_id: int | None = None

    @dataclass
    class Delete(Message):
        """Delete conversation `conversation_id` (the user has confirmed it)."""

        conversation_id: int

    @dataclass
    class _Found(Message):
        heading: str
        hits: list[Hit] | None
        error: str = ""
        chunks: list[Chunk] = field(default_factory=list)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.session: ChatSession | None = None
        self._titles: dict[int, str] = {}
        self._timer: Timer | None = None
        self._last = ("", "Results")  # the latest query and its heading
        self._searched_in: int | None = None  # the conversation it was limited to, if any
        self.scope = SCOPES[0]  # what the search looks in
        self._chunks: dict[int, Chunk] = {}  # the file chunks listed, by id

    def compose(self) -> Iterable[Widget]:
        yield Label("Conversations  (r rename · d delete)", classes="title")
        yield ConversationList(compact=True, id="conversations")
        yield Label("Search", classes="title")
        yield Input(placeholder="words or meaning…", compact=True, id="search")
        yield Button(f"in {self.scope}", compact=True, id="where", tooltip="chats, files, both")
        yield Checkbox("this chat only", compact=True, id="scope")
        yield Label("", id="results-title", classes="title")
        yield OptionList(compact=True, id="results")

    def reload(self) -> None:
        """Re-read the conversation list, highlighting the open one."""
        if self.session is None:
            return
        listing = self.query_one(ConversationList)
        with reported(self):
            conversations = self.session.conversations()
            self._titles = {c.id: c.shown_title for c in conversations}
            listing.clear_options()
            listing.add_options(
                Option(Text(_label(c, depth)), id=str(c.id)) for c, depth in as_tree(conversations)
            )
            current = self.session.conversation_id
            if current is not None and current in self._titles:
                listing.highlighted = listing.get_option_index(str(current))
        if self._this_chat_only() and self.session.conversation_id != self._searched_in:
            self._start_search(*self._last)  # another chat is open: search that one

    def related(self, text: str) -> None:
        """Show past messages like `text` (the prompt being typed) while the search box is empty."""
        if self.display and is_blank(self.query_one("#search", Input).value):
            self._debounce(text, "Related")

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        self._debounce(event.value, "Results")

    @on(Checkbox.Changed, "#scope")
    def _scope_changed(self) -> None:
        self._start_search(*self._last)

    @on(Button.Pressed, "#where")
    def _next_scope(self, event: Button.Pressed) -> None:
        """Search in chats, then files, then both."""
        event.stop()
        self.scope = SCOPES[(SCOPES.index(self.scope) + 1) % len(SCOPES)]
        event.button.label = f"in {self.scope}"
        self.query_one("#scope", Checkbox).disabled = self.scope == "files"
        self._start_search(*self._last)

    def _this_chat_only(self) -> bool:
        return self.scope != "files" and self.query_one("#scope", Checkbox).value

    def _debounce(self, query: str, heading: str) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._last = (query, heading)
        self._timer = self.set_timer(DEBOUNCE_S, lambda: self._start_search(query, heading))

    def _start_search(self, query: str, heading: str) -> None:
        conversation_id = self.session.conversation_id if self.session is not None else None
        self._searched_in = conversation_id if self._this_chat_only() else None
        if is_blank(query) or self.session is None:
            self.query_one("#results-title", Label).update("")
            self.query_one("#results", OptionList).clear_options()
            return
        if self._this_chat_only():
            if conversation_id is None:  # a new chat: nothing in it yet
                self.workers.cancel_group(self, "search")
                self.post_message(self._Found(f"{heading} in this chat", []))
                return
            heading = f"{heading} in this chat"
        self._search(query, heading, self._searched_in, self.scope)

    @work(thread=True, exclusive=True, group="search", exit_on_error=False)
    def _search(self, query: str, heading: str, conversation_id: int | None, scope: str) -> None:
        assert self.session is not None
        hits: list[Hit] | None = []
        chunks: list[Chunk] = []
        error = ""
        try:
            if scope != "files":
                hits = self.session.search(query, k=RESULTS, conversation_id=conversation_id)
            if scope != "chats":
                chunks = self.session.search_files(query, k=RESULTS)
        except UsageError:  # no word to look for yet (a lone "?"): nothing found, no error
            hits, chunks = [], []
        except Exception as exc:  # noqa: BLE001 - shown as a notification
            hits, error = None, describe(exc)
        if not get_current_worker().is_cancelled:  # a newer query has taken over
            self.post_message(self._Found(heading, hits, error, chunks))

    @on(_Found)
    def _found(self, event: _Found) -> None:
        results = self.query_one("#results", OptionList)
        results.clear_options()
        if event.hits is None:
            self.query_one("#results-title", Label).update("")
            show_error(self, event.error)
            return
        found = len(event.hits) + len(event.chunks)
        self.query_one("#results-title", Label).update(f"{event.heading} ({found})")
        results.add_options(self._option(hit) for hit in event.hits)
        self._chunks = {chunk.id: chunk for chunk in event.chunks}
        results.add_options(self._chunk_option(chunk) for chunk in event.chunks)

    def _option(self, hit: Hit) -> Option:
        message = hit.message
        title = self._titles.get(message.conversation, UNTITLED)
        prompt = Text(no_wrap=False)
        prompt.append(f"{similarity_text(hit)} ", style="bold")
        prompt.append(f"{message.role} · {title}\n", style="dim")
        prompt.append(one_line(message.content, SNIPPET))
        return Option(prompt, id=f"{message.conversation}:{message.id}")

    def _chunk_option(self, chunk: Chunk) -> Option:
        prompt = Text(no_wrap=False)
        prompt.append(f"{escaped(chunk.path)}:{chunk.first_line}-{chunk.last_line}\n", "dim")
        prompt.append(escaped(one_line(chunk.content, SNIPPET)))
        return Option(prompt, id=f"chunk:{chunk.id}")

    @on(OptionList.OptionSelected, "#conversations")
    def _open_conversation(self, event: OptionList.OptionSelected) -> None:
        assert event.option.id is not None
        self.post_message(self.Open(int(event.option.id)))

    @on(OptionList.OptionSelected, "#results")
    def _open_result(self, event: OptionList.OptionSelected) -> None:
        assert event.option.id is not None
        where, what = event.option.id.split(":")
        if where == "chunk":
            self.app.push_screen(ChunkScreen(self._chunks[int(what)]))
        else:
            self.post_message(self.Open(int(where), int(what)))

    def _highlighted(self) -> int | None:
        listing = self.query_one(ConversationList)
        if listing.highlighted is None:
            return None
        option_id = listing.get_option_at_index(listing.highlighted).id
        return int(option_id) if option_id is not None else None

    @on(ConversationList.Rename)
    def _rename(self) -> None:
        conversation_id = self._highlighted()
        if conversation_id is None or self.session is None:
            return
        session = self.session

        def done(title: str | None) -> None:
            if title:
                with reported(self):
                    session.rename(conversation_id, title)
                self.reload()

        self.app.push_screen(RenameScreen(self._titles.get(conversation_id, "")), done)

    @on(ConversationList.Toggle)
    def _toggle_highlighted(self, event: ConversationList.Toggle) -> None:
        conversation_id = self._highlighted()
        if conversation_id is not None:
            self.toggle(conversation_id, event.flag)

    def toggle(self, conversation_id: int, flag: str) -> None:
        """Pin or unpin (`flag` "pinned"), or archive or restore (`flag` "archived"), a
        conversation, and say so."""
        if self.session is None:
            return
        with reported(self):
            now = not getattr(self.session.conversation(conversation_id), flag)
            if flag == "pinned":
                self.session.set_pinned(conversation_id, now)
                self.notify("pinned to the top" if now else "unpinned")
            else:
                self.session.set_archived(conversation_id, now)
                self.notify(
                    "archived: out of the list, still found by search (archive again restores it)"
                    if now
                    else "restored to the list"
                )
        self.reload()

    @on(ConversationList.Delete)
    def _delete(self) -> None:
        conversation_id = self._highlighted()
        if conversation_id is None or self.session is None:
            return
        title = self._titles.get(conversation_id, UNTITLED)

        def done(yes: bool | None) -> None:
            if yes:  # the app deletes it, stopping an answer being written in it first
                self.post_message(self.Delete(conversation_id))

        question = f"Delete the conversation {title!r} and all its messages?"
        self.app.push_screen(ConfirmScreen(question), done)


class ChunkScreen(ModalScreen[None]):
    """A file chunk found by search: its path and lines, and its text (read only); Esc closes
    it."""

    DEFAULT_CSS = """
    ChunkScreen { align: center middle; }
    ChunkScreen TextArea { height: auto; max-height: 20; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss", "Close")]

    def __init__(self, chunk: Chunk) -> None:
        super().__init__()
        self.chunk = chunk

    def compose(self) -> Iterable[Widget]:
        chunk = self.chunk
        with Vertical(classes="dialog"):
            where = f"{chunk.path}: lines {chunk.first_line}-{chunk.last_line}  (Esc closes)"
            yield Label(escaped(where), classes="title", markup=False)
            yield TextArea(escaped(chunk.content), read_only=True, compact=True, id="chunk")


def _label(conversation: Conversation, depth: int) -> str:
    """A conversation in the list: a fork indented under its parent, a pinned one starred."""
    mark = ("  " * (depth - 1) + FORK if depth else "") + (PINNED if conversation.pinned else "")
    return f"{mark}{conversation.shown_title}  ({conversation.message_count})"
