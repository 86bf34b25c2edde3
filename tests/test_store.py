"""The history database: real SQLite files in temporary dirs, real processes for crashes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from phichat.config import StoreSettings
from phichat.errors import PhichatError
from phichat.store import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    Store,
    default_path,
    fts_query,
    store_path,
)

WRITER = """
import sys
from pathlib import Path
from phichat.store import Store

path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
go = Path(path + ".go")
store = Store.open(path)
conversation = store.create_conversation(title=name)
print(conversation.id, flush=True)
while not go.exists():
    pass
i = 0
while count < 0 or i < count:
    message = store.add_message(conversation.id, "user", f"{name} {i} " + "x" * 300)
    store.add_vectors("test-embedder", [(message.id, bytes(1536))])
    print(message.id, i, flush=True)
    i += 1
"""


def spawn_writer(path: Path, name: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), name, str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )


def found(results: list[tuple[int, float]]) -> list[int]:
    return [message_id for message_id, _ in results]


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "history.db") as opened:
        yield opened


def test_default_path_is_in_the_xdg_data_dir(isolated_dirs: Path) -> None:
    assert default_path() == isolated_dirs / "data" / "phichat" / "history.db"
    assert store_path(StoreSettings()) == default_path()
    assert store_path(StoreSettings(path="~/h.db")) == Path.home() / "h.db"
    with Store.open() as opened:
        assert opened.path == default_path()
    assert default_path().is_file()


def test_messages_round_trip_with_their_stats(store: Store) -> None:
    chat = store.create_conversation(model="phi-3", device="cpu")
    user = store.add_message(chat.id, "user", "  What is\nthe  capital of France?", tokens=9)
    answer = store.add_message(
        chat.id,
        "assistant",
        "Paris",
        tokens=2,
        sampling={"temperature": 0.7, "seed": 42},
        tokens_per_s=21.5,
        status="stopped",
    )
    assert store.messages(chat.id) == [user, answer]
    assert store.messages_by_id([answer.id, 999]) == {answer.id: answer}
    assert store.message_ids(chat.id) == [user.id, answer.id]
    (listed,) = store.conversations()
    assert listed.title == "What is the capital of France?"  # from the first user message
    assert (listed.model, listed.device, listed.kind, listed.message_count) == (
        "phi-3",
        "cpu",
        "chat",
        2,
    )
    assert listed.updated == answer.created
    store.set_title(chat.id, "France")
    assert store.conversation(chat.id).title == "France"


def test_conversations_list_most_recent_first(store: Store) -> None:
    first = store.create_conversation(title="first")
    second = store.create_conversation(title="second", kind="prompt")
    store.add_message(first.id, "user", "back to the first one")
    assert [c.title for c in store.conversations()] == ["first", "second"]
    assert store.conversation(second.id).kind == "prompt"
    assert [c.id for c in store.conversations(limit=1)] == [first.id]


def test_unknown_conversation_is_a_clear_error(store: Store) -> None:
    with pytest.raises(PhichatError, match="no conversation 7"):
        store.conversation(7)
    with pytest.raises(PhichatError, match="no conversation 7"):
        store.add_message(7, "user", "hello")


def test_each_thread_writes_through_its_own_connection(store: Store) -> None:
    chat = store.create_conversation()
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            for i in range(50):
                store.add_message(chat.id, "user", f"{name} {i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f"t{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(store.messages(chat.id)) == 150


def test_messages_survive_sigkill_mid_write_loop(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    writer = spawn_writer(path, "crash", -1)
    assert writer.stdout is not None
    conversation_id = int(writer.stdout.readline())
    (tmp_path / "history.db.go").touch()
    committed: dict[int, int] = {}
    for line in writer.stdout:
        message_id, i = map(int, line.split())
        committed[message_id] = i
        if len(committed) == 300:
            os.kill(writer.pid, signal.SIGKILL)
            break
    for line in writer.stdout:  # lines printed (so committed) before the kill landed
        message_id, i = map(int, line.split())
        committed[message_id] = i
    writer.wait()
    assert writer.returncode == -signal.SIGKILL

    assert integrity(path) == "ok"
    with Store.open(path) as store:
        stored = {m.id: m.content for m in store.messages(conversation_id)}
        assert set(committed) <= set(stored)
        for message_id, i in committed.items():
            assert stored[message_id] == f"crash {i} " + "x" * 300
        assert len(store.missing_vectors("test-embedder")) <= 1  # at most the last, mid-way
    assert integrity(path) == "ok"


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    Store.open(path).close()
    writers = {name: spawn_writer(path, name, 200) for name in ("alpha", "beta")}
    conversations = {name: int(w.stdout.readline()) for name, w in writers.items()}  # type: ignore[union-attr]
    (tmp_path / "history.db.go").touch()
    for writer in writers.values():
        writer.communicate(timeout=120)
        assert writer.returncode == 0

    assert integrity(path) == "ok"
    with Store.open(path) as store:
        for name, conversation_id in conversations.items():
            contents = [m.content for m in store.messages(conversation_id)]
            assert contents == [f"{name} {i} " + "x" * 300 for i in range(200)]
        assert store.vector_count("test-embedder") == 400


def test_random_bytes_are_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "data" / "history.db"
    path.parent.mkdir()
    junk = os.urandom(8192)
    path.write_bytes(junk)
    with pytest.raises(PhichatError, match="not an SQLite file") as caught:
        Store.open(path)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == junk
    assert [p.name for p in path.parent.iterdir()] == ["history.db"]  # no -wal, no -shm


def test_another_programs_sqlite_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE songs (title TEXT)")
    conn.execute("INSERT INTO songs VALUES ('Blue Monday')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(PhichatError, match="another program's SQLite file") as caught:
        Store.open(path)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == before


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(PhichatError, match="newer phichat"):
        Store.open(path)


def test_a_damaged_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with Store.open(path) as store:
        chat = store.create_conversation()
        for i in range(200):
            store.add_message(chat.id, "user", f"message {i} " + "y" * 500)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    data[4096 * 3 :] = os.urandom(len(data) - 4096 * 3)  # keep the header and schema pages
    path.write_bytes(bytes(data))
    with pytest.raises(PhichatError, match="history database"), Store.open(path) as store:
        store.messages(chat.id)


def test_an_old_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO conversations (id, title, created) VALUES (1, 'old', 0)")
    conn.execute(
        "INSERT INTO messages (conversation, role, content, created)"
        " VALUES (1, 'user', 'the build died with ERR_4711', 0)"
    )
    conn.close()

    with Store.open(path) as store:
        assert found(store.keyword_search("ERR_4711")) == [1]  # indexed by the migration
        added = store.add_message(1, "user", "and again ERR_4711")
        assert sorted(found(store.keyword_search("ERR_4711"))) == [1, added.id]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    conn.close()


@pytest.mark.parametrize(
    ("text", "finds"),
    [
        ('foo-bar "x', True),
        ('"', False),
        ("AND OR NOT", False),  # words, not operators: "or" and "not" are not in the message
        ("AND col:umn", True),
        ("NEAR(a b)", True),
        ("col:umn", True),
        ("^start *", False),
        ("'; DROP", False),
        ("", False),
    ],
)
def test_any_user_text_is_a_safe_keyword_query(store: Store, text: str, finds: bool) -> None:
    chat = store.create_conversation()
    message = store.add_message(chat.id, "user", 'foo-bar "x" AND col:umn NEAR(a b)')
    assert found(store.keyword_search(text)) == ([message.id] if finds else [])


def test_fts_query_quotes_every_word() -> None:
    assert fts_query('foo-bar "x') == '"foo-bar" """x"'
    assert fts_query("  - ; ") == ""


def test_words_in_too_many_messages_are_not_ranked(store: Store) -> None:
    chat = store.create_conversation()
    ids = [store.add_message(chat.id, "user", f"common word {i}").id for i in range(10)]
    rare = store.add_message(chat.id, "user", "common word Zanzibar")
    assert len(store.keyword_search("common word", max_docs=20)) == 11
    assert store.keyword_search("common word", max_docs=5) == []
    assert found(store.keyword_search("common Zanzibar", max_docs=5)) == [rare.id]
    assert found(store.keyword_search("word 3", max_docs=5)) == [ids[3]]


def test_keyword_search_finds_a_rare_token_first(store: Store) -> None:
    chat = store.create_conversation()
    other = store.create_conversation()
    for i in range(30):
        store.add_message(chat.id, "user", f"the build failed again, attempt {i}")
    target = store.add_message(chat.id, "assistant", "linker stopped with ERR_4711 in main.o")
    store.add_message(other.id, "user", "ERR_4711 showed up here too")
    assert found(store.keyword_search("ERR_4711", conversation_id=chat.id)) == [target.id]
    assert sorted(found(store.keyword_search("err_4711"))) == [target.id, target.id + 1]
    assert found(store.keyword_search("main.o")) == [target.id]
    assert found(store.keyword_search("build ERR_4711")) == []  # every word must match


def test_missing_vectors_and_vector_chunks(store: Store) -> None:
    chat = store.create_conversation()
    ids = [store.add_message(chat.id, "user", f"m{i}").id for i in range(5)]
    store.add_vectors("e1", [(ids[1], b"\x01" * 8), (ids[3], b"\x03" * 8)])
    store.add_vectors("e2", [(ids[3], b"\x09" * 8)])
    assert [m.id for m in store.missing_vectors("e1")] == [ids[0], ids[2], ids[4]]
    assert [m.id for m in store.missing_vectors("e1", limit=1)] == [ids[0]]
    assert store.vector_count("e1") == 2
    chunks = list(store.vector_chunks("e1", chunk=1))
    assert [(c[1], c[2]) for c in chunks] == [([ids[1]], b"\x01" * 8), ([ids[3]], b"\x03" * 8)]
    assert list(store.vector_chunks("e1", after=chunks[0][0])) == [chunks[1]]


def test_bulk_import_with_vectors(store: Store) -> None:
    chat = store.create_conversation()
    first = store.add_message(chat.id, "user", "before")
    ids = store.add_messages(
        chat.id, [("user", "a"), ("assistant", "b")], "e", [b"\x00" * 4, b"\x01" * 4]
    )
    assert ids == [first.id + 1, first.id + 2]
    assert [m.content for m in store.messages(chat.id)] == ["before", "a", "b"]
    assert [m.id for m in store.missing_vectors("e")] == [first.id]
    assert found(store.keyword_search("b")) == [ids[1]]


def test_export_markdown_and_json(store: Store) -> None:
    chat = store.create_conversation(model="phi-3", device="cpu")
    store.add_message(chat.id, "user", "Name a *fruit*")
    store.add_message(
        chat.id, "assistant", "Apple", tokens=1, sampling={"seed": 1}, status="stopped"
    )
    markdown = store.export(chat.id, "md")
    assert markdown.startswith("# Name a *fruit*\n")
    assert "## User\n\nName a *fruit*\n" in markdown
    assert "## Assistant (stopped)\n\nApple\n" in markdown
    assert "model phi-3" in markdown
    document = json.loads(store.export(chat.id, "json"))
    assert document["conversation"]["id"] == chat.id
    assert [m["content"] for m in document["messages"]] == ["Name a *fruit*", "Apple"]
    assert document["messages"][1]["sampling"] == {"seed": 1}
    assert document["messages"][1]["status"] == "stopped"
    with pytest.raises(PhichatError, match="no conversation"):
        store.export(chat.id + 1)


def test_deleting_a_conversation_removes_its_messages_and_never_reuses_their_ids(
    store: Store,
) -> None:
    keep = store.create_conversation()
    gone = store.create_conversation()
    store.add_message(keep.id, "user", "keep this about lighthouses")
    last = store.add_message(gone.id, "user", "forget this about lighthouses")
    store.add_vectors("test-embedder", [(last.id, b"\x00" * 16)])
    store.delete_conversation(gone.id)
    assert [c.id for c in store.conversations()] == [keep.id]
    assert [m.content for m in store.messages(keep.id)] == ["keep this about lighthouses"]
    assert len(found(store.keyword_search("lighthouses"))) == 1
    assert store.vector_count("test-embedder") == 0
    assert store.add_message(keep.id, "assistant", "noted").id > last.id
    assert store.add_messages(keep.id, [("user", "bulk")])[0] > last.id + 1
    with pytest.raises(PhichatError, match="no conversation"):
        store.delete_conversation(gone.id)
