"""Conversations as people keep them: a role per conversation, forks, continuing an answer cut
short, pins and the archive, and writing the draft in $VISUAL/$EDITOR. Part of the ChatScreen
(a mixin: its actions go by name, each a binding with an id in `[keys]` and a palette command)."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phichat.errors import PhichatError, UsageError
from phichat.tui.chat import AnswerMessage, ChatView, UserMessage
from phichat.tui.prompt import MAX_CHARS, PromptInput
from phichat.tui.report import reported, show_error
from phichat.tui.screens import PickScreen
from phichat.tui.side import SidePane

if TYPE_CHECKING:
    import threading

    from textual.app import App

    from phichat.session import Answer
    from phichat.tui.host import ChatHost

NO_ROLE = "(no role)"


class EditorFailed(PhichatError):
    """The editor could not be run, or did not save: the draft stays as it was."""


class ConversationKeeping:
    """Role, fork, continue, pin, archive and editor: the app's actions on conversations."""

    # Roles -------------------------------------------------------------------------------------

    def action_role(self: ChatHost) -> None:
        """Pick this conversation's role (or none): its system prompt and sampling apply from
        the next answer and are kept with the conversation."""
        session = self._idle_session()
        if session is None:
            return
        names = list(session.settings.roles)
        choices = [("", NO_ROLE)] + [(name, name) for name in names]
        current = session.role.name if session.role else ""
        at = next((i for i, (name, _) in enumerate(choices) if name == current), 0)

        def chosen(name: str | None) -> None:
            if name is None:
                return
            with reported(self.app):
                session.set_role(session.role_named(name) if name else None)
                self.notify(f"role {name}: from the next answer" if name else "no role")
            self._status("ready")

        self.app.push_screen(PickScreen("Role for this conversation", choices, at), chosen)

    # Continue ----------------------------------------------------------------------------------

    async def action_continue_answer(self: ChatHost) -> None:
        """Let the model go on with the last answer, stopped or cut at max tokens, in the same
        message (nothing of it is read again)."""
        session = self._idle_session()
        if session is None:
            return
        from phichat.session import check_continuable

        try:
            last = check_continuable(
                session.history, session.engine.model_label, session.engine.device
            )
        except UsageError as exc:
            self.notify(str(exc), severity="warning")
            return
        chat = self.query_one(ChatView)
        shown = chat.last_answer()
        if shown is not None:
            await shown.remove()

        def stream(cancel: threading.Event) -> Answer:
            yield last.content  # the answer so far, shown again as the start of the same one
            yield from session.continue_answer(cancel)

        await self._answer(stream)

    # Fork --------------------------------------------------------------------------------------

    async def action_fork(self: ChatHost) -> None:
        """Carry on in a fork of this conversation at its last message (the context holds it:
        the fork's first answer reads only its new message)."""
        await self._fork(None)

    async def _fork(self: ChatHost, at: int | None) -> None:
        session = self._idle_session()
        if session is None:
            return
        if session.conversation_id is None:
            self.notify("there is nothing to fork yet", severity="warning")
            return
        parent = session.conversation_id
        self._stop_reading()  # the fork's prompt is read again, if at all, after the switch
        with reported(self.app):
            fork = session.fork(at)
            self._engine_thread.submit(session.prepare)  # on the engine thread: the KV cache
            await self._reload_chat()
            self.query_one(SidePane).reload()
            self._sync_editable()
            self._status("ready")
            self.notify(f"forked conversation {parent} as {fork.id}: you are in the fork")

    def fork_at(self: ChatHost, widget: UserMessage | AnswerMessage) -> None:
        """Fork at a message of the chat view (its message actions)."""
        message_id = widget.message_id
        session = self.session
        if message_id is None and session is not None:  # sent in this view: by its place
            shown = [w for w in self.query_one(ChatView).messages() if not w.has_class("-replaced")]
            if widget in shown and shown.index(widget) < len(session.history):
                message_id = session.history[shown.index(widget)].id
        if message_id is None:
            self.notify("this message is not saved: there is nothing to fork", severity="warning")
            return
        self.run_worker(self._fork(message_id), exclusive=True, group="fork")

    # Pins and the archive ----------------------------------------------------------------------

    def action_pin(self: ChatHost) -> None:
        """Pin the open conversation to the top of the list, or unpin it."""
        self._toggle_open("pinned")

    def action_archive(self: ChatHost) -> None:
        """Archive the open conversation out of the list (search still finds it), or restore
        an archived one (opened from a search result)."""
        self._toggle_open("archived")

    def _toggle_open(self: ChatHost, flag: str) -> None:
        session = self.session
        if session is None or session.conversation_id is None:
            self.notify("open a conversation first", severity="warning")
            return
        self.query_one(SidePane).toggle(session.conversation_id, flag)

    # The editor --------------------------------------------------------------------------------

    def action_editor(self: ChatHost) -> None:
        """Write the draft in $VISUAL or $EDITOR: the app steps aside, and what is saved comes
        back into the message box. Unset, missing or failing: one line, the draft kept."""
        prompt = self.query_one(PromptInput)
        try:
            text = self._edited(prompt.text)
        except EditorFailed as exc:
            show_error(self.app, str(exc))
            return
        finally:
            self.app.refresh()
        prompt.load_text(text)
        prompt.move_cursor(prompt.document.end)
        prompt.focus()

    def _edited(self: ChatHost, draft: str) -> str:
        """`draft` as saved in the editor (EditorFailed, the draft kept, when it was not)."""
        command = os.environ.get("VISUAL", "").strip() or os.environ.get("EDITOR", "").strip()
        if not command:
            raise EditorFailed("set $VISUAL or $EDITOR to write the message in an editor")
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise EditorFailed(f"the editor command {command!r} cannot be read: {exc}") from None
        with _draft_file(draft) as path:
            try:
                with _suspended(self.app):
                    code = subprocess.call([*argv, str(path)])
            except OSError as exc:
                raise EditorFailed(
                    f"the editor {argv[0]!r} could not be run ({exc.strerror or exc}); the"
                    " draft is as it was"
                ) from None
            if code != 0:
                raise EditorFailed(f"the editor exited with status {code}; the draft is as it was")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise EditorFailed(
                    f"the edited draft cannot be read ({exc}); it is as it was"
                ) from None
        if len(text) > MAX_CHARS:
            raise EditorFailed(
                f"the edited draft is {len(text) // 1000} KB; the message box takes up to"
                f" {MAX_CHARS // 1000} KB: it is as it was"
            )
        return text.removesuffix("\n")


@contextlib.contextmanager
def _draft_file(draft: str) -> Iterator[Path]:
    """The draft in a private temporary file, deleted afterwards."""
    handle, name = tempfile.mkstemp(prefix="phichat-draft-", suffix=".md")
    path = Path(name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(draft)
        yield path
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _suspended(app: App[Any]) -> Iterator[None]:
    """The app suspended (the terminal given to the editor, then restored), where its driver
    can be (a test's headless one cannot: the editor then runs beside it)."""
    from textual.app import SuspendNotSupported

    try:
        suspend = app.suspend()
        suspend.__enter__()
    except SuspendNotSupported:
        yield
        return
    try:
        yield
    finally:
        suspend.__exit__(None, None, None)
