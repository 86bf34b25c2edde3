"""A message and what it carried are saved together or not at all, and chunk ids are bound in
`IN (...)` lists one way (the store's helper), however many files a search is limited to. Real
SQLite; the session runs on the scripted fake engine."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phichat import store as store_module
from phichat.config import load_settings
from phichat.errors import PhichatError
from phichat.files import Part
from phichat.session import ChatSession
from phichat.store import Source, Store, default_path

if TYPE_CHECKING:
    from fake_engine import FakeEngine

NOTES = Source("notes.md", 1, 3, True)
PLAN = Source("plan.md", 10, 24, False)


def fail_attachment_rows(path: Path) -> None:
    """From now on, writing an attachment row fails (as a full disk would, mid-transaction)."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER no_attachments BEFORE INSERT ON attachments"
            " BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    conn.close()


def message_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        count: int = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    return count


def test_a_message_and_its_attachments_are_saved_in_one_call(tmp_path: Path) -> None:
    with Store.open(tmp_path / "h.db") as store:
        chat = store.create_conversation()
        text = "[Attached: notes.md]\n```\nmilk, eggs\n```\n\nWhat do I need?"
        asked = store.add_message(
            chat.id, "user", text, attachments=[NOTES, PLAN], title="What do I need?"
        )
        answer = store.add_message(chat.id, "assistant", "Milk and eggs.")
        assert store.attachments([asked.id, answer.id]) == {asked.id: [NOTES, PLAN]}
        assert store.conversation(chat.id).title == "What do I need?"  # the typed words


def test_a_failure_writing_attachments_leaves_no_message_without_them(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with Store.open(path) as store:
        chat = store.create_conversation()
        fail_attachment_rows(path)
        with pytest.raises(PhichatError, match="an attachment could not be saved"):
            store.add_message(chat.id, "user", "with a file", attachments=[NOTES])
        assert message_count(path) == 0
        assert store.conversation(chat.id).title == ""  # the title went with the message
        plain = store.add_message(chat.id, "user", "no file this time")  # the store goes on
        assert [m.id for m in store.messages(chat.id)] == [plain.id]


def test_a_message_that_cannot_be_saved_leaves_no_attachment_rows(tmp_path: Path) -> None:
    with Store.open(tmp_path / "h.db") as store:
        with pytest.raises(PhichatError, match="no conversation 7"):
            store.add_message(7, "user", "orphan", attachments=[NOTES])
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("SELECT count(*) FROM attachments").fetchone() == (0,)
        conn.close()


def test_the_session_saves_what_was_attached_with_the_question(
    fake_engine: FakeEngine,
) -> None:
    settings = load_settings("cpu", None, {})
    session = ChatSession.open(settings, fake_engine, remember=False)
    try:
        parts = [Part(NOTES, "milk, eggs\n"), Part(PLAN, "buy them on Monday\n")]
        answer = "".join(session.send("What do I need?", attached=parts))
        assert answer
        assert session.store is not None and session.conversation_id is not None
        question, reply = session.messages(session.conversation_id)
        assert session.store.attachments([question.id, reply.id]) == {question.id: [NOTES, PLAN]}
        assert session.store.conversation(session.conversation_id).title == "What do I need?"

        fail_attachment_rows(default_path())
        with pytest.raises(PhichatError, match="an attachment could not be saved"):
            "".join(session.send("And after that?", attached=parts))
        assert [m.content for m in session.messages(session.conversation_id)] == [
            question.content,
            reply.content,
        ]
    finally:
        session.close()


def test_chunk_search_within_more_files_than_one_in_list_binds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "IN_CHUNK", 2)  # 5 files: three IN (...) lists
    with Store.open(tmp_path / "h.db") as store:
        ids = [
            store.save_file(
                f"/notes/{n}.md",
                "",
                1,
                1,
                f"{n:064x}",
                [(1, 1, "the heron waits " * (1 + n % 3)), (2, 2, "nothing here")],
            )
            for n in range(5)
        ]
        everywhere = store.chunk_keyword_search("heron", 10, ids)
        found = store.chunks_by_id(chunk for chunk, _ in everywhere)
        assert sorted(found[c].path for c, _ in everywhere) == [f"/notes/{n}.md" for n in range(5)]
        scores = [score for _, score in everywhere]
        assert scores == sorted(scores, reverse=True)  # best first across the lists
        assert store.chunk_keyword_search("heron", 2, ids) == everywhere[:2]
        assert len(store.chunks_without_vectors(None, 100, ids)) == 10
        assert store.chunks_without_vectors(None, 3, ids[3:]) == [
            (chunk, text) for chunk, text in store.chunks_without_vectors(None, 100, ids)[6:9]
        ]
