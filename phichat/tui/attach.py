"""Files attached in the app: `/file PATH...` (names and globs) and `@PATH` in a message add
chips above the prompt box, each with its token count; so do `!COMMAND` (what the command
prints) and a paste of more than a screenful. A chip's tooltip shows the start of its text, and
a click on it removes it. Everything is read off the event loop (the chip shows at once), and on
sending it goes with the message as `--prompt -f` sends files: whole if it fits, else its chunks
most relevant to the message."""

from __future__ import annotations

import hashlib
import re
import shlex
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.containers import HorizontalGroup
from textual.content import Content
from textual.message import Message
from textual.widgets import Button
from textual.worker import get_current_worker

from phichat.command_output import command_output
from phichat.errors import PhichatError, describe
from phichat.files import (
    MAX_FILE_BYTES,
    FileProblem,
    Part,
    TextFile,
    decode,
    fit_files,
    read_attachments,
    whole_part,
)
from phichat.session import ATTACH_OVERHEAD, Answer
from phichat.text import clipped, escaped

if TYPE_CHECKING:
    from phichat.session import ChatSession

Counter = Callable[[], tuple[Executor, Callable[[str], int]] | None]
"""Where and how an attachment's tokens are counted: the engine's thread and its count (None
while the model loads)."""

FILE_COMMAND = "/file"
AT_PATH = re.compile(r"(?<!\S)@(\S+)")
SHELL_COMMAND = re.compile(r"!([^\s!].*)")  # one line: `!git diff`, not `!!` or `! wow`
PASTED = "pasted text"
PREVIEW_LINES = 12  # of an attachment's text, in its chip's tooltip
PREVIEW_CHARS = 100  # of each line
PART_TOKENS = 24  # about what the `[Attached: ...]` line and fence around a part take


def attach_request(text: str) -> tuple[list[str], bool]:
    """What a message asks to attach: the names after `/file` (then nothing is sent: True),
    or each `@PATH` in it that names a file or a glob that matches (the message is sent)."""
    if text.strip().split(maxsplit=1)[:1] == [FILE_COMMAND]:
        try:
            names = shlex.split(text.strip()[len(FILE_COMMAND) :])
        except ValueError:
            names = text.split()[1:]
        return names, True
    names = []
    for name in AT_PATH.findall(text):
        name = name.rstrip(".,;:!?)")
        if Path(name).expanduser().is_file() or any(ch in name for ch in "*?["):
            names.append(name)
    return names, False


def command_request(text: str) -> str | None:
    """The shell command a message of one line `!COMMAND` asks to attach the output of."""
    found = SHELL_COMMAND.fullmatch(text.strip())
    return found.group(1).strip() if found else None


def screenful(text: str, width: int, height: int) -> bool:
    """Whether a paste of `text` is more than a screen of `width` x `height` shows (it is then
    attached rather than put in the prompt box)."""
    return text.count("\n") >= height or len(text) > width * height


def pasted(text: str) -> TextFile:
    """A paste, as an attached text named PASTED; FileProblem for one over MAX_FILE_BYTES or
    holding a NUL character (no text does)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) > MAX_FILE_BYTES:
        raise FileProblem(PASTED, f"is over the {MAX_FILE_BYTES >> 20} MiB cap for a text file")
    decode(data, PASTED)
    digest = hashlib.sha256(data).hexdigest()
    return TextFile(PASTED, f"<{PASTED}>#{digest[:16]}", text, len(data), 0, digest)


def preview(text: str) -> str:
    """The start of an attached text, as a chip's tooltip shows it (controls escaped)."""
    lines = text.split("\n")
    shown = [clipped(line, PREVIEW_CHARS) for line in lines[:PREVIEW_LINES]]
    more = len(lines) - PREVIEW_LINES
    return escaped("\n".join(shown + ([f"… and {more:,} more lines"] if more > 0 else [])))


class Chip(Button):
    """One attachment: its name and token count (a paste: its lines too); pressed, it is
    removed. Its tooltip shows the start of its text. Both are plain text, never markup."""

    def __init__(self, file: TextFile) -> None:
        super().__init__(self._label(file, None), compact=True, classes="chip")
        self.file = file
        self.tokens: int | None = None
        self.tooltip = Content(f"{preview(file.text)}\n\n(click to remove)")

    def counted(self, tokens: int) -> None:
        self.tokens = tokens
        self.label = self._label(self.file, tokens)

    @staticmethod
    def _label(file: TextFile, tokens: int | None) -> Content:
        name = escaped(file.name)
        if file.name == PASTED:
            lines = whole_part(file).source.last_line
            name = f"{name}, {lines:,} {'line' if lines == 1 else 'lines'}"
        return Content(f"{name} · {tokens:,} tokens ✕" if tokens is not None else f"{name} ✕")


class AttachmentBar(HorizontalGroup):
    """The files attached to the next message, as chips (hidden while there is none)."""

    class Changed(Message):
        """A chip was counted or removed: the message as it will be sent changed."""

    @dataclass
    class Counted(Message):
        """`chip`'s text is `tokens` tokens (from the engine's thread)."""

        chip: Chip
        tokens: int

    def on_mount(self) -> None:
        self.display = False

    @property
    def files(self) -> list[TextFile]:
        return [chip.file for chip in self.query(Chip)]

    @work(thread=True, exit_on_error=False, group="attach")
    def add(self, names: list[str], counter: Counter) -> None:
        """Read the files `names` names (globs expanded) in a thread: each readable one becomes
        a chip at once, then gets its token count (`counter()`: the engine's thread and its
        token count, None while the model loads); each that cannot be read is a notification."""
        for file in read_attachments(names, self._warn):
            self._add_chip(file, counter)

    @work(thread=True, exit_on_error=False, group="attach")
    def add_command(self, command: str, counter: Counter) -> None:
        """Run `command` in a thread and attach what it prints (as `add` attaches a file);
        a command that fails, prints too much or too long is a notification."""
        worker = get_current_worker()
        output = command_output(command, self._warn, cancel=lambda: worker.is_cancelled)
        if output is not None:
            self._add_chip(output, counter)

    @work(thread=True, exit_on_error=False, group="attach")
    def add_paste(self, text: str, counter: Counter) -> None:
        """Attach a paste (as `add` attaches a file; one that cannot be is a notification)."""
        try:
            file = pasted(text)
        except FileProblem as exc:
            self._warn(exc)
            return
        self._add_chip(file, counter)

    def _warn(self, exc: PhichatError) -> None:
        self.app.call_from_thread(self.notify, describe(exc), severity="warning", markup=False)

    def _add_chip(self, file: TextFile, counter: Counter) -> None:
        """Show `file` as a chip (once: not again while attached), then have its tokens
        counted where the engine runs (not waited for here: the chip is in)."""
        if file.key in {chip.file.key for chip in self.query(Chip)}:
            return
        chip = Chip(file)
        self.app.call_from_thread(self._show, chip)
        engine = counter()
        if engine is not None:
            executor, count = engine

            def counted(job: Future[int]) -> None:
                if job.exception() is None:  # else the message, sent, says what is wrong
                    self.post_message(self.Counted(chip, job.result()))

            executor.submit(count, file.text).add_done_callback(counted)

    def read_ahead_parts(self, editing: bool, session: ChatSession) -> list[Part]:
        """What is attached to the message being typed, for reading ahead: each file whole,
        once all is counted and while they look to fit the window beside the answer (as they
        are then sent; where they are not, the read-ahead is only wasted, never wrong). None
        while `editing` (an edit is sent without files)."""
        chips = list(self.query(Chip))
        if editing or not chips or any(chip.tokens is None for chip in chips):
            return []
        n_ctx = session.engine.n_ctx
        room = n_ctx - min(session.answer_sampling.max_tokens, n_ctx // 2) - ATTACH_OVERHEAD
        if sum((chip.tokens or 0) + PART_TOKENS for chip in chips) > room:
            return []
        return [whole_part(chip.file) for chip in chips]

    def _show(self, chip: Chip) -> None:
        self.mount(chip)
        self.display = True

    @on(Counted)
    def _counted(self, event: Counted) -> None:
        event.chip.counted(event.tokens)
        self.post_message(self.Changed())

    @on(Button.Pressed, ".chip")
    async def _remove(self, event: Button.Pressed) -> None:
        event.stop()
        await event.button.remove()
        self.display = bool(self.query(Chip))
        self.post_message(self.Changed())

    async def take(self) -> list[TextFile]:
        """The attachments, for the message being sent, once those still being read (a
        command running) are in; the bar is emptied."""
        pending = [w for w in self.workers if w.group == "attach" and w.is_running]
        if pending:
            self.notify("the message goes once what is being attached is in…")
        for worker in pending:
            await worker.wait()
        files = self.files
        await self.query(Chip).remove()
        self.display = False
        return files


def answer_with_files(
    session: ChatSession,
    text: str,
    files: list[TextFile],
    notify: Callable[[str], None],
    editing: bool = False,
) -> Callable[[threading.Event], Answer]:
    """The answer to `text` with `files` attached (if any) and the chunks of the conversation's
    knowledge folder (`/use DIR`, if any), fitted where the engine runs (chunks ranked with the
    session's embedder, once loaded); `notify` is told the sources first. `editing`: `text`
    replaces the last message (ChatSession.edit_last)."""

    def stream(cancel: threading.Event) -> Answer:
        parts: list[Part] = []
        if files:
            if session.store is None:
                raise PhichatError("files are attached through the history database, which is off")
            embedder = session.chunk_embedder()
            budget = session.attachment_budget(text)
            kept = session.kept_vectors(embedder)
            count = session.count_tokens
            parts = fit_files(files, text, budget, count, session.store, lambda: embedder, kept)
        parts += session.knowledge_parts(text, parts)
        for notice in session.take_notices():  # the folder's problems, said now
            notify(notice)
        if parts:
            notify("sources: " + "; ".join(str(part.source) for part in parts))
        if editing:
            yield from session.edit_last(text, cancel, attached=parts)
        else:
            yield from session.send(text, cancel, attached=parts)

    return stream
