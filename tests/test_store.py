"""The history database: real SQLite files in temporary dirs, real processes for crashes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phichat.config import EmbedderSettings, StoreSettings
from phichat.errors import PhichatError, UsageError
from phichat.export import export_conversation
from phichat.memory import Memory
from phichat.store import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    Kind,
    Role,
    Status,
    Store,
    WordQuery,
    default_path,
    store_path,
    word_query,
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

if TYPE_CHECKING:
    from conftest import CliRun


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


def test_default_path_is_in_the_data_folder(isolated_dirs: Path) -> None:
    assert default_path() == isolated_dirs / "data" / "history.db"
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


def test_a_user_message_keeps_the_ids_recalled_for_it(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for step in MIGRATIONS[:4]:  # as the phichat before recall was kept wrote it
        for statement in step:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.execute("INSERT INTO conversations (id, title, created) VALUES (1, 'old', 0)")
    conn.execute(
        "INSERT INTO messages (conversation, role, content, created, written)"
        " VALUES (1, 'user', 'my cat is Pixel', 0, 0)"
    )
    conn.close()
    with Store.open(path) as store:
        (old,) = store.messages(1)
        assert old.recalled == ()
        asked = store.add_message(1, "user", "what is my cat called?", recalled=[old.id])
        plain = store.add_message(1, "assistant", "Pixel")
        assert asked.recalled == (old.id,) and plain.recalled == ()
        assert store.messages(1) == [old, asked, plain]
        assert store.messages_by_id([asked.id])[asked.id].recalled == (old.id,)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


OPENER = """
import sys
from phichat.store import Store
for _ in range(int(sys.argv[2])):
    with Store.open(sys.argv[1]) as store:
        store.conversations(limit=1)
"""


@pytest.mark.slow
def test_processes_opening_and_closing_one_file_at_once_never_refuse_it(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    Store.open(path).close()
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(path), "500"], stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for opener in openers:
        _, errors = opener.communicate(timeout=120)
        assert (opener.returncode, errors) == (0, "")


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
        ("AND OR NOT", True),  # words, not operators: any of them, and "AND" is in the message
        ("OR NOT", False),
        ("AND col:umn", True),
        ("NEAR(a b)", True),
        ("col:umn", True),
        ("^start *", False),
        ("'; DROP", False),
        ("col\0umn", True),
        ("", False),
    ],
)
def test_any_user_text_is_a_safe_keyword_query(store: Store, text: str, finds: bool) -> None:
    chat = store.create_conversation()
    message = store.add_message(chat.id, "user", 'foo-bar "x" AND col:umn NEAR(a b)')
    assert found(store.keyword_search(text)) == ([message.id] if finds else [])


def test_a_query_is_any_content_word_and_every_quoted_phrase() -> None:
    assert word_query('foo-bar "x') == WordQuery((), ('"foo-bar"', '"x"'))  # no phrase opened
    assert word_query('the "exact  phrase" please') == WordQuery(('"exact phrase"',), ('"please"',))
    assert word_query("what is the loader for").words == ('"loader"',)  # stopwords out
    assert word_query("who is he").words == ('"who"', '"is"', '"he"')  # unless only stopwords
    assert not word_query("  - ; ")
    assert word_query("abc\0def").words == ('"abc"', '"def"')  # FTS5 would read a NUL as the end
    assert word_query('say "x" y').match() == '"x" AND ("say" OR "y")'


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
    either = found(store.keyword_search("build ERR_4711", conversation_id=chat.id))
    assert either[0] == target.id and len(either) == 31  # any word; the rare one ranks first
    assert found(store.keyword_search('"attempt 7" build')) == [target.id - 23]  # phrase: all
    assert len(store.keyword_search("builds failing")) == 30  # stemmed: "the build failed"


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
    markdown = export_conversation(store, chat.id, "md")
    assert markdown.startswith("# Name a *fruit*\n")
    assert "## User\n\nName a *fruit*\n" in markdown
    assert "## Assistant (stopped)\n\nApple\n" in markdown
    assert "model phi-3" in markdown
    document = json.loads(export_conversation(store, chat.id, "json"))
    assert document["conversation"]["id"] == chat.id
    assert [m["content"] for m in document["messages"]] == ["Name a *fruit*", "Apple"]
    assert document["messages"][1]["sampling"] == {"seed": 1}
    assert document["messages"][1]["status"] == "stopped"
    with pytest.raises(PhichatError, match="no conversation"):
        export_conversation(store, chat.id + 1)


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


# --- reading by name; enums ------------------------------------------------------------------


def test_roles_statuses_and_kinds_read_back_as_enums_stored_as_text(store: Store) -> None:
    chat = store.create_conversation(kind="prompt")
    answer = store.add_message(chat.id, Role.ASSISTANT, "hi", status="stopped")
    [read] = store.messages(chat.id)
    assert read == answer
    assert (type(read.role), type(read.status), type(store.conversation(chat.id).kind)) == (
        Role,
        Status,
        Kind,
    )
    assert (read.role, read.status, store.conversation(chat.id).kind) == (
        "assistant",
        "stopped",
        "prompt",
    )
    assert f"{read.role} {read.status}" == "assistant stopped"
    raw = sqlite3.connect(store.path).execute("SELECT role, status FROM messages").fetchone()
    assert raw == ("assistant", "stopped")
    with pytest.raises(ValueError, match="'robot' is not a valid Role"):
        store.add_message(chat.id, "robot", "beep")
    with pytest.raises(ValueError, match="'robot' is not a valid Role"):
        store.add_messages(chat.id, [("robot", "beep")])
    with pytest.raises(ValueError, match="'lost' is not a valid Status"):
        store.add_message(chat.id, "user", "hello", status="lost")


# --- the previous schema, migrated -----------------------------------------------------------


def previous_schema(path: Path) -> sqlite3.Connection:
    """An empty database as the previous phichat wrote it (schema 2), open for writing."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    for step in MIGRATIONS[:2]:
        for statement in step:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    return conn


def snapshot(path: Path, queries: list[str]) -> dict[str, object]:
    """Every stored row (by their schema-2 columns) and the word index's answers."""
    conn = sqlite3.connect(path)
    try:
        return {
            "messages": conn.execute(
                "SELECT id, conversation, role, content, created, tokens, sampling, tokens_per_s,"
                " status FROM messages ORDER BY id"
            ).fetchall(),
            "conversations": conn.execute(
                "SELECT id, title, created, model, device, kind FROM conversations ORDER BY id"
            ).fetchall(),
            "vectors": conn.execute("SELECT * FROM vectors ORDER BY id").fetchall(),
            "sequence": conn.execute(
                "SELECT * FROM sqlite_sequence WHERE name = 'messages'"
            ).fetchall(),
            "search": [
                conn.execute(
                    "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ? ORDER BY rank",
                    (word_query(query).match(),),
                ).fetchall()
                for query in queries
            ],
        }
    finally:
        conn.close()


def test_the_previous_schema_is_migrated_keeping_every_message_vector_and_search_result(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.db"
    conn = previous_schema(path)
    conn.executemany(
        "INSERT INTO conversations (id, title, created, kind) VALUES (?, ?, ?, ?)",
        [(1, "harbour", 1.0, "chat"), (2, "bakery", 2.0, "prompt")],
    )
    conn.executemany(
        "INSERT INTO messages (conversation, role, content, created, tokens, sampling,"
        " tokens_per_s, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                1 + i % 2,
                ("user", "assistant")[i % 2],
                f"note {i} about {('lighthouses', 'sourdough')[i % 2]} ERR_{4700 + i}",
                10.0 + i,
                i if i % 2 else None,
                '{"seed": 1}' if i % 2 else None,
                1.5 * i if i % 2 else None,
                "stopped" if i % 3 == 0 else "finished",
            )
            for i in range(12)
        ],
    )
    conn.executemany(  # vector row ids out of message order, as re-embedding leaves them
        "INSERT INTO vectors (message, embedder, vector) VALUES (?, 'e', ?)",
        [(m, bytes([m]) * 8) for m in (12, 3, 7, 1, 2)],
    )
    conn.execute("DELETE FROM vectors WHERE message = 12")
    conn.execute("DELETE FROM messages WHERE id = 12")  # its id must stay unused
    conn.close()
    queries = ["lighthouses", "sourdough", "ERR_4703", "note about", "note 7"]
    before = snapshot(path, queries)

    with Store.open(path) as store:
        assert snapshot(path, queries) == before
        assert store.add_message(1, "user", "a new note about lighthouses").id == 12 + 1
        store.delete_conversation(1)  # one DELETE: messages and vectors cascade
        assert [c.id for c in store.conversations()] == [2]
        assert [m for (m,) in snapshot(path, ["lighthouses"])["search"][0]] == []
        assert [v[1] for v in snapshot(path, [])["vectors"]] == [2]
        assert found(store.keyword_search("sourdough")) == [m for (m,) in before["search"][1]]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")
    conn.close()


# --- export ------------------------------------------------------------------------------------


def test_exported_json_is_standard_even_for_numbers_an_older_phichat_stored(
    store: Store,
) -> None:
    chat = store.create_conversation()
    answer = store.add_message(
        chat.id, "assistant", "hot", sampling={"temperature": math.inf, "top_p": 0.9},
        tokens_per_s=math.nan,
    )  # fmt: skip
    assert (answer.sampling, answer.tokens_per_s) == ({"temperature": None, "top_p": 0.9}, None)
    older = sqlite3.connect(store.path)  # what an older phichat stored
    older.execute(
        "INSERT INTO messages (conversation, role, content, created, sampling, tokens_per_s,"
        " written) VALUES (?, 'assistant', 'old', 0, '{\"temperature\": Infinity}', ?, 0)",
        (chat.id, -math.inf),
    )
    older.commit()
    older.close()

    def non_standard(name: str) -> None:
        pytest.fail(f"exported JSON holds {name}")

    document = json.loads(export_conversation(store, chat.id, "json"), parse_constant=non_standard)
    assert [m["sampling"] for m in document["messages"]] == [
        {"temperature": None, "top_p": 0.9},
        {"temperature": None},
    ]
    assert [m["tokens_per_s"] for m in document["messages"]] == [None, None]
    assert "## Assistant\n\nold\n" in export_conversation(store, chat.id, "md")


# --- identifying a file without writing to it ------------------------------------------------

FOREIGN = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("CREATE TABLE songs (title TEXT)")
for i in range(100):
    conn.execute("INSERT INTO songs VALUES (?)", (f"song {i}",))
if sys.argv[2] == "crashed":
    os._exit(0)
if sys.argv[2] == "closed":
    conn.close()
    sys.exit()
print("ready", flush=True)
sys.stdin.readline()
"""


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("other", ["running", "crashed", "crashed, its -shm lost", "closed"])
def test_another_programs_wal_database_is_left_byte_for_byte(tmp_path: Path, other: str) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir()
    path = directory / "music.db"
    program = subprocess.Popen(
        [sys.executable, "-c", FOREIGN, str(path), other.split(",")[0]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert program.stdin is not None and program.stdout is not None
    try:
        if other == "running":
            assert program.stdout.readline() == "ready\n"
        else:
            program.wait(timeout=60)
        if other == "crashed, its -shm lost":
            (directory / "music.db-shm").unlink()
        before = file_hashes(directory)
        assert ("music.db-wal" in before) == (other != "closed")
        refused = "another program's SQLite file|not identifiable"
        with pytest.raises(PhichatError, match=refused) as caught:
            Store.open(path)
        assert "\n" not in str(caught.value)
        assert file_hashes(directory) == before  # the -wal and -shm too; nothing new beside
    finally:
        program.stdin.close()
        program.wait(timeout=60)


@pytest.mark.parametrize("kind", ["/dev/null", "a FIFO", "a directory"])
def test_what_is_not_a_regular_file_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    path = Path("/dev/null") if kind == "/dev/null" else tmp_path / "history.db"
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a directory":
        path.mkdir()
    beside = sorted(p.name for p in path.parent.glob(path.name + "*"))
    with pytest.raises(PhichatError, match=r"is not a regular file|is a directory") as caught:
        Store.open(path)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in path.parent.glob(path.name + "*")) == beside  # no -journal


# --- a read-only location ----------------------------------------------------------------------

READ_ONLY_MOUNT = 'mount --bind -o ro "$0" "$0" && exec "$@"'

WRITE_ATTEMPT = """
import sys
from phichat.errors import PhichatError
from phichat.store import Store
with Store.open(sys.argv[1]) as store:
    print(store.read_only)
    try:
        store.add_message(1, "user", "one more")
    except PhichatError as exc:
        print(exc)
"""

KILLED_WRITER = """
import os, sys
from phichat.store import Store
store = Store.open(sys.argv[1])
store.add_message(1, "user", "written just before the kill")
os._exit(0)
"""


@pytest.fixture
def run_read_only():
    """Runs a command while a directory is read-only to it: as root (whom permissions do not
    stop) a read-only bind mount in a private mount namespace, else no write permission."""
    root = os.geteuid() == 0
    if root and (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode
    ):
        pytest.skip("running as root without mount namespaces: cannot make a read-only directory")

    def run(directory: Path, *argv: str) -> subprocess.CompletedProcess[str]:
        if root:
            unshare = ("unshare", "--mount", "--propagation", "private", "sh", "-c")
            command = (*unshare, READ_ONLY_MOUNT, str(directory), *argv)
            return subprocess.run(command, capture_output=True, text=True, timeout=120)
        directory.chmod(0o555)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=120)
        finally:
            directory.chmod(0o755)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("left", ["closed", "killed mid-way", "by the previous phichat"])
def test_a_database_on_a_read_only_location_reads_and_refuses_writes(
    tmp_path: Path, minilm_dir: Path, run_read_only, left: str
) -> None:
    from phichat.embed import Embedder

    embedder = Embedder.load(EmbedderSettings())
    texts = [
        "The lighthouse keeper rowed out to the island at dawn",
        "My sourdough starter smells of vinegar, error ERR_4711",
    ]
    blobs = [vector.tobytes() for vector in embedder.encode(texts)]
    directory = tmp_path / "mounted"
    directory.mkdir()
    path = directory / "history.db"
    if left == "by the previous phichat":
        conn = previous_schema(path)
        conn.execute("INSERT INTO conversations (title, created) VALUES ('Read-only talk', 0)")
        for n, (role, text) in enumerate(zip(["user", "assistant"], texts, strict=True), 1):
            conn.execute(
                "INSERT INTO messages (conversation, role, content, created) VALUES (1, ?, ?, 0)",
                (role, text),
            )
            conn.execute(
                "INSERT INTO vectors (message, embedder, vector) VALUES (?, ?, ?)",
                (n, embedder.model_id, blobs[n - 1]),
            )
        conn.close()
    else:
        with Store.open(path) as store:
            chat = store.create_conversation(title="Read-only talk")
            store.add_messages(chat.id, [("user", texts[0]), ("assistant", texts[1])])
            store.add_vectors(embedder.model_id, zip([1, 2], blobs, strict=True))
    if left == "killed mid-way":  # the last message is only in the -wal
        subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], check=True)
        texts.append("written just before the kill")
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{path}"\n')
    before = file_hashes(directory)

    def phichat(*args: str) -> subprocess.CompletedProcess[str]:
        result = run_read_only(
            directory, sys.executable, "-m", "phichat", "--config", str(config), *args
        )
        assert "move it away" not in result.stderr
        assert (result.returncode, result.stderr) == (0, "")
        return result

    assert "Read-only talk" in phichat("history").stdout
    shown = phichat("show", "1").stdout
    assert all(text in shown for text in texts)
    exported = json.loads(phichat("export", "1", "--format", "json").stdout)
    assert [m["content"] for m in exported["messages"]] == texts
    by_meaning = phichat("search", "a boat trip to an island at sunrise", "-k", "1", "--json")
    assert json.loads(by_meaning.stdout)["content"] == texts[0]
    by_words = phichat("search", "ERR_4711", "-k", "1", "--json")
    assert json.loads(by_words.stdout)["content"] == texts[1]

    attempt = run_read_only(directory, sys.executable, "-c", WRITE_ATTEMPT, str(path))
    assert attempt.returncode == 0, attempt.stderr
    assert attempt.stdout == f"True\n{path}: the history database is read-only; nothing was saved\n"
    assert file_hashes(directory) == before


@pytest.mark.slow
@pytest.mark.parametrize("left", ["empty", "in the first format"])
def test_a_read_only_database_that_cannot_be_read_says_what_to_do(
    tmp_path: Path, run_read_only, left: str
) -> None:
    directory = tmp_path / "mounted"
    directory.mkdir()
    path = directory / "history.db"
    path.touch()
    if left == "in the first format":
        conn = sqlite3.connect(path, isolation_level=None)
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{path}"\n')
    before = file_hashes(directory)
    result = run_read_only(
        directory, sys.executable, "-m", "phichat", "--config", str(config), "history"
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"phichat: error: {path}:")
    said = "is empty and read-only" if left == "empty" else "open it once with write access"
    assert said in result.stderr
    assert "move it away" not in result.stderr
    assert file_hashes(directory) == before


# --- search input ------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "   ", "?! … --", "\0\0", " \0 \t"])
def test_a_search_without_a_word_is_refused(store: Store, query: str) -> None:
    chat = store.create_conversation()
    store.add_message(chat.id, "user", "anything at all")
    with pytest.raises(UsageError, match="search needs a word to look for"):
        Memory.open(store, None).search(query)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("  ", "search needs a word to look for, not only spaces or punctuation"),
        ("\0", "query must not contain NUL characters"),
    ],
)
def test_the_search_command_refuses_a_query_without_a_word_in_one_line(
    minilm_dir: Path, phichat_cli: CliRun, query: str, reason: str
) -> None:
    with Store.open() as store:
        chat = store.create_conversation()
        store.add_message(chat.id, "user", "anything at all")
    result = phichat_cli("search", query)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("phichat") and result.stderr.endswith(f"{reason}\n")


# --- answers saved as they stream ----------------------------------------------------------


def test_an_answer_is_saved_as_it_streams(store: Store) -> None:
    chat = store.create_conversation()
    question = store.add_message(chat.id, "user", "tell me about lighthouses")
    answer = store.add_message(
        chat.id, "assistant", "Beacon", sampling={"seed": 3}, status=Status.STREAMING
    )
    assert answer.status is Status.STREAMING
    for text in ["Beacon", "Beacons guide", "Beacons guide ships past reefs"]:
        store.update_message(answer.id, text, tokens=len(text.split()))
        saved = store.messages(chat.id)[-1]
        # a reader cannot tell a live writer from a killed one: what is saved reads as stopped
        assert (saved.content, saved.status, saved.tokens) == (
            text,
            Status.STOPPED,
            len(text.split()),
        )
        assert store.keyword_search("beacon") == store.keyword_search("reefs") == []
    assert [m.id for m in store.missing_vectors("e")] == [question.id]  # embedded when it ends

    store.update_message(
        answer.id, "Lights guide ships past reefs.", status=Status.FINISHED, tokens_per_s=20.0
    )
    saved = store.messages(chat.id)[-1]
    assert (saved.content, saved.status, saved.tokens, saved.sampling, saved.tokens_per_s) == (
        "Lights guide ships past reefs.",
        Status.FINISHED,
        5,
        {"seed": 3},
        20.0,
    )
    assert found(store.keyword_search("reefs")) == [answer.id]
    assert found(store.keyword_search("beacons")) == []  # earlier text left no trace
    assert [m.id for m in store.missing_vectors("e")] == [question.id, answer.id]
    conn = sqlite3.connect(store.path)
    conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")
    conn.close()
    with pytest.raises(PhichatError, match=f"no message {answer.id + 1}"):
        store.update_message(answer.id + 1, "nothing")


STREAMER = """
import sys
from phichat.store import Status, Store
store = Store.open(sys.argv[1])
chat = store.create_conversation()
store.add_message(chat.id, "user", "write a long story")
answer = store.add_message(chat.id, "assistant", "", status=Status.STREAMING)
text = ""
for i in range(10**6):
    text += f"word{i} "
    store.update_message(answer.id, text)
    print(i, flush=True)
"""


def raw_statuses(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("SELECT status FROM messages ORDER BY id")]
    finally:
        conn.close()


@pytest.mark.slow
def test_an_answer_killed_mid_stream_keeps_what_was_saved(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    writer = subprocess.Popen([sys.executable, "-c", STREAMER, str(path)], stdout=subprocess.PIPE)
    assert writer.stdout is not None
    for line in writer.stdout:
        if int(line) == 200:
            os.kill(writer.pid, signal.SIGKILL)
            break
    printed = [int(line) for line in writer.stdout] or [200]  # saved before the kill landed
    writer.wait()
    assert writer.returncode == -signal.SIGKILL

    with Store.open(path) as store:
        question, answer = store.messages(1)
        words = answer.content.split()
        assert words == [f"word{i}" for i in range(len(words))]
        assert len(words) - 1 in (printed[-1], printed[-1] + 1)  # at most the unprinted one more
        assert answer.status is Status.STOPPED
        assert store.keyword_search("word7") == []  # its writer may still be at work
    assert raw_statuses(path) == ["finished", "streaming"]

    conn = sqlite3.connect(path)  # a minute later
    conn.execute("UPDATE messages SET written = written - 60")
    conn.commit()
    conn.close()
    with Store.open(path) as store:  # the writer is gone: stopped for good, found, embedded
        assert raw_statuses(path) == ["finished", "stopped"]
        assert found(store.keyword_search("word7")) == [answer.id]
        assert [m.id for m in store.missing_vectors("e")] == [question.id, answer.id]


def test_a_slow_writer_takes_its_answer_back(store: Store) -> None:
    chat = store.create_conversation()
    answer = store.add_message(chat.id, "assistant", "Tides turn", status=Status.STREAMING)
    conn = sqlite3.connect(store.path)  # another process marked it stopped
    conn.execute("UPDATE messages SET status = 'stopped'")
    conn.commit()
    conn.close()
    store.add_vectors("e", [(answer.id, b"\x01" * 8)])
    assert found(store.keyword_search("tides")) == [answer.id]

    store.update_message(answer.id, "Tides turn twice a day")  # its writer was only slow
    assert raw_statuses(store.path) == ["streaming"]
    assert store.keyword_search("tides") == []
    assert store.vector_count("e") == 0  # the vector described the old text
    store.update_message(answer.id, "Tides turn twice a day.", status=Status.FINISHED)
    assert found(store.keyword_search("tides twice")) == [answer.id]


def test_conversation_ids_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    conn = previous_schema(path)  # migrated: conversations get AUTOINCREMENT, ids kept
    conn.executemany(
        "INSERT INTO conversations (id, title, created) VALUES (?, ?, ?)",
        [(1, "kept", 1.0), (4, "newest", 2.0)],
    )
    conn.execute(
        "INSERT INTO messages (conversation, role, content, created) VALUES (4, 'user', 'x', 3)"
    )
    conn.close()
    with Store.open(path) as store:
        assert [(c.id, c.title) for c in store.conversations()] == [(4, "newest"), (1, "kept")]
        store.delete_conversation(4)  # the newest: its messages go with it
        assert store.messages(4) == []
        assert store.create_conversation().id == 5
        newest = store.create_conversation()
        store.delete_conversation(newest.id)
        assert store.create_conversation().id == newest.id + 1
