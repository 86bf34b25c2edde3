"""What a message carried (its attachment rows) survives a fork and phichat's own JSON export
and import; and each command that can go on without the embedder says what it does instead.
The real store, the command run in-process, the real embedder."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from phichat.store import Source, Store, default_path

if TYPE_CHECKING:
    from conftest import CliRun

NOTES = Source("notes.md", 1, 3, True)
PLAN = Source("src/plan [draft].md", 10, 24, False)
LOG = Source("<stdin>", 5, 5, False)


def conversation_with_files() -> int:
    """A conversation whose two questions carried files: two, then one."""
    with Store.open() as store:
        chat = store.create_conversation()
        store.add_message(chat.id, "user", "What do I need?", attachments=[NOTES, PLAN])
        store.add_message(chat.id, "assistant", "Milk and eggs.")
        store.add_message(chat.id, "user", "And the log?", attachments=[LOG])
        store.add_message(chat.id, "assistant", "It says nothing.")
    return chat.id


def carried(store: Store, conversation_id: int) -> list[list[Source]]:
    """What each message of a conversation carried, in order (an empty list: nothing)."""
    ids = store.message_ids(conversation_id)
    found = store.attachments(ids)
    return [found.get(i, []) for i in ids]


def test_a_fork_keeps_what_each_message_carried() -> None:
    parent = conversation_with_files()
    with Store.open() as store:
        whole = store.fork_conversation(parent)
        first_answer = store.message_ids(parent)[1]
        early = store.fork_conversation(parent, at=first_answer)

        assert carried(store, whole.id) == [[NOTES, PLAN], [], [LOG], []]
        assert carried(store, early.id) == [[NOTES, PLAN], []]
        assert carried(store, parent) == [[NOTES, PLAN], [], [LOG], []]  # the parent's stay
        store.delete_conversation(parent)  # the fork's rows are its own
        assert carried(store, whole.id) == [[NOTES, PLAN], [], [LOG], []]


def exported(phichat_cli: CliRun, conversation_id: int) -> dict[str, Any]:
    result = phichat_cli("export", str(conversation_id), "--format", "json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_an_export_imported_elsewhere_brings_back_what_messages_carried(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = exported(phichat_cli, conversation_with_files())
    assert original["messages"][0]["attachments"][1] == {
        "path": "src/plan [draft].md",
        "lines": [10, 24],
        "whole": False,
    }
    export_file = tmp_path / "export.json"
    export_file.write_text(json.dumps(original), encoding="utf-8")
    monkeypatch.setenv("PHICHAT_HOME", str(tmp_path / "elsewhere"))  # another machine

    result = phichat_cli("import", str(export_file))

    assert result.returncode == 0, result.stderr
    with Store.open() as store:
        (conversation,) = store.conversations()
        assert carried(store, conversation.id) == [[NOTES, PLAN], [], [LOG], []]
    again = exported(phichat_cli, conversation.id)
    assert [m.get("attachments") for m in again["messages"]] == [
        m.get("attachments") for m in original["messages"]
    ]
    assert phichat_cli("import", str(export_file)).stdout.endswith(
        "0 conversations, 0 messages imported, 1 already there\n"
    )


def test_an_export_from_before_attachments_were_written_is_the_same_conversation(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    document = exported(phichat_cli, conversation_with_files())
    older = json.loads(json.dumps(document))
    for message in older["messages"]:
        message.pop("attachments", None)
    (tmp_path / "older.json").write_text(json.dumps(older), encoding="utf-8")
    (tmp_path / "newer.json").write_text(json.dumps(document), encoding="utf-8")

    first = phichat_cli("import", str(tmp_path / "older.json"))
    second = phichat_cli("import", str(tmp_path / "newer.json"))

    assert first.stdout.endswith("1 conversation, 4 messages imported\n"), first.stderr
    assert second.stdout.endswith("1 already there\n")  # the same messages and times
    with Store.open() as store:
        imported = max(c.id for c in store.conversations())
        assert carried(store, imported) == [[], [], [], []]


def attachment_rows() -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(default_path())
    try:
        return conn.execute("SELECT * FROM attachments").fetchall()
    finally:
        conn.close()


BAD_ATTACHMENTS = {
    "not a list": ({"path": "a"}, "message 1: attachments is not a list"),
    "not an object": (["a.md"], "message 1, attachment 1: not an object"),
    "no path": ([{"lines": [1, 2], "whole": True}], "attachment 1: no path"),
    "empty path": ([{"path": "", "lines": [1, 2], "whole": True}], "path is empty"),
    "lines backwards": (
        [{"path": "a", "lines": [5, 2], "whole": False}],
        "lines is not [first, last], line numbers from 1",
    ),
    "line 0": ([{"path": "a", "lines": [0, 2], "whole": False}], "lines is not [first, last]"),
    "huge line": ([{"path": "a", "lines": [1, 1 << 64], "whole": False}], "lines is not"),
    "true as a line": ([{"path": "a", "lines": [True, 2], "whole": False}], "lines is not"),
    "whole as text": ([{"path": "a", "lines": [1, 2], "whole": "yes"}], "whole is not true or"),
}


@pytest.mark.parametrize("case", BAD_ATTACHMENTS)
def test_bad_attachments_are_one_line_and_import_nothing(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path, case: str
) -> None:
    conversation_with_files()
    rows = attachment_rows()
    attachments, said = BAD_ATTACHMENTS[case]
    message = {"role": "user", "content": "hi", "created": "2024-05-01T10:00:00+02:00"}
    document = {
        "conversation": {"title": "t", "created": "2024-05-01T10:00:00+02:00"},
        "messages": [{**message, "attachments": attachments}],
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document), encoding="utf-8")

    result = phichat_cli("import", str(path))

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"phichat: error: {path}: conversation 1, message 1")
    assert said in result.stderr
    assert len(Store.open().conversations()) == 1 and attachment_rows() == rows


def chunk_vectors() -> int:
    conn = sqlite3.connect(default_path())
    try:
        count: int = conn.execute("SELECT count(*) FROM chunk_vectors").fetchone()[0]
        return count
    finally:
        conn.close()


@pytest.mark.slow
def test_an_index_without_the_embedder_says_what_it_does_and_the_next_one_embeds(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "plan.md").write_text("# Plan\n\nThe launch code is ZEBRA-42, kept by Ines.\n")
    gone = tmp_path / "missing"

    offline = phichat_cli("index", str(docs), "--embedder-dir", str(gone))

    assert offline.returncode == 0, offline.stderr
    assert offline.stderr == (
        "phichat: warning: indexing without vectors for now (found by their exact words until"
        f" an index with the embedder adds them): embedder directory {gone} does not exist\n"
    )
    assert chunk_vectors() == 0
    found = phichat_cli("search", "--files", "ZEBRA-42", "-k", "1", "--embedder-dir", str(gone))
    assert "plan.md:1-3" in found.stdout  # by its exact words
    assert found.stderr.startswith("phichat: warning: search matches exact words only: ")

    online = phichat_cli("index", str(docs))

    assert online.returncode == 0 and online.stderr == ""
    assert chunk_vectors() == 1
