"""What can be done with the conversation's messages: copy the last answer, any message or a
code block (OSC 52, so also over SSH), answer again, edit and resend the last message, show what
those replaced, export to Markdown. Part of the ChatScreen (a mixin: its handlers go by name)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from phichat.text import clipped
from phichat.tui.chat import AnswerMessage, ChatView, UserMessage, code_blocks
from phichat.tui.prompt import PromptInput
from phichat.tui.report import reported
from phichat.tui.screens import ConfirmScreen, ExportScreen, PickScreen

if TYPE_CHECKING:
    from phichat.tui.host import ChatHost


class MessageActions:
    """Copy, regenerate, edit, show replaced, export: the chat's actions on messages."""

    def _copy(self: ChatHost, text: str, what: str) -> None:
        """Put `text` on the clipboard (OSC 52: also over SSH) and say so."""
        self.app.copy_to_clipboard(text)
        self.notify(f"copied {what} ({len(text)} characters)")

    def action_copy_answer(self: ChatHost) -> None:
        """Copy the last answer."""
        answer = self.query_one(ChatView).last_answer()
        if answer is None or not answer.text.strip():
            self.notify("there is no answer to copy yet", severity="warning")
            return
        self._copy(answer.text, "the answer")

    def action_copy_code(self: ChatHost) -> None:
        """Copy a code block of the selected message (the chat focused) or the last answer;
        with several, ask which."""
        chat = self.query_one(ChatView)
        message = chat.selected if self.focused is chat else None
        self._copy_code(message or chat.last_answer())

    def _copy_code(self: ChatHost, message: UserMessage | AnswerMessage | None) -> None:
        blocks = code_blocks(message.text) if message is not None else []
        if not blocks:
            where = "this message" if message is not None else "the chat"
            self.notify(f"there is no code block in {where}", severity="warning")
            return

        def copy(choice: str | None) -> None:
            if choice is not None:
                language, code = blocks[int(choice)]
                lines = len(code.splitlines())
                kind = f"a {language} code block" if language else "a code block"
                self._copy(code, f"{kind}, {lines} line{'s' if lines != 1 else ''}")

        if len(blocks) == 1:
            copy("0")
            return
        choices = [
            (str(i), f"{i + 1}. {language or 'code'}: {_first_line(code)}")
            for i, (language, code) in enumerate(blocks)
        ]
        self.app.push_screen(PickScreen("Copy which code block?", choices), copy)

    def on_chat_view_picked(self: ChatHost, event: ChatView.Picked) -> None:
        """c on a selected message copies it; Enter offers what can be done with it."""
        widget = event.widget
        if event.action == "copy":
            self._copy(widget.text, "the message")
            return
        chat = self.query_one(ChatView)
        exchange = chat.last_exchange()
        choices = [("copy", "Copy this message")]
        if code_blocks(widget.text):
            choices.append(("copy_code", "Copy a code block"))
        if widget is chat.last_answer():
            choices.append(("regenerate", "Answer again (regenerate)"))
        if isinstance(widget, UserMessage) and exchange and widget is exchange[0]:
            choices.append(("edit_last", "Edit and send again"))
        history = self.session.history if self.session is not None else []
        if widget is chat.last_answer() and history and history[-1].cut_short:
            choices.append(("continue_answer", "Continue this answer (it was cut short)"))
        choices.append(("fork_here", "Fork the conversation here"))

        async def run(choice: str | None) -> None:
            if choice == "copy":
                self._copy(widget.text, "the message")
            elif choice == "copy_code":
                self._copy_code(widget)
            elif choice == "fork_here":
                self.fork_at(widget)
            elif choice is not None:
                await self.run_action(choice)

        self.app.push_screen(PickScreen("This message", choices), run)

    async def action_regenerate(self: ChatHost) -> None:
        """Answer the last message again with a fresh seed; the old answer is kept, marked
        replaced (shown on request)."""
        session = self._idle_session()
        if session is None:
            return
        if session.last_user_text() is None:
            self.notify("there is no message to answer again yet", severity="warning")
            return
        if session.sampling.temperature == 0:
            self.notify("temperature 0 is greedy: expect the same answer", severity="warning")
        chat = self.query_one(ChatView)
        answers = [w for w in chat.last_exchange() if isinstance(w, AnswerMessage)]
        await chat.retire(answers, self.show_replaced)
        await self._answer(session.regenerate, regenerating=True)

    def action_edit_last(self: ChatHost) -> None:
        """Put the last message in the box to edit; sent, it replaces the last exchange."""
        session = self.session
        text = session.last_user_text() if session is not None else None
        if text is None:
            self.notify("there is no message to edit yet", severity="warning")
            return
        prompt = self.query_one(PromptInput)
        prompt.offer_edit(text)
        prompt.focus()

    async def action_show_replaced(self: ChatHost) -> None:
        """Show or hide answers (and messages) replaced by a regenerate or an edit (not while
        an answer is being written: the chat is shown again as stored)."""
        if self.busy:
            stop = self.key_hint("stop")
            self.notify(f"wait for the answer first ({stop} stops it)", severity="warning")
            return
        self.show_replaced = not self.show_replaced
        if self.session is not None and self.session.conversation_id is not None:
            with reported(self.app):
                await self._reload_chat()
        self.notify("replaced answers shown" if self.show_replaced else "replaced answers hidden")

    def action_export(self: ChatHost) -> None:
        """Write the open conversation to a Markdown file (asking where)."""
        session = self.session
        if session is None or session.conversation_id is None:
            self.notify("there is no conversation to export yet", severity="warning")
            return
        conversation_id = session.conversation_id
        title = session.conversation(conversation_id).title
        slug = re.sub(r"[^\w]+", "-", title.lower()).strip("-")[:40] or "conversation"
        default = Path.cwd() / f"phichat-{conversation_id}-{slug}.md"

        def write(path: Path) -> None:
            with reported(self.app):
                path.write_text(session.export(conversation_id), encoding="utf-8")
                self.notify(f"exported the conversation to {path}")

        def chosen(path: Path | None) -> None:
            if path is None:
                return
            if path.exists():
                question = f"{path} exists. Replace it?"
                self.app.push_screen(
                    ConfirmScreen(question), lambda yes: write(path) if yes else None
                )
            else:
                write(path)

        self.app.push_screen(ExportScreen(default), chosen)


def _first_line(code: str, width: int = 50) -> str:
    line = next((line.strip() for line in code.splitlines() if line.strip()), "")
    return clipped(line, width)
