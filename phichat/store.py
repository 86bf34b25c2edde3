"""SQLite history: conversations, messages and message vectors, written as things happen.

One file (WAL, `synchronous=NORMAL`): every write is its own short `BEGIN IMMEDIATE` transaction,
committed at once, so a killed process loses at most what it had not written yet, and two
phichat processes can share the file. Each thread gets its own connection. The file is marked
with `PRAGMA application_id`; its schema version is `PRAGMA user_version`, raised by the steps
in MIGRATIONS. A file that is not ours is never written to: opening it raises PhichatError.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from phichat.config import APP_NAME, StoreSettings
from phichat.errors import PhichatError

APPLICATION_ID = 0x50484354  # "PHCT"
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 10_000
MMAP_BYTES = 1 << 30  # reads (not writes) through mmap: loading vectors at open twice as fast
ROLES = ("system", "user", "assistant")
STATUSES = ("finished", "stopped")
KINDS = ("chat", "prompt")
TITLE_CHARS = 60
RARE_DOCS = 2000  # exact-word matches are ranked only when there are at most this many

# Each step is a list of statements run in one transaction; step i brings user_version to i + 1.
# Append new steps; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"PRAGMA application_id = {APPLICATION_ID}",
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            device TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'prompt'))
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation INTEGER NOT NULL REFERENCES conversations(id),
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created REAL NOT NULL,
            tokens INTEGER,
            sampling TEXT,
            tokens_per_s REAL,
            status TEXT NOT NULL DEFAULT 'finished' CHECK (status IN ('finished', 'stopped'))
        )""",
        "CREATE INDEX messages_by_conversation ON messages(conversation, id)",
        """CREATE TABLE vectors (
            id INTEGER PRIMARY KEY,
            message INTEGER NOT NULL REFERENCES messages(id),
            embedder TEXT NOT NULL,
            vector BLOB NOT NULL,
            UNIQUE (embedder, message)
        )""",
    ),
    (
        """CREATE VIRTUAL TABLE messages_fts USING fts5(
            content, content='messages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2'
        )""",
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END""",
        "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# Message ids are never reused (AUTOINCREMENT), so a vector index never mistakes a new message
# for a deleted one.
_NEXT_MESSAGE_ID = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0) + 1"
)
_MESSAGE_COLUMNS = (
    "id, conversation, role, content, created, tokens, sampling, tokens_per_s, status"
)
_CONVERSATION_QUERY = """
    SELECT c.id, c.title, c.created, c.model, c.device, c.kind,
           count(m.id), coalesce(max(m.created), c.created)
    FROM conversations c LEFT JOIN messages m ON m.conversation = c.id
"""


@dataclass(frozen=True)
class Conversation:
    """One conversation; `message_count` and `updated` (last message time) are filled in on read."""

    id: int
    title: str
    created: float
    model: str = ""
    device: str = ""
    kind: str = "chat"  # chat | prompt (a one-shot --prompt exchange)
    message_count: int = 0
    updated: float = 0.0


@dataclass(frozen=True)
class Message:
    """One stored chat message. Times are Unix seconds; `sampling` is the params it ran with."""

    id: int
    conversation: int
    role: str
    content: str
    created: float
    tokens: int | None = None
    sampling: dict[str, Any] | None = None
    tokens_per_s: float | None = None
    status: str = "finished"  # finished | stopped (the user stopped the answer)


def default_path() -> Path:
    """history.db in the platform data dir (XDG_DATA_HOME respected)."""
    from platformdirs import user_data_path

    return user_data_path(APP_NAME) / "history.db"


def store_path(settings: StoreSettings) -> Path:
    """The database file: `[store] path` when set, else the platform default."""
    return Path(settings.path).expanduser() if settings.path else default_path()


def title_from(text: str) -> str:
    """A one-line conversation title from a message's first words."""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def fts_query(text: str) -> str:
    """User text as a safe FTS5 query: every word quoted, all words required ('' for none)."""
    terms = [t for t in text.split() if any(ch.isalnum() for ch in t)]
    return " ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _message(row: Sequence[Any]) -> Message:
    sampling = json.loads(row[6]) if row[6] else None
    return Message(*row[:6], sampling, *row[7:])  # type: ignore[arg-type]


class Store:
    """The history database. Use `Store.open()`; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Store:
        """Open (creating or migrating) the database at `path` (default: default_path())."""
        store = cls(Path(path) if path is not None else default_path())
        store._check_file()
        try:
            store._migrate()
        except BaseException:
            store.close()
            raise
        return store

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's connection."""
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # --- opening -------------------------------------------------------------------------

    def _fail(self, why: str) -> PhichatError:
        return PhichatError(
            f"{self.path}: {why}; it was left untouched (move it away, or set [store] path)"
        )

    def _check_file(self) -> None:
        """Refuse anything that is not an empty file or one of our databases, before writing."""
        if self.path.is_dir():
            raise PhichatError(f"{self.path}: is a directory, not a history database")
        if self.path.is_file() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                    raise self._fail("not a phichat history database (not an SQLite file)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise PhichatError(f"{self.path}: cannot open history database: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._fail(f"unreadable as a history database ({exc})") from None
        if app_id != APPLICATION_ID and (app_id != 0 or version != 0 or objects != 0):
            conn.close()
            raise self._fail("not a phichat history database (another program's SQLite file)")
        if version > SCHEMA_VERSION:
            conn.close()
            raise self._fail(
                f"written by a newer phichat (schema {version}; this one knows {SCHEMA_VERSION})"
            )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise PhichatError(f"{self.path}: cannot open history database: {exc}") from None
        self._adopt(conn)

    def _adopt(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        with self._connections_lock:
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    def _migrate(self) -> None:
        """Apply the migration steps this file lacks, in order, all in one transaction."""
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {step + 1}")

    # --- connections and transactions --------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._adopt(
                sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            )
        return conn

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn SQLite failures (locked too long, damaged file) into one-line errors."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as exc:
            raise PhichatError(f"{self.path}: history database error: {exc}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, committed on exit (BEGIN IMMEDIATE: no upgrade races)."""
        with self._guard():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot across several statements."""
        with self._guard():
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    # --- conversations -----------------------------------------------------------------

    def create_conversation(
        self, title: str = "", model: str = "", device: str = "", kind: str = "chat"
    ) -> Conversation:
        """Start a conversation (kind 'prompt' for a one-shot --prompt exchange)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        created = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO conversations (title, created, model, device, kind)"
                " VALUES (?, ?, ?, ?, ?)",
                (title, created, model, device, kind),
            )
        return Conversation(cur.lastrowid or 0, title, created, model, device, kind, 0, created)

    def conversation(self, conversation_id: int) -> Conversation:
        """One conversation; PhichatError if there is none with that id."""
        with self._guard():
            row = (
                self._conn()
                .execute(_CONVERSATION_QUERY + " WHERE c.id = ? GROUP BY c.id", (conversation_id,))
                .fetchone()
            )
        if row is None:
            raise PhichatError(f"no conversation {conversation_id} in {self.path}")
        return Conversation(*row)

    def conversations(self, limit: int | None = None) -> list[Conversation]:
        """Conversations, most recently active first."""
        with self._guard():
            rows = (
                self._conn()
                .execute(
                    _CONVERSATION_QUERY + " GROUP BY c.id ORDER BY 8 DESC, c.id DESC LIMIT ?",
                    (-1 if limit is None else limit,),
                )
                .fetchall()
            )
        return [Conversation(*row) for row in rows]

    def set_title(self, conversation_id: int, title: str) -> None:
        """Rename a conversation."""
        with self._write() as conn:
            conn.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id)
            )

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete a conversation with its messages and their vectors."""
        with self._write() as conn:
            conn.execute(
                "DELETE FROM vectors WHERE message IN"
                " (SELECT id FROM messages WHERE conversation = ?)",
                (conversation_id,),
            )
            conn.execute("DELETE FROM messages WHERE conversation = ?", (conversation_id,))
            if (
                conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount
                == 0
            ):
                raise PhichatError(f"no conversation {conversation_id} in {self.path}")

    # --- messages ----------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        tokens: int | None = None,
        sampling: dict[str, Any] | None = None,
        tokens_per_s: float | None = None,
        status: str = "finished",
    ) -> Message:
        """Save one message now (committed on return). The first user message of an untitled
        conversation becomes its title."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        created = time.time()
        params = json.dumps(sampling, sort_keys=True) if sampling is not None else None
        try:
            with self._write() as conn:
                cur = conn.execute(
                    f"INSERT INTO messages ({_MESSAGE_COLUMNS})"
                    " VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (conversation_id, role, content, created, tokens, params, tokens_per_s, status),
                )
                if role == "user":
                    conn.execute(
                        "UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                        (title_from(content), conversation_id),
                    )
        except sqlite3.IntegrityError:
            raise PhichatError(f"no conversation {conversation_id} in {self.path}") from None
        return Message(
            cur.lastrowid or 0,
            conversation_id,
            role,
            content,
            created,
            tokens,
            sampling,
            tokens_per_s,
            status,
        )

    def add_messages(
        self,
        conversation_id: int,
        messages: Iterable[tuple[str, str]],
        embedder: str | None = None,
        vectors: Iterable[bytes] | None = None,
    ) -> list[int]:
        """Bulk import (role, content) pairs, with their float32 vector blobs for `embedder` if
        given, in one transaction; returns the new message ids in order."""
        created = time.time()
        try:
            with self._write() as conn:
                first = conn.execute(_NEXT_MESSAGE_ID).fetchone()[0]
                rows = [
                    (first + i, conversation_id, role, content, created)
                    for i, (role, content) in enumerate(messages)
                ]
                conn.executemany(
                    "INSERT INTO messages (id, conversation, role, content, created)"
                    " VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                ids = [row[0] for row in rows]
                if vectors is not None:
                    conn.executemany(
                        "INSERT INTO vectors (message, embedder, vector) VALUES (?, ?, ?)",
                        zip(ids, [embedder] * len(ids), vectors, strict=True),
                    )
        except sqlite3.IntegrityError:
            raise PhichatError(f"no conversation {conversation_id} in {self.path}") from None
        return ids

    def messages(self, conversation_id: int) -> list[Message]:
        """A conversation's messages, oldest first."""
        with self._guard():
            rows = (
                self._conn()
                .execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation = ? ORDER BY id",
                    (conversation_id,),
                )
                .fetchall()
            )
        return [_message(row) for row in rows]

    def messages_by_id(self, ids: Iterable[int]) -> dict[int, Message]:
        """The messages with these ids (missing ids are left out)."""
        wanted = list(dict.fromkeys(ids))
        found: dict[int, Message] = {}
        with self._guard():
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._conn().execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id IN ({marks})", chunk
                ):
                    found[row[0]] = _message(row)
        return found

    def message_ids(self, conversation_id: int) -> list[int]:
        """Ids of a conversation's messages, oldest first."""
        with self._guard():
            rows = (
                self._conn()
                .execute(
                    "SELECT id FROM messages WHERE conversation = ? ORDER BY id", (conversation_id,)
                )
                .fetchall()
            )
        return [row[0] for row in rows]

    def keyword_search(
        self,
        text: str,
        limit: int = 50,
        conversation_id: int | None = None,
        max_docs: int = RARE_DOCS,
    ) -> list[tuple[int, float]]:
        """(message id, bm25) for messages holding every word of `text`, best first (FTS5;
        bm25 is negative, lower is better). Any user text is safe: words are quoted.

        Ranking costs time per matching message, so when more than `max_docs` messages hold
        every word, none of the words is rare and this returns [] (meaning, not exact words,
        is what finds such messages)."""
        query = fts_query(text)
        if not query:
            return []
        sql = "SELECT f.rowid, f.rank FROM messages_fts f"
        params: list[Any] = [query]
        if conversation_id is None:
            sql += " WHERE messages_fts MATCH ?"
        else:
            sql += (
                " JOIN messages m ON m.id = f.rowid"
                " WHERE messages_fts MATCH ? AND m.conversation = ?"
            )
            params.append(conversation_id)
        with self._guard():
            conn = self._conn()
            matches = conn.execute(
                "SELECT count(*) FROM (SELECT rowid FROM messages_fts"
                " WHERE messages_fts MATCH ? LIMIT ?)",
                (query, max_docs + 1),
            ).fetchone()[0]
            if matches > max_docs:
                return []
            rows = conn.execute(sql + " ORDER BY f.rank LIMIT ?", [*params, limit])
            return [(row[0], row[1]) for row in rows]

    # --- vectors -----------------------------------------------------------------------

    def add_vectors(self, embedder: str, vectors: Iterable[tuple[int, bytes]]) -> None:
        """Store (message id, float32 vector blob) pairs for `embedder` in one transaction,
        replacing older ones."""
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO vectors (message, embedder, vector) VALUES (?, ?, ?)",
                ((message_id, embedder, blob) for message_id, blob in vectors),
            )

    def missing_vectors(self, embedder: str, limit: int = 256) -> list[Message]:
        """Messages that have no vector for `embedder` yet (saved while it was unavailable)."""
        with self._guard():
            rows = (
                self._conn()
                .execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages m WHERE NOT EXISTS "
                    "(SELECT 1 FROM vectors v WHERE v.embedder = ? AND v.message = m.id) "
                    "ORDER BY id LIMIT ?",
                    (embedder, limit),
                )
                .fetchall()
            )
        return [_message(row) for row in rows]

    def vector_count(self, embedder: str, after: int = 0) -> int:
        """How many vectors `embedder` has with a vector row id above `after`."""
        with self._guard():
            return (
                self._conn()
                .execute(
                    "SELECT count(*) FROM vectors WHERE embedder = ? AND id > ?", (embedder, after)
                )
                .fetchone()[0]
            )

    def vector_chunks(
        self, embedder: str, after: int = 0, chunk: int = 4096
    ) -> Iterator[tuple[int, list[int], bytes]]:
        """`embedder`'s vectors with a row id above `after`, in row-id order, as chunks of
        (last row id, message ids, their float32 blobs joined), for loading an index fast.
        Runs in one read transaction: finish it before this thread writes."""
        with self._read() as conn:
            cursor = conn.execute(
                # walk the table in row-id order ("+" keeps SQLite off the embedder index,
                # which would sort every row in a temporary b-tree)
                "SELECT id, message, vector FROM vectors"
                " WHERE id > ? AND +embedder = ? ORDER BY id",
                (after, embedder),
            )
            while rows := cursor.fetchmany(chunk):
                yield rows[-1][0], [row[1] for row in rows], b"".join([row[2] for row in rows])

    # --- export ------------------------------------------------------------------------

    def export(self, conversation_id: int, fmt: str = "md") -> str:
        """One conversation as Markdown ('md') or JSON ('json') text."""
        conversation = self.conversation(conversation_id)
        messages = self.messages(conversation_id)
        if fmt == "md":
            return to_markdown(conversation, messages)
        if fmt == "json":
            return to_json(conversation, messages)
        raise ValueError(f"fmt must be 'md' or 'json', not {fmt!r}")


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def to_markdown(conversation: Conversation, messages: Sequence[Message]) -> str:
    """A conversation as Markdown: a heading, its facts, then one section per message."""
    facts = [f"conversation {conversation.id}", f"started {_when(conversation.created)}"]
    facts += [
        f"{name} {value}"
        for name, value in (("model", conversation.model), ("device", conversation.device))
        if value
    ]
    lines = [f"# {conversation.title or 'Untitled'}", "", "_" + " · ".join(facts) + "_", ""]
    for message in messages:
        note = " (stopped)" if message.status == "stopped" else ""
        lines += [f"## {message.role.capitalize()}{note}", "", message.content, ""]
    return "\n".join(lines)


def to_json(conversation: Conversation, messages: Sequence[Message]) -> str:
    """A conversation and its messages as a JSON document (times as ISO 8601)."""
    times = {"created": _when(conversation.created), "updated": _when(conversation.updated)}
    document = {
        "conversation": {**asdict(conversation), **times},
        "messages": [{**asdict(m), "created": _when(m.created)} for m in messages],
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"
