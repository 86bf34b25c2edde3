"""The chat: the conversation on the left, conversations and search in a side pane, the message
box, the status line and the footer, with every chat action as a binding (remappable from
`[keys]`) and a palette command. One ChatSession (the core `--prompt` drives too) with one
engine loaded for the whole run.

The screen comes up at once; the model is resolved (downloaded once, with a progress bar) and
loaded on the engine thread, and a prompt sent meanwhile is queued until it is ready. Answers are
decoded on that same thread, which checks a cancel flag on every token. What can be done with
messages, conversations, models and the draft lives in the mixins (actions.py, keeping.py,
models.py, reading.py), whose self-type is `ChatHost` (host.py), which this screen satisfies.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from textual import on, work
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, ProgressBar, TextArea
from textual.worker import Worker, WorkerError

from phichat.command_output import command_name
from phichat.config import Settings
from phichat.engine import Finish
from phichat.engines import planned_model_label
from phichat.errors import describe
from phichat.store import Role
from phichat.tui.actions import MessageActions
from phichat.tui.attach import AttachmentBar, answer_with_files, attach_request, command_request
from phichat.tui.chat import (
    CPU_UI_SHARE,
    GPU_UI_SHARE,
    AnswerMessage,
    ChatView,
    TokenPipe,
)
from phichat.tui.folders import FolderJobs, FolderSaid, FolderState, folder_command
from phichat.tui.host import Stream
from phichat.tui.keeping import ConversationKeeping
from phichat.tui.models import ModelSwitching
from phichat.tui.palette import PhichatCommands, action_bindings, key_hint
from phichat.tui.progress import progress_class
from phichat.tui.prompt import PromptInput
from phichat.tui.reading import ReadingAhead
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


@dataclass
class ModelReady(Message):
    """The session is open and the model loaded."""

    session: ChatSession


@dataclass
class ModelFailed(Message):
    """The model could not be resolved or loaded."""

    error: str


@dataclass
class DownloadProgress(Message):
    """Bytes of the model downloaded so far."""

    done: int
    total: int | None


class ChatScreen(MessageActions, ConversationKeeping, ModelSwitching, ReadingAhead, Screen[None]):
    """The chat, with its bindings and everything they do."""

    COMMANDS = Screen.COMMANDS | {PhichatCommands}
    BINDINGS: ClassVar[list[BindingType]] = [*action_bindings()]

    def __init__(self, settings: Settings, loader: SessionLoader | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.session: ChatSession | None = None
        self._loader = loader or load_session(settings)
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phichat-engine")
        self._opened: ChatSession | None = None  # set on the engine thread, for shutdown()
        self._quitting = threading.Event()
        self._cancel = threading.Event()
        self._reading = threading.Event()  # set: the read-ahead under way is to stop
        self._answering = False
        self._showing: Worker[None] | None = None  # shows the answer being written, to its end
        self._queued: str | None = None
        self._load_error: str | None = None
        self._problem_shown: str | None = None
        self._switching: str | None = None  # the model being switched to
        self.show_replaced = False  # answers replaced by a regenerate or an edit
        self._folders = FolderJobs(  # /use and /index, in threads of their own
            lambda text, warning: self.post_message(FolderSaid(text, warning)),
            lambda state: self.post_message(FolderState(state)),
        )

    def compose(self) -> Iterable[Widget]:
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield ChatView(self.settings.keys, id="chat")
                yield ProgressBar(id="download", show_eta=True)
                yield AttachmentBar(id="attachments")
                yield PromptInput(self.settings.keys, id="prompt")
            yield SidePane(id="side")
        yield StatusLine(planned_model_label(self.settings), id="status")
        yield Footer()

    def key_hint(self, action: str) -> str:
        """The key that runs `action` now (`[keys]` may remap it), for a hint on screen."""
        return key_hint(self.settings.keys, action)

    def on_mount(self) -> None:
        self.query_one("#side").display = False
        self.query_one("#download").display = False
        self.query_one(PromptInput).focus()
        self._status("loading the model…")
        self._engine_thread.submit(self._load)

    def stop_everything(self) -> None:
        """Raise the flags that stop the model's download or load, the answer and the read-ahead
        (from any thread, a signal handler among them: no lock taken for a flag already up)."""
        for flag in (self._quitting, self._cancel, self._reading):
            if not flag.is_set():
                flag.set()

    def shutdown(self) -> None:
        """Once the app has exited: let the engine thread end (within a token of a cancel; a
        model load runs to its end), then close the session and its database."""
        self.stop_everything()
        self._folders.stop()  # after the file being indexed
        self._engine_thread.shutdown(wait=True)
        if self._opened is not None:
            self._opened.close()

    @property
    def busy(self) -> bool:
        """Whether an answer is being generated (or a prompt waits for the model)."""
        return self._answering or self._queued is not None

    def _status(self, state: str) -> None:
        """Show `state` on the status line (also under a dialog; none once the app is closing
        and the widgets are gone)."""
        for line in self.query(StatusLine):
            line.show(state, self.session)

    def _answer_state(self) -> str:
        """The status line's state once nothing else is under way: answering (with the key
        that stops it) or ready."""
        return f"answering… ({self.key_hint('stop')} stops)" if self._answering else "ready"

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
        self._status(f"downloading {self._switching or 'the model'}…")

    @on(ModelReady)
    async def _model_ready(self, event: ModelReady) -> None:
        self.session = event.session
        self.query_one("#download").display = False
        self.query_one(StatusLine).model_name = event.session.engine.model_label
        side = self.query_one(SidePane)
        side.session = event.session
        side.reload()
        self._status("ready")
        for notice in event.session.take_notices():
            self._warn(notice)
        self._report_problem()
        if self._queued is not None:
            text, self._queued = self._queued, None
            await self._send(text)

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
        folder = folder_command(event.text)
        if folder is not None:
            if self.session is None:
                self.notify("/use and /index wait for the model to load", severity="warning")
                return
            self.query_one(PromptInput).accept()
            self._folders.run(self.session, *folder)
            return
        command = command_request(event.text)
        if command is not None:  # `!COMMAND`: what it prints is attached (nothing is sent)
            self.query_one(AttachmentBar).add_command(command, self._token_counter)
            self.query_one(PromptInput).accept()
            self.notify(f"running {command_name(command)}…")
            return
        names, only_attach = attach_request(event.text)
        if only_attach:
            self.query_one(AttachmentBar).add(names, self._token_counter)
            self.query_one(PromptInput).accept()
            return
        if names:  # `@PATH`: read before the message goes
            await self.query_one(AttachmentBar).add(names, self._token_counter).wait()
        if self._load_error is not None:
            show_error(self, f"no model loaded: {self._load_error}")
            return
        if self.busy:
            stop = self.key_hint("stop")
            self.notify(f"still answering: wait, or press {stop} to stop", severity="warning")
            return
        prompt = self.query_one(PromptInput)
        if event.editing and self.session is not None:
            await self._edit(self.session, event.text)
        else:
            prompt.accept()
            await self.query_one(ChatView).add_user(event.text)
            await self._send(event.text)
        if self.session is not None:
            prompt.editable = event.text  # what Up offers for editing from now on

    async def _send(self, text: str) -> None:
        """Answer `text` (already shown), or queue it while the model loads."""
        session = self.session
        if session is None:
            self._queued = text
            self.notify("queued: it is sent as soon as the model is loaded")
            return
        files = await self.query_one(AttachmentBar).take()  # and the folder's chunks (/use)
        await self._answer(answer_with_files(session, text, files, self._notify_soon))

    def _token_counter(self) -> tuple[ThreadPoolExecutor, Callable[[str], int]] | None:
        """Where and how an attached file's tokens are counted (None while the model loads)."""
        session = self.session
        return None if session is None else (self._engine_thread, session.count_tokens)

    @on(FolderSaid)
    def _folder_said(self, event: FolderSaid) -> None:
        if event.warning:
            self.notify(event.text, severity="warning", timeout=ERROR_TIMEOUT_S)
        else:
            self.notify(event.text)

    @on(FolderState)
    def _folder_state(self, event: FolderState) -> None:
        self._status(event.state or self._answer_state())

    def _notify_soon(self, text: str) -> None:
        """A notification from the engine's thread."""
        self.app.call_from_thread(self.notify, text)

    def _warn(self, text: str) -> None:
        """A warning that stays long enough to be read."""
        self.notify(text, severity="warning", timeout=ERROR_TIMEOUT_S)

    async def _edit(self, session: ChatSession, text: str) -> None:
        """Send `text` in place of the last message, with the folder chunks (`/use`) a new
        message would get: the old exchange leaves the view (or is marked replaced when
        replaced ones are shown)."""
        chat = self.query_one(ChatView)
        self.query_one(PromptInput).accept()
        await chat.retire(chat.last_exchange(), self.show_replaced)
        await chat.add_user(text)
        await self._answer(answer_with_files(session, text, [], self._notify_soon, editing=True))

    async def _answer(self, stream: Stream, regenerating: bool = False) -> None:
        self._stop_reading()
        answer = await self.query_one(ChatView).add_answer()
        pipe = TokenPipe()
        self._cancel = threading.Event()
        self._answering = True
        self.query_one(PromptInput).cursor_blink = False  # no repaints of our own while decoding
        assert self.session is not None
        for notice in self.session.take_notices():
            self._warn(notice)
        self._status(self._answer_state())
        self._engine_thread.submit(self._decode, stream, pipe, self._cancel)
        self._showing = self._show(answer, pipe, regenerating)

    def _decode(self, stream: Stream, pipe: TokenPipe, cancel: threading.Event) -> None:
        """Stream the answer into `pipe` (engine thread)."""
        error = None
        try:
            with contextlib.closing(stream(cancel)) as chunks:
                for chunk in chunks:
                    pipe.put(chunk)
        except Exception as exc:  # noqa: BLE001 - shown under the answer and as a notification
            error = describe(exc)
        finally:
            pipe.close(error)

    @work(exit_on_error=False, group="show")
    async def _show(self, answer: AnswerMessage, pipe: TokenPipe, regenerating: bool) -> None:
        session = self.session
        assert session is not None
        # only llama.cpp on this machine's CPU needs its cores back: a GPU or a server does not
        share = CPU_UI_SHARE if session.engine.device == "cpu" else GPU_UI_SHARE
        try:
            await answer.stream_from(pipe, share)
        finally:
            self._answering = False
            self.query_one(PromptInput).cursor_blink = True
        stats = session.last_stats
        if pipe.error is not None:
            answer.set_note(f"error: {pipe.error}")
            show_error(self, pipe.error)
        elif stats is not None:
            answer.set_note(FINISH_NOTES.get(stats.finish, ""))
        if regenerating and session.history and session.history[-1].role == Role.USER:
            await self._reload_chat()  # no new answer was saved: the old one still stands
        self._sync_editable()
        self._status(self._answer_state())
        self._read_ahead_soon(at_once=True)  # the next turn's history (where the cut moves)
        self._report_problem()
        side = self.query_one(SidePane)
        if side.display:
            side.reload()

    def _report_problem(self) -> None:
        """Say once, as a warning, what keeps search or recall from working fully."""
        problem = self.session.problem if self.session is not None else None
        if problem and problem != self._problem_shown:
            self._problem_shown = problem
            self._warn(problem)

    # Actions -----------------------------------------------------------------------------------

    async def action_stop(self) -> None:
        """Stop the answer being generated (what was generated stays, marked stopped), take back
        a prompt queued while the model loads, or leave editing the last message. A read-ahead
        under way stops too."""
        self._stop_reading()
        prompt = self.query_one(PromptInput)
        if self._answering:
            self._cancel.set()
        elif self._queued is not None:
            text, self._queued = self._queued, None
            await self.query_one(ChatView).take_back_last()
            prompt.load_text(text)
        elif prompt.editing:
            prompt.stop_editing()
            prompt.clear()

    async def _stop_answer(self) -> None:
        """Stop the answer being written and wait, without holding the screen up, until it has
        ended: saved, marked stopped, and shown so."""
        while self._answering and self._showing is not None:
            self._cancel.set()
            with contextlib.suppress(WorkerError):  # failed or cancelled: ended all the same
                await self._showing.wait()

    def _focus_prompt(self) -> None:
        self.query_one(PromptInput).focus()

    def _idle_session(self) -> ChatSession | None:
        """The session, once the model is loaded and no answer is being written (else a
        warning says why not, and None)."""
        if self.session is None:
            self.notify("the model is still loading", severity="warning")
        elif self.busy:
            stop = self.key_hint("stop")
            self.notify(f"wait for the answer first ({stop} stops it)", severity="warning")
        else:
            return self.session
        return None

    def _sync_editable(self) -> None:
        """Tell the message box which message Up offers for editing (an edit under way of
        another one, in a conversation left since, becomes a new message)."""
        session = self.session
        prompt = self.query_one(PromptInput)
        editable = session.last_user_text() if session else None
        if prompt.editing and editable != prompt.editable:
            prompt.stop_editing()
        prompt.editable = editable

    async def _reload_chat(self) -> None:
        """Show the open conversation again as stored."""
        session = self.session
        chat = self.query_one(ChatView)
        if session is None or session.conversation_id is None:
            await chat.show([])
        else:
            await chat.show(session.messages(session.conversation_id), self.show_replaced)

    def _show_side(self, focus: str) -> None:
        side = self.query_one(SidePane)
        if not side.display:
            side.display = True
            side.reload()
        side.query_one(focus).focus()

    def action_toggle_side(self) -> None:
        """Show or hide the conversations and search pane."""
        side = self.query_one(SidePane)
        if side.display:
            side.display = False
            self.query_one(PromptInput).focus()
        else:
            self._show_side("#search")

    def action_conversations(self) -> None:
        """The side pane with the conversation list focused."""
        self._show_side("#conversations")

    def action_search(self) -> None:
        """The side pane with the search box focused."""
        self._show_side("#search")

    async def action_new_conversation(self) -> None:
        """Start a new conversation."""
        session = self._idle_session()
        if session is None:
            return
        with reported(self):
            session.new_conversation()
            self._stop_reading()
            self._engine_thread.submit(session.prepare)  # saves the state of the one left
            self._read_ahead_soon()
            await self.query_one(ChatView).show([])
            self.query_one(SidePane).reload()
            self._sync_editable()
            self._status("ready")
        self.query_one(PromptInput).focus()

    def action_settings(self) -> None:
        """Sampling and the system prompt for this session (and saving them as defaults)."""
        if self.session is None:
            self.notify("the model is still loading", severity="warning")
            return
        self._stop_reading()  # the system prompt may change the prompt
        self.app.push_screen(SettingsScreen(self.session, self.settings), self._settings_closed)

    def _settings_closed(self, _result: object) -> None:
        self._focus_prompt()
        self._read_ahead_soon()

    @on(PromptInput.PageScroll)
    def _page(self, event: PromptInput.PageScroll) -> None:
        chat = self.query_one(ChatView)
        if event.direction < 0:
            chat.scroll_page_up()
        else:
            chat.scroll_page_down()

    @on(SidePane.Open)
    async def _open(self, event: SidePane.Open) -> None:
        session = self._idle_session()  # an answer being written goes on, in its conversation
        if session is None:
            return
        chat = self.query_one(ChatView)
        with reported(self):
            session.switch(event.conversation_id)
            self._stop_reading()
            self._engine_thread.submit(session.prepare)  # its saved state, ahead of time
            self._read_ahead_soon()
            await self._reload_chat()
            if event.message_id is not None:  # once laid out: scrolled to before, it is not
                self.call_after_refresh(chat.reveal, event.message_id)
            self.query_one(SidePane).reload()
            self._sync_editable()
            self._status("ready")

    @on(SidePane.Delete)
    def _delete_asked(self, event: SidePane.Delete) -> None:
        self._delete(event.conversation_id)

    @work(exit_on_error=False, group="delete")
    async def _delete(self, conversation_id: int) -> None:
        """Delete a conversation (a worker: keys, Esc among them, go on being handled). One
        being answered has its answer stopped first, saved marked stopped. The engine forgets
        its saved state on the engine thread, which waits for an answer being written to end:
        on this thread that wait would freeze the app."""
        session = self.session
        if session is None:
            return
        was_open = session.conversation_id == conversation_id
        if was_open:
            self._stop_reading()
            await self._stop_answer()  # the answer is always in the open conversation
        with reported(self):
            key = session.delete_history(conversation_id)
            if key is not None:
                self._engine_thread.submit(session.engine.forget, key)
            if was_open:
                await self.query_one(ChatView).show([])
                self._sync_editable()
                self._status("ready")
        self.query_one(SidePane).reload()

    @on(PromptInput.LongPaste)
    def _long_paste(self, event: PromptInput.LongPaste) -> None:
        self.query_one(AttachmentBar).add_paste(event.text, self._token_counter)

    @on(AttachmentBar.Changed)
    def _attachments_changed(self) -> None:
        if self.session is not None and not self._answering:
            self._read_ahead_soon(at_once=True)  # the message as it will be sent changed

    @on(TextArea.Changed, "#prompt")
    def _typing(self, event: TextArea.Changed) -> None:
        if self.session is not None and not self._answering:
            self.query_one(SidePane).related(event.text_area.text)
            prompt = self.query_one(PromptInput)
            self._read_ahead_soon(at_once=prompt.pasted)
            prompt.pasted = False
