"""`phichat import`: phichat's own JSON export and ChatGPT's conversations.json, written by the
tests, imported through the command (in-process) into the real history with the real embedder;
bad files are one line each and leave the history as it was."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from phichat.memory import Memory
from phichat.store import Store, default_path

if TYPE_CHECKING:
    from conftest import CliRun

T0 = 1_700_000_000.25  # a time with a fraction: exports keep whole seconds


def node(
    node_id: str,
    parent: str | None,
    role: str | None,
    text: str = "",
    at: float | None = None,
    **message: Any,
) -> dict[str, Any]:
    """One node of a ChatGPT mapping (role None: a node without a message, like the root)."""
    body = None
    if role is not None:
        body = {
            "id": node_id,
            "author": {"role": role, "name": None, "metadata": {}},
            "create_time": at,
            "content": {"content_type": "text", "parts": [text]},
            "recipient": "all",
            "metadata": {},
            **message,
        }
    return {"id": node_id, "message": body, "parent": parent, "children": []}


def chatgpt_conversation(title: str = "Flat tyre", start: float = T0) -> dict[str, Any]:
    """A ChatGPT conversation whose first answer was regenerated (two branches; the second
    shown), with what ChatGPT does not show: its hidden system message, a tool call and the
    tool's output, an image and an empty message."""
    nodes = [
        node("root", None, None),
        node(
            "sys",
            "root",
            "system",
            "",
            None,
            metadata={"is_visually_hidden_from_conversation": True},
        ),
        node("q1", "sys", "user", "How do I fix a flat bicycle tyre?", start + 1),
        node("a1-old", "q1", "assistant", "An answer that was regenerated.", start + 2),
        node("a1", "q1", "assistant", "Find the hole, patch the inner tube.", start + 3),
        node("q2", "a1", "user", "", start + 4),
        node("call", "q2", "assistant", "search('tyre levers')", start + 5, recipient="browser"),
        node("out", "call", "tool", "tyre lever results", start + 6),
        node("a2", "out", "assistant", "Use two tyre levers.", None),  # no time: the one before
        node("q3", "a2", "user", "", start + 7),
    ]
    nodes[-1]["message"]["content"] = {
        "content_type": "multimodal_text",
        "parts": [{"content_type": "image_asset_pointer", "asset_pointer": "file-1"}, "Like this?"],
    }
    mapping = {n["id"]: n for n in nodes}
    for n in nodes:
        if n["parent"]:
            mapping[n["parent"]]["children"].append(n["id"])
    return {
        "id": "c0ffee",
        "title": title,
        "create_time": start,
        "update_time": start + 7,
        "mapping": mapping,
        "current_node": "q3",
    }


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def history_rows() -> dict[str, list[tuple[Any, ...]]]:
    """Everything the history holds, table by table."""
    conn = sqlite3.connect(default_path())
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in ("conversations", "messages", "vectors", "conversation_sources")
        }
    finally:
        conn.close()


def exported(phichat_cli: CliRun, conversation_id: int) -> dict[str, Any]:
    result = phichat_cli("export", str(conversation_id), "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def shown(document: dict[str, Any]) -> tuple[Any, ...]:
    """What an import keeps of an exported conversation."""
    conversation = document["conversation"]
    messages = [
        (m["role"], m["content"], m["created"], m["replaced"]) for m in document["messages"]
    ]
    return conversation["title"], conversation["created"], conversation["updated"], messages


def stored_conversation() -> int:
    """A conversation as the app leaves it: a regenerated answer, kept and marked replaced."""
    with Store.open() as store:
        chat = store.create_conversation(title="Sourdough")
        store.add_message(chat.id, "user", "How long should sourdough proof?")
        old = store.add_message(chat.id, "assistant", "About an hour.")
        store.add_message(chat.id, "assistant", "Four to six hours at 24 °C.", replaces=[old.id])
        store.add_message(chat.id, "user", "And in the fridge? ☃")
    return chat.id


def test_a_phichat_export_round_trips_through_import(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = exported(phichat_cli, stored_conversation())
    export_file = write_json(tmp_path / "sourdough.json", original)
    monkeypatch.setenv("PHICHAT_HOME", str(tmp_path / "elsewhere"))  # another machine

    result = phichat_cli("import", str(export_file))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{export_file}: 1 conversation, 4 messages imported\n"
    assert result.stderr == ""  # no progress bar where stderr is no terminal
    (conversation,) = Store.open().conversations()
    assert shown(exported(phichat_cli, conversation.id)) == shown(original)
    rows = history_rows()
    assert len(rows["vectors"]) == len(rows["messages"]) == 4  # embedded as it was imported


@pytest.mark.slow
def test_a_list_of_exports_is_one_file(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    first = exported(phichat_cli, stored_conversation())
    with Store.open() as store:
        chat = store.create_conversation()
        store.add_message(chat.id, "user", "A second conversation")
    both = write_json(tmp_path / "both.json", [first, exported(phichat_cli, chat.id)])

    result = phichat_cli("import", str(both))

    assert result.stdout == f"{both}: 2 conversations, 5 messages imported\n"
    titles = [c.title for c in Store.open().conversations()]
    assert sorted(titles) == ["A second conversation"] * 2 + ["Sourdough"] * 2


def test_chatgpt_export_keeps_the_branch_shown(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    path = write_json(tmp_path / "conversations.json", [chatgpt_conversation()])

    result = phichat_cli("import", str(path))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: 1 conversation, 4 messages imported\n"
    with Store.open() as store:
        (conversation,) = store.conversations()
        messages = store.messages(conversation.id)
    assert conversation.title == "Flat tyre"
    assert conversation.created == T0 and conversation.updated == T0 + 7
    assert [(m.role, m.content, m.created) for m in messages] == [
        ("user", "How do I fix a flat bicycle tyre?", T0 + 1),
        ("assistant", "Find the hole, patch the inner tube.", T0 + 3),
        ("assistant", "Use two tyre levers.", T0 + 6),
        ("user", "Like this?", T0 + 7),
    ]
    with Store.open() as store:
        hits = Memory.open(store, None).search("inner tube")
    assert hits[0].message.id == messages[1].id  # and found by its words


def test_importing_again_adds_nothing(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    path = write_json(tmp_path / "conversations.json", [chatgpt_conversation()])
    assert phichat_cli("import", str(path)).returncode == 0
    before = history_rows()

    again = phichat_cli("import", str(path))
    conversation_id = before["conversations"][0][0]
    round_trip = write_json(tmp_path / "again.json", exported(phichat_cli, conversation_id))
    exported_again = phichat_cli("import", str(round_trip))

    assert again.stdout == f"{path}: 0 conversations, 0 messages imported, 1 already there\n"
    assert exported_again.stdout.endswith("0 messages imported, 1 already there\n")
    assert history_rows() == before


@pytest.mark.slow
def test_a_conversation_deleted_can_be_imported_again(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    path = write_json(tmp_path / "conversations.json", [chatgpt_conversation()])
    phichat_cli("import", str(path))
    with Store.open() as store:
        store.delete_conversation(store.conversations()[0].id)

    assert phichat_cli("import", str(path)).stdout.endswith("1 conversation, 4 messages imported\n")


def test_without_the_embedder_messages_are_imported_and_embedded_later(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    path = write_json(tmp_path / "conversations.json", [chatgpt_conversation()])

    result = phichat_cli("import", str(path), "--embedder-dir", str(tmp_path / "missing"))

    assert result.returncode == 0
    assert result.stdout.endswith("1 conversation, 4 messages imported\n")
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        "phichat: warning: importing without vectors for now (the app as it starts, or"
        " `phichat search`, adds them): embedder directory"
    )
    assert history_rows()["vectors"] == []
    search = phichat_cli("search", "patch the inner tube", "-k", "1", "--json")
    assert json.loads(search.stdout)["similarity"] > 0.5
    assert len(history_rows()["vectors"]) == 4  # embedded by the search that needed them


@pytest.mark.slow
def test_import_while_the_history_is_open_elsewhere(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    from phichat.config import EmbedderSettings
    from phichat.embed import Embedder

    path = write_json(tmp_path / "conversations.json", [chatgpt_conversation()])
    with Store.open() as app_store:  # the app holds the history open and searches it
        app_store.add_message(app_store.create_conversation().id, "user", "hello there")
        memory = Memory.open(app_store, Embedder.load(EmbedderSettings()))
        memory.backfill()
        assert phichat_cli("import", str(path)).returncode == 0
        assert len(app_store.conversations()) == 2
        assert memory.refresh() == 4  # the imported vectors, as the app loads them
        assert memory.search("levers")[0].message.content == "Use two tyre levers."


@pytest.mark.slow
def test_files_are_imported_one_by_one(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path
) -> None:
    good = write_json(tmp_path / "good.json", [chatgpt_conversation()])
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    other = write_json(tmp_path / "other.json", chatgpt_conversation("Brakes", T0 + 100))

    result = phichat_cli("import", str(good), str(bad), str(other))

    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"{good}: 1 conversation, 4 messages imported",
        f"{other}: 1 conversation, 4 messages imported",
    ]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"phichat: error: {bad}: not JSON (line 1 column 3: ")


# --- bad input: one line, the right exit code, the history unchanged --------------------------


def phichat_file(**message: Any) -> list[dict[str, Any]]:
    """A list of two phichat exports; the second's second message is changed by `message`."""
    messages = [
        {"role": "user", "content": "first", "created": "2024-05-01T10:00:00+02:00"},
        {"role": "assistant", "content": "second", "created": "2024-05-01T10:00:05+02:00"},
    ]
    conversation = {"title": "t", "created": "2024-05-01T10:00:00+02:00"}
    second = [messages[0], {k: v for k, v in {**messages[1], **message}.items() if v is not None}]
    return [
        {"conversation": conversation, "messages": messages},
        {"conversation": conversation, "messages": second},
    ]


def chatgpt_file(change: str) -> list[dict[str, Any]]:
    """A good ChatGPT conversation, then one with a flaw."""
    conversation = chatgpt_conversation()
    if change == "no time":
        del conversation["create_time"]
    elif change == "loop":
        conversation["mapping"]["root"]["parent"] = "q3"
    else:
        conversation["mapping"]["a1"]["message"]["author"]["role"] = change
    return [chatgpt_conversation("Fine"), conversation]


BAD_DOCUMENTS = {
    "malformed": ('[{"title": "x",', 2, "not JSON (line 1 column 16: "),
    "a number": ("42", 2, "not a phichat or ChatGPT export"),
    "other json": ('[{"name": "x"}]', 2, "conversation 1: neither a phichat export nor a ChatGPT"),
    "unknown role": (
        phichat_file(role="tool"),
        2,
        "conversation 2, message 2: unknown role 'tool'",
    ),
    "no time": (phichat_file(created=None), 2, "conversation 2, message 2: no created"),
    "bad time": (phichat_file(created="yesterday"), 2, "created 'yesterday' is not an ISO 8601"),
    "no chatgpt time": (chatgpt_file("no time"), 2, "conversation 2: no create_time"),
    "chatgpt role": (chatgpt_file("critic"), 2, "conversation 2, message 'a1': unknown role"),
    "loop": (chatgpt_file("loop"), 2, "conversation 2: its messages form a loop"),
    "deep": ("[" * 100_000 + "]" * 100_000, 2, "not JSON this program can read"),
    "content type": (phichat_file(content=7), 2, "conversation 2, message 2: content is not text"),
    "huge message": (
        phichat_file(content="x" * (1 << 20) + "y"),
        2,
        "content is longer than 1 MiB",
    ),
    "surrogate": (phichat_file(content="\ud800"), 2, "content is not valid Unicode text"),
}


def write_bad(tmp_path: Path, case: str) -> tuple[Path, int, str]:
    path = tmp_path / f"{case.replace(' ', '-')}.json"
    if case == "not utf-8":
        path.write_bytes(b'[{"title": "caf\xe9"}]')
        return path, 2, "not valid UTF-8 (byte 15)"
    if case == "1 GB":
        with path.open("wb") as f:
            f.truncate(1 << 30)  # sparse: nothing is written, and nothing may be read
        return path, 2, "larger than 256 MiB, too big"
    if case == "missing":
        return path, 1, "cannot read it: No such file or directory"
    if case == "directory":
        path.mkdir()
        return path, 1, "is a directory, not an export file"
    document, code, said = BAD_DOCUMENTS[case]
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path, code, said


@pytest.mark.parametrize("case", [*BAD_DOCUMENTS, "not utf-8", "1 GB", "missing", "directory"])
def test_a_bad_file_is_one_line_and_imports_nothing(
    minilm_dir: Path, phichat_cli: CliRun, tmp_path: Path, case: str
) -> None:
    stored_conversation()
    before = history_rows()
    path, code, said = write_bad(tmp_path, case)

    result = phichat_cli("import", str(path))

    assert result.returncode == code
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"phichat: error: {path}: ")
    assert said in result.stderr
    assert history_rows() == before
