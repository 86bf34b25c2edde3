"""The chunk vectors a session keeps between searches (the side pane's file search, each `/use`
message's folder chunks): read once, then only what changed in the index, never a chunk of a
file changed or gone; and an edit of the last message that gets the folder's chunks a new
message with its text would get. Real SQLite, the real MiniLM embedder, the scripted engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import SIZE, ask, garden, notes, ready, until

from phichat.config import load_settings
from phichat.files import Part, embed_chunks, index_folder, with_attachments, written_text
from phichat.session import ChatSession
from phichat.store import Source
from phichat.tui.app import PhichatApp
from phichat.tui.prompt import PromptInput

if TYPE_CHECKING:
    from fake_engine import FakeEngine

FACT = "The launch code for the orbital test is ZEBRA-42, kept by Ines."
CAT = "Our feline naps on a warm windowsill all afternoon."  # no word of CAT_QUERY in it
CAT_QUERY = "cat sleeping spot"


def make_folder(root: Path) -> Path:
    docs = root / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text(f"# Notes\n\n{FACT}\n")
    (docs / "garden.txt").write_text(garden(12) + "\n")
    return docs


def two_files(root: Path) -> Path:
    """A folder of two files of one chunk each, about 50 tokens (words, as the scripted engine
    counts them) with their marks: one on the orbital test, one on a garden bed."""
    docs = root / "two"
    docs.mkdir()
    (docs / "notes.md").write_text(
        f"# Orbital test\n\n{FACT} The test stand sits on the north pad, the countdown is run"
        " by the flight director, and the telemetry is recorded on two separate tapes for the"
        " review board after each attempt.\n"
    )
    (docs / "garden.txt").write_text(
        "Bed 3 holds the beans: they need water every four days in a dry summer, a stake each"
        " to climb, and compost twice a year. The tomatoes beside them want more sun and a"
        " little less water than the beans.\n"
    )
    return docs


def open_session(engine: FakeEngine, knowledge_tokens: int = 200) -> ChatSession:
    overrides = {"sampling": {"max_tokens": 8}, "chat": {"knowledge_tokens": knowledge_tokens}}
    settings = load_settings("cpu", overrides=overrides)  # type: ignore[arg-type]
    return ChatSession.open(settings, engine, remember=False)  # type: ignore[arg-type]


@pytest.mark.slow  # the real embedder over a folder, changed twice
def test_searches_read_the_vectors_once_then_only_what_changed(
    tmp_path: Path, fake_engine: FakeEngine, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = make_folder(tmp_path)
    session = open_session(fake_engine)
    store = session.store
    assert store is not None
    read: list[list[int]] = []  # the chunk ids each read of vectors asked for
    read_vectors = store.chunk_vectors

    def spy(embedder: str, ids: Iterable[int]) -> tuple[list[int], bytes]:
        ids = list(ids)
        read.append(ids)
        return read_vectors(embedder, ids)

    monkeypatch.setattr(store, "chunk_vectors", spy)
    try:
        session.use_folder(docs, lambda exc: None)
        everything = store.chunk_ids()
        assert read == []  # indexing reads no vectors

        (best, *_) = session.search_files("launch code of the orbital test")
        assert FACT in best.content
        assert read == [everything]
        assert "tomatoes" in session.search_files("what do the beans need", 3)[0].content
        parts = session.knowledge_parts("What is the launch code?")  # a /use message
        assert any(FACT in part.text for part in parts)
        assert read == [everything]  # neither the second search nor the message read again

        # a file changed and indexed again (as /index does): its new chunk's vector is read,
        # alone, and found by meaning alone (no word of the query is in it)
        (docs / "notes.md").write_text(f"# Notes\n\n{CAT}\n")
        index_folder(store, docs, lambda exc: None)
        embedder = session.chunk_embedder()
        assert embedder is not None
        embed_chunks(store, embedder)
        (new,) = set(store.chunk_ids()) - set(everything)
        found = session.search_files(CAT_QUERY, 3)
        assert CAT in found[0].content and found[0].path == str(docs / "notes.md")
        assert read[1:] == [[new]]
        assert not any("ZEBRA" in c.content for c in session.search_files("ZEBRA-42 launch"))

        # a file gone: its chunks are never found, and nothing is read again
        (docs / "garden.txt").unlink()
        session.knowledge_parts("anything about the garden?")  # the folder brought up to date
        assert store.chunk_ids() == [new]
        for query in ("what do the beans need", "tomatoes water compost"):
            assert [c.path for c in session.search_files(query)] == [str(docs / "notes.md")]
        assert read[2:] == []
        later = session.knowledge_parts("Where does the cat like to sleep?")
        assert [part.text for part in later] == [f"# Notes\n\n{CAT}"]
    finally:
        session.close()


@pytest.mark.slow  # the real embedder over a folder, three answers
def test_an_edit_gets_the_folder_chunks_of_its_new_text_and_a_regenerate_keeps_them(
    tmp_path: Path, fake_engine: FakeEngine, minilm_dir: Path
) -> None:
    docs = two_files(tmp_path)
    session = open_session(fake_engine, knowledge_tokens=80)  # room for one of the two
    store = session.store
    assert store is not None
    try:
        session.use_folder(docs, lambda exc: None)
        first = "How often do the beans of bed 3 need water?"
        "".join(session.send(first, attached=session.knowledge_parts(first)))
        asked = fake_engine.prompts[-1][-1]["content"]
        assert "Bed 3 holds the beans" in asked and FACT not in asked
        assert session.last_user_text() == first  # what Up offers: the text alone

        edited = "What is the launch code for the orbital test?"
        parts = session.knowledge_parts(edited)
        "".join(session.edit_last(edited, attached=parts))
        asked = fake_engine.prompts[-1][-1]["content"]
        assert asked == with_attachments(edited, parts) and FACT in asked
        assert session.last_user_text() == edited
        conversation_id = session.conversation_id
        assert conversation_id is not None
        assert session.conversation(conversation_id).title == edited  # named after the edit
        (message,) = [m for m in session.history if m.role == "user"]
        sources = store.attachments([message.id])[message.id]
        assert [str(s) for s in sources] == ["notes.md (lines 1-3)"]

        "".join(session.regenerate())  # the message as it was sent, chunks and all
        assert fake_engine.prompts[-1][-1]["content"] == asked
    finally:
        session.close()


def test_the_text_written_is_what_goes_after_the_attached_parts() -> None:
    text = "[Attached: not really] and ``` in my own words\n\nsecond paragraph"
    parts = [
        Part(Source("a.md", 1, 3, True), "plain\n\ntext"),
        Part(Source("b.py", 2, 2, False), "```\ncode\n```\n\n````"),  # a longer fence
        Part(Source("empty.txt", 1, 1, True), ""),
    ]
    for count in range(len(parts) + 1):
        assert written_text(with_attachments(text, parts[:count]), count) == text
    assert written_text(text, 1) == text  # not laid out as attachments: as it is


@pytest.mark.slow  # the real embedder over a folder, in the app
async def test_up_edits_the_text_alone_and_sends_it_with_the_folder_chunks(
    tmp_path: Path, scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    docs = two_files(tmp_path)
    app = scripted(max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        session.use_folder(docs, lambda exc: None)  # as /use DIR does, in its thread
        await ask(pilot, "How often do the beans of bed 3 need water?")
        box = app.query_one(PromptInput)
        await pilot.press("up")  # the last message, without its chunks
        assert box.editing and box.text == "How often do the beans of bed 3 need water?"
        box.load_text("What is the launch code for the orbital test?")
        before = len([n for n in notes(app) if n.startswith("sources: ")])
        await pilot.press("enter")
        await until(
            lambda: not app.chat.busy and len(fake_engine.prompts) == 2 and session.history,
            "the edit's answer",
        )
        await until(
            lambda: len([n for n in notes(app) if n.startswith("sources: ")]) > before,
            "the edit's sources",
        )
        asked = fake_engine.prompts[-1][-1]["content"]
        assert FACT in asked and asked.endswith("What is the launch code for the orbital test?")
        assert "notes.md (lines 1-3)" in [n for n in notes(app) if n.startswith("sources: ")][-1]
