"""Folders in the app: `/use DIR` makes a folder the conversation's knowledge (`/use` alone says
which, `/use off` lets it go), `/index DIR` indexes a folder for search (`phichat index DIR`).
Both run in a thread, never on the event loop, and say what they did in a notification; while
they run, the status line says so. Quitting stops them after the file being indexed: each file
is indexed whole or not at all, and the rest is left for the next time."""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from textual.message import Message

from phichat.errors import PhichatError, describe
from phichat.files import embed_chunks, index_folder
from phichat.text import escaped

if TYPE_CHECKING:
    from phichat.session import ChatSession

USE = "/use"
INDEX = "/index"
OFF = "off"

Say = Callable[[str, bool], object]  # a notification from a worker thread: text, a warning?


@dataclass
class FolderSaid(Message):
    """What a folder command did, or a problem on the way (`warning`), to notify."""

    text: str
    warning: bool


@dataclass
class FolderState(Message):
    """What a folder command is doing, for the status line (None: it is done)."""

    state: str | None


def folder_command(text: str) -> tuple[str, str] | None:
    """(`/use` or `/index`, its folder: "" for none) for a message that is one of these
    commands; None for any other message. A folder may be quoted (it holds spaces)."""
    words = text.strip().split(maxsplit=1)
    if not words or words[0] not in (USE, INDEX):
        return None
    argument = words[1].strip() if len(words) > 1 else ""
    try:
        quoted = shlex.split(argument)
    except ValueError:
        quoted = []
    return words[0], quoted[0] if len(quoted) == 1 else argument


class FolderJobs:
    """The folder commands of one chat screen: run in threads, all stopped by `stop()`."""

    def __init__(self, say: Say, status: Callable[[str | None], object]) -> None:
        self.say = say  # from a worker thread
        self.status = status  # from a worker thread: what runs, None when done
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def run(self, session: ChatSession, command: str, folder: str) -> None:
        """Do `command` for `folder` in a thread of its own (`/use` alone: said at once)."""
        if command == USE and not folder:
            knowledge = session.knowledge
            self.say(
                f"this conversation's knowledge: {knowledge} (/use off lets it go)"
                if knowledge
                else "this conversation has no knowledge folder: /use DIR gives it one",
                False,
            )
            return
        if command == INDEX and not folder:
            self.say("/index DIR: which folder?", True)
            return
        work = self._use if command == USE else self._index
        thread = threading.Thread(
            target=self._guarded, args=(work, session, folder), name="phichat-folder", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop what runs after the file (or batch of vectors) being done, and wait for it."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _guarded(
        self, work: Callable[[ChatSession, str], str], session: ChatSession, folder: str
    ) -> None:
        try:
            self.say(work(session, folder), False)
        except PhichatError as exc:
            self.say(describe(exc), True)
        except Exception as exc:  # noqa: BLE001 - a notification; the app goes on
            self.say(f"{folder}: {describe(exc)}", True)
        finally:
            self.status(None)

    def _warn(self, exc: PhichatError) -> None:
        self.say(describe(exc), True)

    def _use(self, session: ChatSession, folder: str) -> str:
        if folder == OFF:
            session.use_folder(None, self._warn)
            return "this conversation has no knowledge folder now"
        self.status(f"indexing {escaped(folder)}…")
        report = session.use_folder(Path(folder), self._warn, self._stop)
        return (
            f"{folder}: {report}; this conversation's knowledge now: its parts most"
            " relevant to each message go with it"
        )

    def _index(self, session: ChatSession, folder: str) -> str:
        if session.store is None:
            raise PhichatError("folders are indexed into the history database, which is off")
        self.status(f"indexing {escaped(folder)}…")
        report = index_folder(session.store, Path(folder).expanduser(), self._warn, self._stop)
        embedder = session.chunk_embedder()
        done = 0
        if embedder is not None and not report.stopped:

            def progress(chunks: int) -> None:
                nonlocal done
                done += chunks
                self.status(f"indexing {escaped(folder)}: {done} vectors…")

            embed_chunks(session.store, embedder, progress, stop=self._stop)
        vectors = f", {done} new vectors" if done else ""
        return f"{folder}: {report}{vectors}"
