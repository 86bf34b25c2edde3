"""A folder as a conversation's knowledge (`/use DIR`, `--prompt --use DIR`): kept with the
conversation in the history database (schema 11), indexed when set and brought up to date
before each message, its best chunks going with each message within `[chat]
knowledge_tokens`. Real SQLite, the real MiniLM embedder, the scripted engine for answers
(the tiny wired Phi-3 on the command line)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import garden

from phichat.config import load_settings
from phichat.errors import PhichatError, UsageError
from phichat.export import export_conversation
from phichat.files import Part, attach_text
from phichat.session import ChatSession
from phichat.store import MIGRATIONS, Source, Store

if TYPE_CHECKING:
    from conftest import CliRun
    from fake_engine import FakeEngine

FACT = "The launch code for the orbital test is ZEBRA-42, kept by Ines."


def make_folder(root: Path) -> Path:
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "notes.md").write_text(f"# Notes\n\n{FACT}\n")
    (docs / "sub" / "garden.txt").write_text(garden(40) + "\n")
    (docs / "broken").symlink_to(root / "nowhere")
    return docs


def open_session(engine: FakeEngine, **overrides: dict[str, object]) -> ChatSession:
    settings = load_settings("cpu", overrides={"sampling": {"max_tokens": 8}, **overrides})
    return ChatSession.open(settings, engine, remember=False)  # type: ignore[arg-type]


@pytest.mark.slow  # the real embedder over a folder, several messages
def test_a_folder_is_the_conversations_knowledge_and_brings_its_best_chunks(
    tmp_path: Path, fake_engine: FakeEngine, minilm_dir: Path
) -> None:
    docs = make_folder(tmp_path)
    session = open_session(fake_engine, chat={"knowledge_tokens": 200})
    said: list[str] = []
    try:
        report = session.use_folder(docs, lambda exc: said.append(str(exc)))
        assert report is not None and report.indexed == 2
        assert said == [f"{docs / 'broken'}: is a broken symlink"]
        assert session.knowledge == str(docs)

        question = "What is the launch code for the orbital test?"
        parts = session.knowledge_parts(question)
        assert [str(p.source) for p in parts if FACT in p.text] == ["notes.md (lines 1-3)"]
        assert session.count_tokens(attach_text(parts)) <= 200 + 2 * len(parts)
        room = session.attachment_budget(question)  # files attached too: they share the room
        for left, fits in ((60, ["notes.md (lines 1-3)"]), (10, [])):  # notes.md: 24 tokens
            big = Part(Source("big.txt", 1, 1, True), "word " * (room - left))
            assert [str(p.source) for p in session.knowledge_parts(question, [big])] == fits
        "".join(session.send(question, attached=parts))
        assert session.take_notices() == []  # the broken symlink was said once, when set
        conversation_id = session.conversation_id
        assert conversation_id is not None and session.store is not None
        conversation = session.conversation(conversation_id)
        assert (conversation.knowledge, conversation.title) == (str(docs), question)
        (message,) = [m for m in session.messages(conversation_id) if m.role == "user"]
        assert message.content.startswith("[Attached: ") and FACT in message.content
        sources = session.store.attachments([message.id])[message.id]
        assert "notes.md" in [s.path for s in sources]
        exported = json.loads(export_conversation(session.store, conversation_id, "json"))
        assert exported["conversation"]["knowledge"] == str(docs)
        assert exported["messages"][0]["attachments"][0]["path"] in ("notes.md", "sub/garden.txt")
        assert f"knowledge {docs}" in session.export(conversation_id)

        # a file changed since: read again before the next message (its size and mtime)
        (docs / "notes.md").write_text("# Notes\n\nThe launch code changed to OKAPI-7.\n")
        later = session.knowledge_parts("What did the launch code change to?")
        assert any("OKAPI-7" in p.text for p in later)
        assert not any("ZEBRA-42" in p.text for p in later)

        session.new_conversation()  # a new chat goes on with the folder, as with a role
        assert session.knowledge == str(docs)
        session.use_folder(None, lambda exc: None)
        assert session.knowledge is None and session.knowledge_parts(question) == []
        session.switch(conversation_id)  # the folder comes back with its conversation
        assert session.knowledge == str(docs)
        session.use_folder(None, lambda exc: None)
        assert session.conversation(conversation_id).knowledge is None

        with pytest.raises(UsageError, match="no such folder"):
            session.use_folder(tmp_path / "nowhere", lambda exc: None)
        with pytest.raises(UsageError, match="is not a folder"):
            session.use_folder(docs / "notes.md", lambda exc: None)
    finally:
        session.close()


def test_without_the_embedder_words_find_the_chunks_and_a_folder_gone_is_one_notice(
    tmp_path: Path, fake_engine: FakeEngine
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text(f"# Notes\n\n{FACT}\n")
    session = open_session(fake_engine, embedder={"path": str(tmp_path / "no-model")})
    try:
        session.use_folder(docs, lambda exc: None)
        (notice,) = session.take_notices()
        assert notice.startswith("files are searched by their exact words only: ")
        (part,) = session.knowledge_parts("ZEBRA-42?")
        assert (str(part.source), part.text) == ("notes.md (lines 1-3)", f"# Notes\n\n{FACT}")
        (docs / "notes.md").unlink()
        docs.rmdir()
        assert session.knowledge_parts("the launch code?") == []
        assert session.take_notices() == [
            f"{docs}: no such folder: the message goes without the folder's chunks"
        ]
        assert session.knowledge_parts("the launch code?") == []
        assert session.take_notices() == []  # said once
        assert "".join(session.send("the launch code?"))  # answered all the same
    finally:
        session.close()


def test_knowledge_is_kept_by_a_fork_and_read_as_none_from_an_older_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "history.db"
    with Store.open(path) as store:
        conversation = store.create_conversation(title="notes", knowledge="/srv/notes")
        assert store.conversation(conversation.id).knowledge == "/srv/notes"
        store.add_message(conversation.id, "user", "hello")
        fork = store.fork_conversation(conversation.id)
        assert fork.knowledge == "/srv/notes"
        store.set_knowledge(conversation.id, None)
        assert store.conversation(conversation.id).knowledge is None
        with pytest.raises(PhichatError, match="no conversation 99"):
            store.set_knowledge(99, "/x")

    older = tmp_path / "older.db"
    conn = sqlite3.connect(older, isolation_level=None)
    for step in MIGRATIONS[:10]:  # as the phichat before knowledge folders wrote it
        for statement in step:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 10")
    conn.execute("INSERT INTO conversations (title, created, role) VALUES ('before', 0, 'coder')")
    conn.close()
    with monkeypatch.context() as patched:
        patched.setattr("phichat.store.os.access", lambda *args: False)  # cannot be written
        with Store.open(older) as store:
            assert store.read_only
            (listed,) = store.conversations()
            assert (listed.title, listed.role, listed.knowledge) == ("before", "coder", None)
    with Store.open(older) as store:  # written: upgraded to schema 11 in place
        (listed,) = store.conversations()
        store.set_knowledge(listed.id, "/srv/notes")
        assert store.conversation(listed.id).knowledge == "/srv/notes"


def test_use_is_refused_in_one_line_before_any_model(tmp_path: Path, phichat_cli: CliRun) -> None:
    docs = make_folder(tmp_path)
    for args, said in [
        (("--prompt", "hi", "--use", str(tmp_path / "nowhere")), "nowhere: no such folder"),
        (("--prompt", "hi", "--use", str(docs / "notes.md")), "notes.md: is not a folder"),
        (("--prompt", "hi", "--use", str(docs), "--no-history"), "not with --no-history"),
        (("--use", str(docs)), "--use goes with --prompt (in the app: /use DIR)"),
        (("--continue", "1", "--more", "--use", str(docs)), "--more and --use do not go"),
    ]:
        result = phichat_cli(*args)
        assert result.returncode == 2, result
        assert result.stderr.startswith("phichat: error: ") and said in result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


@pytest.mark.slow  # the model answers, twice
def test_prompt_use_and_continue_bring_the_folders_chunks(
    tmp_path: Path, tiny_phi3_path: Path, minilm_dir: Path, phichat_cli: CliRun
) -> None:
    docs = make_folder(tmp_path)
    first = phichat_cli("--prompt", "What is the launch code?", "--use", str(docs), "--stats")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "Hello world\n"
    err = first.stderr.splitlines()
    assert err[0] == f"phichat: warning: {docs / 'broken'}: is a broken symlink"
    assert err[1].startswith("sources: ") and "notes.md (lines 1-3)" in err[1]
    conversation_id = phichat_cli("history").stdout.split()[0]
    exported = json.loads(phichat_cli("export", conversation_id, "--format", "json").stdout)
    assert exported["conversation"]["knowledge"] == str(docs)
    assert FACT in exported["messages"][0]["content"]

    (docs / "sub" / "garden.txt").write_text("Bed 1 wants water every OKAPI days.\n")
    later = phichat_cli("--continue", conversation_id, "--prompt", "And the garden?", "--stats")
    assert later.returncode == 0, later.stderr
    sources = later.stderr.splitlines()[0]  # the broken symlink: said again in a new process
    assert sources.startswith("phichat: warning: ")
    exported = json.loads(phichat_cli("export", conversation_id, "--format", "json").stdout)
    assert "OKAPI" in exported["messages"][2]["content"]  # garden.txt read again


def test_indexing_stops_between_files_and_the_next_run_does_the_rest(tmp_path: Path) -> None:
    import threading

    from phichat.files import index_folder

    docs = tmp_path / "docs"
    docs.mkdir()
    for n in range(5):
        (docs / f"{n}.txt").write_text(f"file {n}\n")
    stop = threading.Event()
    done: list[str] = []

    class StopAfterTwo(Store):
        def save_file(self, path: str, *args: object) -> int:  # type: ignore[override]
            done.append(path)
            if len(done) == 2:
                stop.set()
            return super().save_file(path, *args)  # type: ignore[arg-type]

    with StopAfterTwo.open(tmp_path / "history.db") as store:
        first = index_folder(store, docs, lambda exc: None, stop)
        assert (first.indexed, first.stopped) == (2, True)
        assert "stopped before the end" in str(first)
        assert len(store.indexed_files(str(docs))) == 2  # whole files only, none dropped
        rest = index_folder(store, docs, lambda exc: None)
        assert (rest.indexed, rest.unchanged, rest.stopped) == (3, 2, False)


def test_use_and_index_in_the_app_run_in_a_thread_and_say_what_they_did(
    tmp_path: Path, fake_engine: FakeEngine
) -> None:
    from helpers import wait_until

    from phichat.tui.folders import FolderJobs, folder_command

    assert folder_command("/use") == ("/use", "")
    assert folder_command("  /use  'my notes' ") == ("/use", "my notes")
    assert folder_command("/use my notes") == ("/use", "my notes")
    assert folder_command("/index ~/src") == ("/index", "~/src")
    assert folder_command("/user manual") is None and folder_command("use it") is None

    docs = make_folder(tmp_path)
    session = open_session(fake_engine, embedder={"path": str(tmp_path / "no-model")})
    said: list[tuple[str, bool]] = []
    shown: list[str | None] = []
    jobs = FolderJobs(lambda text, warning: said.append((text, warning)), shown.append)
    try:
        jobs.run(session, "/use", "")
        assert said.pop() == (
            "this conversation has no knowledge folder: /use DIR gives it one",
            False,
        )
        jobs.run(session, "/use", str(docs))
        wait_until(lambda: any("knowledge now" in text for text, _ in said), "/use done")
        assert (f"{docs / 'broken'}: is a broken symlink", True) in said
        assert said[-1] == (
            f"{docs}: 2 files indexed (6 chunks), 1 skipped (said above); this conversation's"
            " knowledge now: its parts most relevant to each message go with it",
            False,
        )
        assert shown[0] == f"indexing {docs}…" and shown[-1] is None
        jobs.run(session, "/use", "")
        assert said[-1] == (f"this conversation's knowledge: {docs} (/use off lets it go)", False)
        jobs.run(session, "/use", "off")
        wait_until(lambda: session.knowledge is None, "/use off")

        other = tmp_path / "other"
        other.mkdir()
        (other / "a.md").write_text("# A\n\nalpha\n")
        jobs.run(session, "/index", str(other))
        wait_until(lambda: said[-1][0].startswith(f"{other}: "), "/index done")
        assert said[-1] == (f"{other}: 1 file indexed (1 chunks)", False)
        jobs.run(session, "/index", str(tmp_path / "nowhere"))
        wait_until(lambda: said[-1][1], "/index refused")
        assert said[-1] == (f"{tmp_path / 'nowhere'}: no such folder", True)
    finally:
        jobs.stop()
        session.close()
