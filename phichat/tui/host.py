"""What the chat's mixins (MessageActions, ConversationKeeping, ModelSwitching, ReadingAhead)
need of the screen they are part of: `ChatHost`, their self-type (mypy's mixin pattern: a
Protocol, so they need not import the ChatScreen, which satisfies it). A mixin method that uses
something new of the screen declares it here."""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

if TYPE_CHECKING:
    from textual.app import App
    from textual.message import Message
    from textual.notifications import SeverityLevel
    from textual.timer import Timer
    from textual.widget import Widget
    from textual.worker import Worker

    from phichat.config import Settings
    from phichat.files import Part
    from phichat.session import Answer, ChatSession
    from phichat.tui.chat import AnswerMessage, UserMessage

W = TypeVar("W", bound="Widget")

Stream = Callable[[threading.Event], "Answer"]
"""Given the answer's cancel flag, the session's stream of an answer (send, regenerate, edit)."""


class ChatHost(Protocol):
    """The chat screen, as its mixins see it."""

    session: ChatSession | None  # once the model is loaded
    show_replaced: bool  # answers replaced by a regenerate or an edit are shown
    _load_error: str | None  # why no model is loaded
    _switching: str | None  # the model being switched to
    _quitting: threading.Event
    _engine_thread: ThreadPoolExecutor  # everything llama.cpp does runs here
    _reading: threading.Event  # set: the read-ahead under way is to stop
    _read_timer: Timer | None
    _read_text: str | None
    _read_again: bool

    # Textual's, of the screen ------------------------------------------------------------------

    @property
    def app(self) -> App[Any]: ...

    @property
    def focused(self) -> Widget | None: ...

    @overload
    def query_one(self, selector: str) -> Widget: ...

    @overload
    def query_one(self, selector: type[W]) -> W: ...

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None: ...

    def post_message(self, message: Message) -> bool: ...

    def set_timer(self, delay: float, callback: Callable[[], None]) -> Timer: ...

    def run_worker(
        self, work: Coroutine[Any, Any, None], *, group: str, exclusive: bool
    ) -> Worker[None]: ...

    async def run_action(self, action: str) -> None: ...

    # The chat screen's ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool: ...

    def key_hint(self, action: str) -> str: ...

    def _status(self, state: str) -> None: ...

    def _answer_state(self) -> str: ...

    def _idle_session(self) -> ChatSession | None: ...

    async def _answer(self, stream: Stream, regenerating: bool = False) -> None: ...

    async def _reload_chat(self) -> None: ...

    def _sync_editable(self) -> None: ...

    def _download_progress(self, done: int, total: int | None) -> None: ...

    # The mixins' own, used by themselves or by each other ----------------------------------------

    def _copy(self, text: str, what: str) -> None: ...

    def _copy_code(self, message: UserMessage | AnswerMessage | None) -> None: ...

    def fork_at(self, widget: UserMessage | AnswerMessage) -> None: ...

    async def _fork(self, at: int | None) -> None: ...

    def _toggle_open(self, flag: str) -> None: ...

    def _edited(self, draft: str) -> str: ...

    def _switch_to(self, name: str | None) -> None: ...

    def _fetch_model(self, name: str, settings: Settings) -> Worker[None]: ...

    def _load_model(self, name: str, settings: Settings) -> None: ...

    def _read_ahead_soon(self, at_once: bool = False) -> None: ...

    def _stop_reading(self) -> None: ...

    def _read_draft(self) -> None: ...

    def _read(
        self,
        session: ChatSession,
        draft: str,
        parts: list[Part],
        editing: bool,
        cancel: threading.Event,
    ) -> None: ...
