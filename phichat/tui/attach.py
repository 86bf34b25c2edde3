"""Files attached in the app: `/file PATH...` (names and globs) and `@PATH` in a message add
chips above the prompt box, each with its token count; a click on a chip removes it. The files
are read off the event loop (the chip shows at once), and on sending they go with the message
as `--prompt -f` sends them: whole if they fit, else their chunks most relevant to it."""

from __future__ import annotations

import re
import shlex
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.containers import HorizontalGroup
from textual.widgets import Button

from phichat.errors import PhichatError, describe
from phichat.files import TextFile, fit_files, read_attachments
from phichat.session import EMBEDDER_WAIT_S, Answer
from phichat.text import escaped

if TYPE_CHECKING:
    from phichat.session import ChatSession

FILE_COMMAND = "/file"
AT_PATH = re.compile(r"(?<!\S)@(\S+)")


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


class Chip(Button):
    """One attached file: its name and token count; pressed, it is removed."""

    def __init__(self, file: TextFile) -> None:
        super().__init__(f"{escaped(file.name)} ✕", compact=True, classes="chip")
        self.file = file
        self.tooltip = "click to remove"

    def counted(self, tokens: int) -> None:
        self.label = f"{escaped(self.file.name)} · {tokens:,} tokens ✕"


class AttachmentBar(HorizontalGroup):
    """The files attached to the next message, as chips (hidden while there is none)."""

    def on_mount(self) -> None:
        self.display = False

    @property
    def files(self) -> list[TextFile]:
        return [chip.file for chip in self.query(Chip)]

    @work(thread=True, exit_on_error=False, group="attach")
    def add(
        self, names: list[str], counter: Callable[[], tuple[Executor, Callable[[str], int]] | None]
    ) -> None:
        """Read the files `names` names (globs expanded) in a thread: each readable one becomes
        a chip at once, then gets its token count (`counter()`: the engine's thread and its
        token count, None while the model loads); each that cannot be read is a notification."""

        def warn(exc: PhichatError) -> None:
            self.app.call_from_thread(self.notify, describe(exc), severity="warning")

        known = {file.key for file in self.files}
        for file in read_attachments(names, warn):
            if file.key in known:
                continue
            chip = Chip(file)
            self.app.call_from_thread(self._show, chip)
            engine = counter()
            if engine is not None:
                executor, count = engine
                tokens = executor.submit(count, file.text).result()
                self.app.call_from_thread(chip.counted, tokens)

    def _show(self, chip: Chip) -> None:
        self.mount(chip)
        self.display = True

    @on(Button.Pressed, ".chip")
    async def _remove(self, event: Button.Pressed) -> None:
        event.stop()
        await event.button.remove()
        self.display = bool(self.query(Chip))

    async def take(self) -> list[TextFile]:
        """The attached files, for the message being sent; the bar is emptied."""
        files = self.files
        await self.query(Chip).remove()
        self.display = False
        return files


def answer_with_files(
    session: ChatSession, text: str, files: list[TextFile], notify: Callable[[str], None]
) -> Callable[[threading.Event], Answer]:
    """The answer to `text` with `files` attached, fitted where the engine runs (their chunks
    ranked with the session's embedder, once loaded); `notify` is told the sources first."""

    def stream(cancel: threading.Event) -> Answer:
        if session.store is None:
            raise PhichatError("files are attached through the history database, which is off")
        memory = session.memory.get(timeout=EMBEDDER_WAIT_S) if session.memory else None
        embedder = memory.embedder if memory else None
        budget = session.attachment_budget(text)
        parts = fit_files(
            files, text, budget, session.count_tokens, session.store, lambda: embedder
        )
        notify("sources: " + escaped("; ".join(str(part.source) for part in parts)))
        yield from session.send(text, cancel, attached=parts)

    return stream
