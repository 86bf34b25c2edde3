"""Folders in the app: `/use DIR` makes a folder the conversation's knowledge (its chunks go
with each message, the sources a notification), `/use` says which, `/use off` lets it go, and
`/index DIR` indexes a folder for search, all off the event loop. Pilot, the scripted engine,
the real store and embedder."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import SIZE, ask, notes, ready, until

from phichat.tui.app import PhichatApp
from phichat.tui.prompt import PromptInput

FACT = "The launch code for the orbital test is ZEBRA-42, kept by Ines."


async def command(pilot: object, text: str) -> None:
    app = pilot.app  # type: ignore[attr-defined]
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.insert(text)
    await pilot.press("enter")  # type: ignore[attr-defined]


@pytest.mark.slow  # the real embedder over a folder, and an answer
async def test_use_makes_a_folder_the_knowledge_of_the_conversation(
    tmp_path: Path, scripted: Callable[..., PhichatApp]
) -> None:
    docs = tmp_path / "docs [v1]"  # a space, and what notifications would take for markup
    docs.mkdir()
    (docs / "notes.md").write_text(f"# Notes\n\n{FACT}\n")
    (docs / "garden.txt").write_text("Tomatoes need water every two days in summer.\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.md").write_text("# A\n\nalpha\n")
    app = scripted(max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await command(pilot, "/use")
        await until(lambda: any("no knowledge folder" in n for n in notes(app)), "/use alone")
        assert app.query_one(PromptInput).text == ""

        await command(pilot, f"/use {docs}")
        await until(lambda: any("knowledge now" in n for n in notes(app)), "/use DIR")
        assert session.knowledge == str(docs)
        assert not app.chat.busy  # nothing was sent

        await ask(pilot, "What is the launch code for the orbital test?")
        await until(lambda: any(n.startswith("sources: ") for n in notes(app)), "the sources")
        sources = next(n for n in notes(app) if n.startswith("sources: "))
        assert "notes.md (lines 1-3)" in sources
        assert session.conversation_id is not None
        assert session.conversation(session.conversation_id).knowledge == str(docs)
        question = next(m for m in session.history if m.role == "user")
        assert FACT in question.content

        shutil.rmtree(docs)  # gone: said at the next message, which goes without it
        await ask(pilot, "And now?")
        gone = f"{docs}: no such folder: the message goes without the folder's chunks"
        await until(lambda: gone in notes(app), "the folder gone said")

        await command(pilot, "/use off")
        await until(lambda: session.knowledge is None, "/use off")
        assert session.conversation(session.conversation_id).knowledge is None

        await command(pilot, f"/index {other}")
        await until(lambda: any(n.startswith(f"{other}: 1 file") for n in notes(app)), "/index")
        assert session.store is not None and session.store.indexed_files(str(other))
        await command(pilot, f"/index {tmp_path / 'nowhere'}")
        await until(lambda: any("nowhere: no such folder" in n for n in notes(app)), "refused")
