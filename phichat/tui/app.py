"""The phichat app: chat on the left, conversations and search in a side pane, one ChatSession
(the core `--prompt` drives too) with one engine loaded for the whole run.

The screen comes up at once; the model is resolved (downloaded once, with a progress bar) and
loaded in a worker thread, and a prompt sent meanwhile is queued until it is ready. Answers are
decoded in that same thread, which checks a cancel flag on every token.

Everything llama.cpp does runs on that one "engine thread": llama.cpp's CPU backend runs on an
OpenMP team that belongs to the calling thread, and when more team threads exist than cores
(a second calling thread makes a second team) libgomp stops spin-waiting, which costs ~10% of
decode speed. One thread, one team: the TUI decodes as fast as `--prompt`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, ClassVar

from textual import on, work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Footer, ProgressBar, TextArea

from phichat.config import Settings
from phichat.engine import Finish, planned_model_label
from phichat.errors import describe
from phichat.tui.chat import CPU_UI_SHARE, GPU_UI_SHARE, AnswerMessage, ChatView, TokenPipe
from phichat.tui.progress import progress_class
from phichat.tui.prompt import PromptInput
from phichat.tui.report import ERROR_TIMEOUT_S, reported, show_error
from phichat.tui.screens import SettingsScreen
from phichat.tui.side import SidePane
from phichat.tui.status import StatusLine

if TYPE_CHECKING:
    from phichat.session import ChatSession

FINISH_NOTES = {Finish.STOPPED: "stopped", Finish.LENGTH: "stopped at the token limit"}

SessionLoader = Callable[[type], "ChatSession"]
"""Given a tqdm class for download progress, resolve and load the model and open a session."""


def load_session(settings: Settings) -> SessionLoader:
    """The real loader: the configured engine (the GGUF, downloaded once, in llama.cpp; or the
    server), the history store."""

    def load(tqdm_class: type) -> ChatSession:
        from phichat.session import ChatSession

        return ChatSession.open(settings, tqdm_class=tqdm_class)

    return load


class ModelReady(Message):
    """The session is open and the model loaded."""

    def __init__(self, session: ChatSession) -> None:
        super().__init__()
        self.session = session


class ModelFailed(Message):
    """The model could not be resolved or loaded."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class DownloadProgress(Message):
    """Bytes of the model downloaded so far."""

    def __init__(self, done: int, total: int | None) -> None:
        super().__init__()
        self.done, self.total = done, total


class PhichatApp(App[None]):
    """The chat app."""

    CSS_PATH = "phichat.tcss"
    TITLE = "phichat"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+b", "toggle_side", "Chats & search"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("ctrl+s,f2", "settings", "Settings"),
    ]

    def __init__(self, settings: Settings, loader: SessionLoader | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.session: ChatSession | None = None
        self._loader = loader or load_session(settings)
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phichat-engine")
        self._opened: ChatSession | None = None  # set on the engine thread, for shutdown()
        self._quitting = threading.Event()
        self._cancel = threading.Event()
        self._answering = False
        self._queued: str | None = None
        self._load_error: str | None = None
        self._problem_shown: str | None = None

    def compose(self) -> Iterable[Widget]:
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield ChatView(id="chat")
                yield ProgressBar(id="download", show_eta=True)
                yield PromptInput(id="prompt")
            yield SidePane(id="side")
        yield StatusLine(planned_model_label(self.settings), id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#side").display = False
        self.query_one("#download").display = False
        self.query_one(PromptInput).focus()
        self._status("loading the model…")
        self._engine_thread.submit(self._load)

    @property
    def busy(self) -> bool:
        """Whether an answer is being generated (or a prompt waits for the model)."""
        return self._answering or self._queued is not None

    def _status(self, state: str) -> None:
        self.query_one(StatusLine).show(state, self.session)

    # Loading the model -------------------------------------------------------------------------

    def _load(self) -> None:
        """Resolve and load the model (engine thread)."""
        tqdm_class = progress_class(self._download_progress, self._quitting)
        try:
            self._opened = self._loader(tqdm_class)
        except Exception as exc:  # noqa: BLE001 - shown in the app, which stays up
            self.post_message(ModelFailed(describe(exc)))
            return
        self.post_message(ModelReady(self._opened))

    def _download_progress(self, done: int, total: int | None) -> None:
        self.post_message(DownloadProgress(done, total))

    @on(DownloadProgress)
    def _show_download(self, event: DownloadProgress) -> None:
        bar = self.query_one("#download", ProgressBar)
        bar.display = True
        bar.update(total=event.total, progress=event.done)
        self._status("downloading the model…")

    @on(ModelReady)
    async def _model_ready(self, event: ModelReady) -> None:
        self.session = event.session
        self.query_one("#download").display = False
        self.query_one(StatusLine).model_name = event.session.engine.model_label
        side = self.query_one(SidePane)
        side.session = event.session
        side.reload()
        self._status("ready")
        self._report_problem()
        if self._queued is not None:
            text, self._queued = self._queued, None
            await self._answer(text)

    @on(ModelFailed)
    def _failed(self, event: ModelFailed) -> None:
        self._load_error = event.error
        self._queued = None
        self.query_one("#download").display = False
        self._status("no model loaded")
        show_error(self, event.error)

    # Sending and answering ---------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        if self._load_error is not None:
            show_error(self, f"no model loaded: {self._load_error}")
            return
        if self.busy:
            self.notify("still answering: wait, or press Esc to stop", severity="warning")
            return
        self.query_one(PromptInput).accept()
        await self.query_one(ChatView).add_user(event.text)
        if self.session is None:
            self._queued = event.text
            self.notify("queued: it is sent as soon as the model is loaded")
            return
        await self._answer(event.text)

    async def _answer(self, text: str) -> None:
        answer = await self.query_one(ChatView).add_answer()
        pipe = TokenPipe()
        self._cancel = threading.Event()
        self._answering = True
        self.query_one(PromptInput).cursor_blink = False  # no repaints of our own while decoding
        assert self.session is not None
        for notice in self.session.take_notices():
            self.notify(notice, severity="warning", timeout=ERROR_TIMEOUT_S)
        self._status("answering… (Esc stops)")
        self._engine_thread.submit(self._decode, text, pipe, self._cancel)
        self._show(answer, pipe)

    def _decode(self, text: str, pipe: TokenPipe, cancel: threading.Event) -> None:
        """Stream the answer into `pipe` (engine thread)."""
        assert self.session is not None
        error = None
        try:
            with contextlib.closing(self.session.send(text, cancel)) as stream:
                for chunk in stream:
                    pipe.put(chunk)
        except Exception as exc:  # noqa: BLE001 - shown under the answer and as a notification
            error = describe(exc)
        finally:
            pipe.close(error)

    @work(exit_on_error=False, group="show")
    async def _show(self, answer: AnswerMessage, pipe: TokenPipe) -> None:
        assert self.session is not None
        # only llama.cpp on this machine's CPU needs its cores back: a GPU or a server does not
        share = CPU_UI_SHARE if self.session.engine.device == "cpu" else GPU_UI_SHARE
        try:
            await answer.stream_from(pipe, share)
        finally:
            self._answering = False
            self.query_one(PromptInput).cursor_blink = True
        stats = self.session.last_stats
        if pipe.error is not None:
            answer.set_note(f"error: {pipe.error}")
            show_error(self, pipe.error)
        elif stats is not None:
            answer.set_note(FINISH_NOTES.get(stats.finish, ""))
        self._status("ready")
        self._report_problem()
        side = self.query_one(SidePane)
        if side.display:
            side.reload()

    def _report_problem(self) -> None:
        """Say once, as a warning, what keeps search or recall from working fully."""
        problem = self.session.problem if self.session is not None else None
        if problem and problem != self._problem_shown:
            self._problem_shown = problem
            self.notify(problem, severity="warning", timeout=ERROR_TIMEOUT_S)

    # Actions -----------------------------------------------------------------------------------

    async def action_stop(self) -> None:
        """Stop the answer being generated (what was generated stays, marked stopped), or take
        back a prompt queued while the model loads."""
        if self._answering:
            self._cancel.set()
        elif self._queued is not None:
            text, self._queued = self._queued, None
            await self.query_one(ChatView).take_back_last()
            self.query_one(PromptInput).load_text(text)

    def action_quit(self) -> None:
        """Quit at any moment: stop the answer (saved, marked stopped) or the download."""
        self._quitting.set()
        self._cancel.set()
        self.exit()

    def shutdown(self) -> None:
        """Once the app has exited: let the engine thread end (within a token of a cancel; a
        model load runs to its end), then close the session and its database."""
        self._quitting.set()
        self._cancel.set()
        self._engine_thread.shutdown(wait=True)
        if self._opened is not None:
            self._opened.close()

    def action_toggle_side(self) -> None:
        """Show or hide the conversations and search pane."""
        side = self.query_one(SidePane)
        side.display = not side.display
        if side.display:
            side.reload()
            side.query_one("#search").focus()
        else:
            self.query_one(PromptInput).focus()

    async def action_new_conversation(self) -> None:
        """Start a new conversation."""
        if self.session is None or self.busy:
            self.notify("wait for the model and the answer first", severity="warning")
            return
        with reported(self):
            self.session.new_conversation()
            await self.query_one(ChatView).show([])
            self.query_one(SidePane).reload()
            self._status("ready")
        self.query_one(PromptInput).focus()

    def action_settings(self) -> None:
        """Sampling and the system prompt for this session."""
        if self.session is None:
            self.notify("the model is still loading", severity="warning")
            return
        self.push_screen(
            SettingsScreen(self.session), lambda _: self.query_one(PromptInput).focus()
        )

    @on(PromptInput.PageScroll)
    def _page(self, event: PromptInput.PageScroll) -> None:
        chat = self.query_one(ChatView)
        if event.direction < 0:
            chat.scroll_page_up()
        else:
            chat.scroll_page_down()

    @on(SidePane.Open)
    async def _open(self, event: SidePane.Open) -> None:
        if self.session is None or self.busy:
            self.notify("wait for the answer first (Esc stops it)", severity="warning")
            return
        chat = self.query_one(ChatView)
        with reported(self):
            self.session.switch(event.conversation_id)
            await chat.show(self.session.messages(event.conversation_id))
            if event.message_id is not None:
                chat.reveal(event.message_id)
            self.query_one(SidePane).reload()
            self._status("ready")

    @on(SidePane.Deleted)
    async def _deleted(self) -> None:
        if self.session is not None and self.session.conversation_id is None:
            await self.query_one(ChatView).show([])  # the open conversation was deleted

    @on(TextArea.Changed, "#prompt")
    def _typing(self, event: TextArea.Changed) -> None:
        if self.session is not None and not self._answering:
            self.query_one(SidePane).related(event.text_area.text)


def run(settings: Settings) -> int:
    """Run the app until the user quits, then shut the engine and the session down."""
    app = PhichatApp(settings)
    try:
        app.run()
    finally:
        app.shutdown()
    return 0
