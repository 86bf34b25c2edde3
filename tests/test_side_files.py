"""The side pane's search scope: chats, files (the chunks of the indexed folders) or both; a
file chunk found shows its path and lines, and opens in a dialog. The pane alone in a small
app, on a session with the real history database and embedder (the scripted engine)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import until
from textual.app import App
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Input, Label, OptionList, TextArea

from phichat.config import load_settings
from phichat.files import index_folder
from phichat.session import ChatSession
from phichat.tui.side import ChunkScreen, SidePane

if TYPE_CHECKING:
    from fake_engine import FakeEngine

FACT = "The launch code for the orbital test is ZEBRA-42, kept by Ines."


class PaneApp(App[None]):
    """The side pane alone, on `session`."""

    def __init__(self, session: ChatSession) -> None:
        super().__init__()
        self.session = session

    def compose(self) -> Iterable[Widget]:
        yield SidePane(id="side")

    def on_mount(self) -> None:
        pane = self.query_one(SidePane)
        pane.session = self.session
        pane.reload()


def results(app: App[None]) -> list[str]:
    listed = app.query_one("#results", OptionList)
    return [str(listed.get_option_at_index(i).prompt) for i in range(listed.option_count)]


def kinds(app: App[None]) -> list[str]:
    """What each result is: "chunk" or "message"."""
    listed = app.query_one("#results", OptionList)
    ids = [str(listed.get_option_at_index(i).id) for i in range(listed.option_count)]
    return ["chunk" if i.startswith("chunk:") else "message" for i in ids]


@pytest.mark.slow  # the real embedder over messages and a folder, in an app
async def test_the_search_looks_in_chats_files_or_both_and_opens_a_chunk(
    tmp_path: Path, fake_engine: FakeEngine, minilm_dir: Path
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text(f"# Notes\n\n{FACT}\n")
    (docs / "garden.txt").write_text("Tomatoes need water every two days in summer.\n")
    settings = load_settings("cpu", overrides={"sampling": {"max_tokens": 4}})
    session = ChatSession.open(settings, fake_engine)  # type: ignore[arg-type]
    try:
        assert session.store is not None
        index_folder(session.store, docs, lambda exc: None)
        "".join(session.send("Where did I put the launch code notes?"))
        app = PaneApp(session)
        async with app.run_test() as pilot:
            pane = app.query_one(SidePane)
            title = app.query_one("#results-title", Label)
            app.query_one("#search", Input).value = "launch code"
            await until(lambda: "Results (" in str(title.render()), "chat results")
            assert set(kinds(app)) == {"message"}

            await pilot.click("#where")  # files
            assert str(app.query_one("#where", Button).label) == "in files"
            assert app.query_one("#scope", Checkbox).disabled  # "this chat only": chats only
            await until(lambda: any("notes.md:1-3" in r for r in results(app)), "file results")
            assert set(kinds(app)) == {"chunk"}
            assert results(app)[0].startswith(f"{docs / 'notes.md'}:1-3\n# Notes The launch")

            await pilot.click("#where")  # both: the messages, then the chunks
            await until(lambda: len(set(kinds(app))) == 2, "both results")
            assert kinds(app) == sorted(kinds(app), reverse=True)  # messages first

            listed = app.query_one("#results", OptionList)
            listed.focus()
            listed.highlighted = listed.option_count - 1
            await pilot.press("enter")
            await until(lambda: isinstance(app.screen, ChunkScreen), "the chunk shown")
            shown = app.screen.query_one("#chunk", TextArea).text
            assert shown in (f"# Notes\n\n{FACT}", "Tomatoes need water every two days in summer.")
            await pilot.press("escape")
            await until(lambda: not isinstance(app.screen, ChunkScreen), "the chunk closed")

            await pilot.click("#where")  # back to chats
            assert str(app.query_one("#where", Button).label) == "in chats"
            assert pane.scope == "chats"
    finally:
        session.close()
