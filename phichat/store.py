"""SQLite history: conversations, messages and message vectors, written as things happen.

One file (WAL, `synchronous=NORMAL`): every write is its own short `BEGIN IMMEDIATE` transaction,
committed at once, so a killed process loses at most what it had not written yet, and two
phichat processes can share the file. Each thread gets its own connection; rows are read by
column name. The file is marked with `PRAGMA application_id`; its schema version is
`PRAGMA user_version`, raised by the steps in MIGRATIONS.

A path is identified before anything is written. Anything but a regular file or a new path is
refused; a file is read through a read-only connection that writes nothing beside it (with a
write-ahead log, through its -shm opened read-only, so no read marks; without one,
`immutable=1`, so no -wal, -shm or -journal is made), and only a file that is ours, empty or new
is then opened for writing. Another program's file is refused and left byte-for-byte as it was,
its -wal and -shm included. One of ours on a read-only location (a read-only mount, a file or a
directory without write permission) is opened the same read-only way: everything reads, every
write is refused in one line. (Such a copy is assumed not to change while it is read.)

An answer being written is saved as it grows: `add_message(..., status=Status.STREAMING)`, then
`update_message()` every second or so (one short UPDATE), then a last update with its final
status. A row still "streaming" reads back as stopped (its writer may have been killed); one
left alone for STALE_STREAMING_S is marked stopped for good the next time the file is opened
for writing, so it joins the word index and gets a vector.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phichat.config import StoreSettings, expand_path
from phichat.errors import PhichatError, UsageError
from phichat.paths import data_dir
from phichat.text import one_line

if TYPE_CHECKING:
    from phichat.importer import ImportedConversation

APPLICATION_ID = 0x50484354  # "PHCT"
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 10_000
MMAP_BYTES = 1 << 30  # reads (not writes) through mmap: loading vectors at open twice as fast
TITLE_CHARS = 60
UNTITLED = "(untitled)"  # how a conversation without a title is shown
RARE_DOCS = 2000  # exact-word matches are ranked only when there are at most this many
STALE_STREAMING_S = 30.0  # an answer not written to for this long has lost its writer
READ_ONLY_FROM_SCHEMA = 2  # older files must be migrated (written) before they can be read


class _Word(str, Enum):
    """A str enum that prints as its value (a StrEnum, also on Python 3.10); stored as that text."""

    def __str__(self) -> str:
        return str(self.value)


class Role(_Word):
    """Who wrote a message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class Status(_Word):
    """How a message ended."""

    FINISHED = "finished"
    STOPPED = "stopped"  # stopped before the end (Escape, Ctrl+C, a signal, a killed writer)
    STREAMING = "streaming"  # still being written; read back as STOPPED


class Kind(_Word):
    """What started a conversation."""

    CHAT = "chat"
    PROMPT = "prompt"  # a one-shot --prompt exchange


# Each step is a list of statements run in one transaction, with foreign keys off (tables are
# rebuilt); step i brings user_version to i + 1. Append new steps; never edit a released one.
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
    (
        # Deleting a conversation deletes its messages and their vectors (ON DELETE CASCADE);
        # answers are saved as they stream ('streaming', and `written`: when last saved). SQLite
        # cannot alter a foreign key, so both tables are rebuilt, keeping every id.
        """CREATE TABLE messages_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created REAL NOT NULL,
            tokens INTEGER,
            sampling TEXT,
            tokens_per_s REAL,
            status TEXT NOT NULL DEFAULT 'finished'
                CHECK (status IN ('finished', 'stopped', 'streaming')),
            written REAL NOT NULL
        )""",
        """INSERT INTO messages_new (id, conversation, role, content, created, tokens, sampling,
                                     tokens_per_s, status, written)
           SELECT id, conversation, role, content, created, tokens, sampling, tokens_per_s,
                  status, created
           FROM messages""",
        # AUTOINCREMENT's high-water mark moves with the table: deleted ids stay unused
        "DELETE FROM sqlite_sequence WHERE name = 'messages_new'",
        "UPDATE sqlite_sequence SET name = 'messages_new' WHERE name = 'messages'",
        "DROP TABLE messages",  # with its index and triggers; messages_fts keeps its rows
        "ALTER TABLE messages_new RENAME TO messages",
        """CREATE TABLE vectors_new (
            id INTEGER PRIMARY KEY,
            message INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            embedder TEXT NOT NULL,
            vector BLOB NOT NULL,
            UNIQUE (embedder, message)
        )""",
        "INSERT INTO vectors_new (id, message, embedder, vector)"
        " SELECT id, message, embedder, vector FROM vectors",
        "DROP TABLE vectors",
        "ALTER TABLE vectors_new RENAME TO vectors",
        "CREATE INDEX messages_by_conversation ON messages(conversation, id)",
        "CREATE INDEX messages_streaming ON messages(written) WHERE status = 'streaming'",
        "CREATE INDEX vectors_by_message ON vectors(message)",  # for cascades and stale vectors
        # A message joins the word index once it is no longer streaming: re-indexing an answer's
        # whole text every time it grows would cost about 25 times the update itself.
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages
            WHEN new.status != 'streaming' BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
            WHEN old.status != 'streaming' BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content, status ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content)
            SELECT 'delete', old.id, old.content WHERE old.status != 'streaming';
            INSERT INTO messages_fts(rowid, content)
            SELECT new.id, new.content WHERE new.status != 'streaming';
        END""",
        # a vector always describes a message's current text
        """CREATE TRIGGER messages_stale_vectors AFTER UPDATE OF content ON messages BEGIN
            DELETE FROM vectors WHERE message = new.id;
        END""",
    ),
    (
        # A regenerate or an edit keeps what it replaces, marked (searchable, shown on
        # request); each answer names the model that wrote it (NULL: before this step).
        "ALTER TABLE messages ADD COLUMN replaced INTEGER NOT NULL DEFAULT 0"
        " CHECK (replaced IN (0, 1))",
        "ALTER TABLE messages ADD COLUMN model TEXT",
    ),
    (
        # A user message sent after the window overflowed carries the older messages recalled
        # for it (a JSON list of ids), so later prompts show it as it was sent and the prompt
        # keeps its prefix (NULL: nothing recalled).
        "ALTER TABLE messages ADD COLUMN recalled TEXT",
    ),
    (
        # The word index stems English words (porter: "reverse" finds "reverses").
        "DROP TRIGGER messages_fts_insert",
        "DROP TRIGGER messages_fts_delete",
        "DROP TRIGGER messages_fts_update",
        "DROP TABLE messages_fts",
        """CREATE VIRTUAL TABLE messages_fts USING fts5(
            content, content='messages', content_rowid='id',
            tokenize='porter unicode61 remove_diacritics 2'
        )""",
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages
            WHEN new.status != 'streaming' BEGIN
            INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
            WHEN old.status != 'streaming' BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content, status ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, content)
            SELECT 'delete', old.id, old.content WHERE old.status != 'streaming';
            INSERT INTO messages_fts(rowid, content)
            SELECT new.id, new.content WHERE new.status != 'streaming';
        END""",
        "INSERT INTO messages_fts(rowid, content)"
        " SELECT id, content FROM messages WHERE status != 'streaming'",
    ),
    (
        # An imported conversation keeps its source (a hash of its messages), so importing it
        # again adds nothing; deleting the conversation forgets it.
        """CREATE TABLE conversation_sources (
            source TEXT PRIMARY KEY,
            conversation INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE
        )""",
        "CREATE INDEX conversation_sources_by_conversation ON conversation_sources(conversation)",
    ),
    (
        # Conversation ids are never reused (AUTOINCREMENT), as message ids are not: a deleted
        # conversation's id must not come back as another (its saved state is named by it).
        # Rebuilt keeping every id; what references it does so by name.
        """CREATE TABLE conversations_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            device TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'prompt'))
        )""",
        "INSERT INTO conversations_new (id, title, created, model, device, kind)"
        " SELECT id, title, created, model, device, kind FROM conversations",
        "DROP TABLE conversations",
        "ALTER TABLE conversations_new RENAME TO conversations",
    ),
    (
        # Conversations as people keep them: a role (a named system prompt and settings, NULL:
        # none), a fork's parent and the parent's message it was forked at (the parent's
        # deletion leaves the fork standing), pinned to the top, archived out of the list.
        "ALTER TABLE conversations ADD COLUMN role TEXT",
        "ALTER TABLE conversations ADD COLUMN parent INTEGER"
        " REFERENCES conversations(id) ON DELETE SET NULL",
        "ALTER TABLE conversations ADD COLUMN forked_at INTEGER",
        "ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"
        " CHECK (pinned IN (0, 1))",
        "ALTER TABLE conversations ADD COLUMN archived INTEGER NOT NULL DEFAULT 0"
        " CHECK (archived IN (0, 1))",
    ),
    (
        # Files: folders indexed for search (`phichat index`) and files attached to a message,
        # split into chunks (1-based line ranges) with their own word index and vectors. A
        # file's size, mtime and content hash say whether it must be read again.
        """CREATE TABLE files (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL UNIQUE,
            root TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            indexed REAL NOT NULL
        )""",
        "CREATE INDEX files_by_root ON files(root)",
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            file INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
            first_line INTEGER NOT NULL,
            last_line INTEGER NOT NULL,
            content TEXT NOT NULL
        )""",
        "CREATE INDEX chunks_by_file ON chunks(file, id)",
        """CREATE VIRTUAL TABLE chunks_fts USING fts5(
            content, content='chunks', content_rowid='id',
            tokenize='porter unicode61 remove_diacritics 2'
        )""",
        """CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
            INSERT INTO chunks_fts(rowid, content) VALUES (new.id, new.content);
        END""",
        """CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
            INSERT INTO chunks_fts(chunks_fts, rowid, content)
            VALUES ('delete', old.id, old.content);
        END""",
        """CREATE TABLE chunk_vectors (
            id INTEGER PRIMARY KEY,
            chunk INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
            embedder TEXT NOT NULL,
            vector BLOB NOT NULL,
            UNIQUE (embedder, chunk)
        )""",
        "CREATE INDEX chunk_vectors_by_chunk ON chunk_vectors(chunk)",
        # what a user message carried: a file whole, or its chunks (path and line range)
        """CREATE TABLE attachments (
            id INTEGER PRIMARY KEY,
            message INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            first_line INTEGER NOT NULL,
            last_line INTEGER NOT NULL,
            whole INTEGER NOT NULL CHECK (whole IN (0, 1))
        )""",
        "CREATE INDEX attachments_by_message ON attachments(message)",
    ),
    (
        # A conversation's knowledge: the folder (`/use DIR`, `--use DIR`) whose best chunks go
        # with each of its messages (NULL: none).
        "ALTER TABLE conversations ADD COLUMN knowledge TEXT",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

Schema = dict[str, tuple[str, frozenset[str]]]
"""A database's schema objects by name: each one's type and, for a table, its columns."""


def _schema_of(conn: sqlite3.Connection) -> Schema:
    """The schema objects of `conn`'s database (SQLite's own left out)."""
    objects = conn.execute(
        "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite%'"
    ).fetchall()
    return {
        name: (kind, frozenset(c for (c,) in conn.execute(_COLUMNS, (name,))))
        for kind, name in objects
    }


_COLUMNS = "SELECT name FROM pragma_table_info(?)"


@functools.cache
def _schema_at(version: int) -> Schema:
    """What MIGRATIONS' first `version` steps make (built in memory once)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for step in MIGRATIONS[:version]:
            for statement in step:
                conn.execute(statement)
        return _schema_of(conn)
    finally:
        conn.close()


def _not_made_by_phichat(schema: Schema, version: int) -> list[str]:
    """The objects of schema `version` that `schema` lacks or has of another shape (a table
    missing one of its columns); objects of its own are allowed beside them."""
    return [
        name
        for name, (kind, columns) in _schema_at(version).items()
        if schema.get(name, ("", frozenset()))[0] != kind or not columns <= schema[name][1]
    ]


# Message ids are never reused (AUTOINCREMENT), so a vector index never mistakes a new message
# for a deleted one.
_NEXT_MESSAGE_ID = (
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0) + 1"
)
_COUNT_MATCHES = "SELECT count(*) FROM (SELECT rowid FROM {0} WHERE {0} MATCH ? LIMIT ?)"
_MESSAGE_COLUMNS = (
    "id, conversation, role, content, created, tokens, sampling, tokens_per_s, status,"
    " replaced, model, recalled"
)
REPLACED_FROM_SCHEMA = 4  # read-only files older than this: nothing replaced, no model recorded
RECALLED_FROM_SCHEMA = 5  # read-only files older than this: nothing recalled
_MESSAGE_COLUMNS_BEFORE_RECALLED = _MESSAGE_COLUMNS.replace("recalled", "NULL AS recalled")
_MESSAGE_COLUMNS_BEFORE_REPLACED = _MESSAGE_COLUMNS_BEFORE_RECALLED.replace(
    "replaced, model", "0 AS replaced, NULL AS model"
)
ROLES_FROM_SCHEMA = 9  # read-only files older than this: no role, fork, pin or archive
KNOWLEDGE_FROM_SCHEMA = 11  # read-only files older than this: no knowledge folder
_CONVERSATION_QUERY = """
    SELECT c.id, c.title, c.created, c.model, c.device, c.kind,
           c.role, c.parent, c.forked_at, c.pinned, c.archived, c.knowledge,
           count(m.id) AS message_count, coalesce(max(m.created), c.created) AS updated
    FROM conversations c LEFT JOIN messages m ON m.conversation = c.id
"""
_CONVERSATION_QUERY_BEFORE_KNOWLEDGE = _CONVERSATION_QUERY.replace(
    "c.knowledge", "NULL AS knowledge"
)
_CONVERSATION_QUERY_BEFORE_ROLES = _CONVERSATION_QUERY_BEFORE_KNOWLEDGE.replace(
    "c.role, c.parent, c.forked_at, c.pinned, c.archived",
    "NULL AS role, NULL AS parent, NULL AS forked_at, 0 AS pinned, 0 AS archived",
)


@dataclass(frozen=True)
class Conversation:
    """One conversation; `message_count` and `updated` (last message time) are filled in on read."""

    id: int
    title: str
    created: float
    model: str = ""
    device: str = ""
    kind: Kind = Kind.CHAT
    message_count: int = 0
    updated: float = 0.0
    role: str | None = None  # a [roles] name: its system prompt and sampling
    parent: int | None = None  # a fork's parent (None once the parent is deleted)
    forked_at: int | None = None  # the parent's message the fork was made at
    pinned: bool = False  # listed first
    archived: bool = False  # out of the list (still searched; `history --all`)
    knowledge: str | None = None  # a folder whose best chunks go with each message

    @property
    def shown_title(self) -> str:
        """The title, or UNTITLED where it has none."""
        return self.title or UNTITLED


@dataclass(frozen=True)
class Message:
    """One stored chat message. Times are Unix seconds; `sampling` is the params it ran with."""

    id: int
    conversation: int
    role: Role
    content: str
    created: float
    tokens: int | None = None
    sampling: dict[str, Any] | None = None
    tokens_per_s: float | None = None
    status: Status = Status.FINISHED
    replaced: bool = False  # by a regenerate or an edit (kept, shown on request)
    model: str | None = None  # the model that wrote an answer
    recalled: tuple[int, ...] = ()  # ids of older messages recalled for a user message

    @property
    def cut_short(self) -> bool:
        """Whether an answer ended before the model ended it: stopped, or cut at max tokens
        (what its sampling record says; an older one, by its tokens reaching max_tokens)."""
        if self.status == Status.STOPPED:
            return True
        sampling = self.sampling or {}
        if "finish" in sampling:
            return bool(sampling["finish"] == "length")
        limit = sampling.get("max_tokens")
        return isinstance(limit, int) and self.tokens is not None and self.tokens >= limit


@dataclass(frozen=True)
class IndexedFile:
    """A file in the files index, as it was when read."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Chunk:
    """A piece of an indexed file: its lines first_line..last_line (1-based, inclusive)."""

    id: int
    file: int
    path: str
    first_line: int
    last_line: int
    content: str


@dataclass(frozen=True)
class Source:
    """Where attached text came from: a file's lines, `whole` when it is the entire file."""

    path: str
    first_line: int
    last_line: int
    whole: bool

    def __str__(self) -> str:
        lines = (
            f"line {self.first_line}"
            if self.first_line == self.last_line
            else (f"lines {self.first_line}-{self.last_line}")
        )
        return f"{self.path} ({'whole, ' if self.whole else ''}{lines})"


def default_path() -> Path:
    """history.db in phichat's data folder."""
    return data_dir() / "history.db"


def store_path(settings: StoreSettings) -> Path:
    """The database file: `[store] path` when set, else the platform default."""
    return expand_path(settings.path) if settings.path else default_path()


def title_from(text: str) -> str:
    """A one-line conversation title from a message's first words."""
    return one_line(text, TITLE_CHARS)


# Words too common to say what a message is about: left out of a question's exact-words query
# unless it has no other words ("who is he" still searches for every word).
_STOPWORDS = """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves"""
STOPWORDS = frozenset(_STOPWORDS.split())


@dataclass(frozen=True)
class WordQuery:
    """A search text as exact-words terms (each an FTS5 string: FTS5 splits `ERR_4711` or
    `main.o` into a phrase of its tokens): `phrases`, quoted in the text, must all appear;
    of the other `words`, stopwords left out, any may."""

    phrases: tuple[str, ...]
    words: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.phrases or self.words)

    def match(self) -> str:
        """The FTS5 query: every phrase AND (any of the words)."""
        ored = " OR ".join(self.words)
        parts = [*self.phrases, f"({ored})" if len(self.words) > 1 else ored]
        return " AND ".join(part for part in parts if part)


def _fts_string(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _has_word(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def word_query(text: str) -> WordQuery:
    """`text` as a safe WordQuery: "quoted phrases" kept whole, other words with a letter or
    digit, stopwords out; NUL bytes separate words (FTS5 would read one as the end of the
    query)."""
    pieces = text.replace("\0", " ").split('"')
    if len(pieces) % 2 == 0:  # an unmatched quote opens no phrase
        pieces[-2:] = [pieces[-2] + " " + pieces[-1]]
    quoted = [" ".join(p.split()) for p in pieces[1::2] if _has_word(p)]
    tokens = [t for piece in pieces[0::2] for t in piece.split() if _has_word(t)]
    content = [t for t in tokens if t.lower().strip(".,;:!?'()[]{}") not in STOPWORDS]
    words = dict.fromkeys(_fts_string(t) for t in (content or tokens))
    return WordQuery(tuple(_fts_string(p) for p in quoted), tuple(words))


def _rare_words(conn: sqlite3.Connection, table: str, text: str, max_docs: int) -> str | None:
    """The FTS5 query for `text` over the word index `table`, its terms found in more than
    `max_docs` rows left out (see Store.keyword_search); None when no term is left."""
    terms = word_query(text)

    def rare(term: str) -> bool:
        count = conn.execute(_COUNT_MATCHES.format(table), (term, max_docs + 1)).fetchone()[0]
        return count <= max_docs

    phrases = tuple(filter(rare, terms.phrases))
    words = tuple(filter(rare, terms.words))
    if not phrases and not words:
        return None
    return WordQuery(phrases, words).match()


def check_search_text(text: str) -> None:
    """UsageError unless `text` holds a word (letters or digits) to search for: an empty,
    blank, punctuation-only or NUL-only query would otherwise list every message."""
    if not word_query(text):
        raise UsageError("search needs a word to look for, not only spaces or punctuation")


def finite(value: Any) -> Any:
    """`value` with every non-finite float (inf, nan), at any depth, replaced by None: JSON
    and the history hold finite numbers only."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(
        id=row["id"],
        title=row["title"],
        created=row["created"],
        model=row["model"],
        device=row["device"],
        kind=Kind(row["kind"]),
        message_count=row["message_count"],
        updated=row["updated"],
        role=row["role"],
        parent=row["parent"],
        forked_at=row["forked_at"],
        pinned=bool(row["pinned"]),
        archived=bool(row["archived"]),
        knowledge=row["knowledge"],
    )


def _message(row: sqlite3.Row) -> Message:
    status = Status(row["status"])
    return Message(
        id=row["id"],
        conversation=row["conversation"],
        role=Role(row["role"]),
        content=row["content"],
        created=row["created"],
        tokens=row["tokens"],
        sampling=_sampling(row["sampling"]),
        tokens_per_s=row["tokens_per_s"],
        # its writer may be gone: what was saved is all there is for now
        status=Status.STOPPED if status is Status.STREAMING else status,
        replaced=bool(row["replaced"]),
        model=row["model"],
        recalled=_recalled(row["recalled"]),
    )


def _json_cell(text: Any) -> Any:
    """A JSON column's value; None where it is empty or damaged (the message itself is not)."""
    if not isinstance(text, (str, bytes)) or not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _sampling(text: Any) -> dict[str, Any] | None:
    """A message's stored sampling parameters: a JSON object, or None."""
    value = _json_cell(text)
    return value if isinstance(value, dict) else None


def _recalled(text: Any) -> tuple[int, ...]:
    """A message's stored recalled ids: a JSON list of ids, or () where it is anything else."""
    value = _json_cell(text)
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        return ()
    return tuple(value)


def _remapped(recalled: Any, new_ids: dict[int, int]) -> str | None:
    """A message's recalled ids (JSON) as the ids its copies have in a fork (those not copied
    left out)."""
    ids = [new_ids[i] for i in _recalled(recalled) if i in new_ids]
    return json.dumps(ids) if ids else None


IN_CHUNK = 500  # values bound in one `IN (...)` (older SQLite builds allow 999 in all)


def _in_chunks(values: Iterable[Any]) -> Iterator[tuple[list[Any], str]]:
    """The distinct `values`, in chunks small enough to bind in one `IN (...)`, each with its
    placeholders ("?,?,?")."""
    distinct = list(dict.fromkeys(values))
    for start in range(0, len(distinct), IN_CHUNK):
        chunk = distinct[start : start + IN_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def _sampling_json(sampling: dict[str, Any] | None) -> str | None:
    return None if sampling is None else json.dumps(sampling, sort_keys=True, allow_nan=False)


class Store:
    """The history database. Use `Store.open()`; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.read_only = False
        self._database = str(path)  # what each thread's connection opens
        self._uri = False
        self._message_columns = _MESSAGE_COLUMNS  # what a message is read from
        self._conversation_query = _CONVERSATION_QUERY  # and a conversation
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str] | None = None) -> Store:
        """Open (creating or migrating) the database at `path` (default: default_path());
        read-only when the file or its directory cannot be written."""
        store = cls(Path(path) if path is not None else default_path())
        try:
            store._open()
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

    def _beside(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def _log_state(self) -> tuple[bool, bool]:
        """Whether a write-ahead log with something in it lies beside the file, and its -shm."""
        try:
            logged = self._beside("-wal").stat().st_size > 0
        except FileNotFoundError:
            logged = False
        return logged, self._beside("-shm").exists()

    def _read_only_uri(self, logged: bool, indexed: bool) -> str:
        """A URI that reads the file without writing anything: with a write-ahead log and its
        -shm beside it, through the -shm opened read-only (no read marks); else the file is the
        whole truth (immutable=1: no locks, and no -wal or -shm made)."""
        uri = self.path.absolute().as_uri()
        return uri + ("?mode=ro&readonly_shm=1" if logged and indexed else "?mode=ro&immutable=1")

    def _refuse(self, why: str) -> PhichatError:
        return PhichatError(
            f"{self.path}: {why}; it was left untouched (move it away, or set [store] path)"
        )

    def _open(self) -> None:
        """Identify the path, then open it for writing (made, migrated, WAL) or read-only."""
        version = self._identify()
        if self.path.exists() and not (
            os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)
        ):
            self._open_read_only(version)
            return
        if not self.path.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PhichatError(f"{self.path}: cannot create it: {exc.strerror}") from None
            if not os.access(self.path.parent, os.W_OK):
                raise PhichatError(f"{self.path}: cannot create it: its directory is read-only")
        try:
            self._conn().execute("PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as exc:
            raise PhichatError(f"{self.path}: cannot open history database: {exc}") from None
        self._upgrade()

    def _peek(self) -> tuple[int, int, Schema, bool]:
        """(application_id, user_version, schema objects, whether a write-ahead log beside the
        file went unread for want of its -shm), read without writing anything."""
        logged, indexed = self._log_state()
        try:
            conn = sqlite3.connect(
                self._read_only_uri(logged, indexed), uri=True, isolation_level=None
            )
            try:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                objects = _schema_of(conn)
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            raise self._refuse(f"unreadable as a history database ({exc})") from None
        return app_id, version, objects, logged and not indexed

    def _identify(self) -> int | None:
        """The schema version of the database at the path (None: a new path, or an empty file).
        Anything that is not ours is refused with PhichatError, before anything is written."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PhichatError(f"{self.path}: cannot open it: {exc.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            raise PhichatError(f"{self.path}: is a directory, not a history database")
        if not stat.S_ISREG(info.st_mode):
            raise PhichatError(f"{self.path}: is not a regular file, so not a history database")
        if info.st_size > 0:
            with self.path.open("rb") as f:
                if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                    raise self._refuse("not a phichat history database (not an SQLite file)")
        app_id, version, objects, unread_log = self._peek()
        if app_id == 0 and version == 0 and not objects and unread_log:
            # whose the log is could only be read by writing an -shm beside it
            raise self._refuse("not identifiable (a write-ahead log without its -shm index)")
        if app_id != APPLICATION_ID and (app_id != 0 or version != 0 or objects):
            raise self._refuse("not a phichat history database (another program's SQLite file)")
        if version > SCHEMA_VERSION:
            raise PhichatError(
                f"{self.path}: written by a newer phichat (schema {version}; this one knows"
                f" {SCHEMA_VERSION}); it was left untouched"
            )
        if version == 0 and objects:  # phichat's first step marks the file as it makes tables
            raise self._refuse("not a phichat history database (phichat's mark on other tables)")
        if version and (lacking := _not_made_by_phichat(objects, version)):
            raise self._refuse(
                f"not a phichat history database (phichat's mark, but not schema {version}'s "
                f"{', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''})"
            )
        return version if objects else None

    def _open_read_only(self, version: int | None) -> None:
        """Read one of our files where it cannot be written (history, search and export work)."""
        if version is None:
            raise PhichatError(f"{self.path}: is empty and read-only, so it holds no history")
        if version < READ_ONLY_FROM_SCHEMA:
            raise PhichatError(
                f"{self.path}: is read-only, in an older phichat's format (schema {version})"
                " that must be upgraded before it can be read: open it once with write access"
            )
        self.read_only = True
        if version < REPLACED_FROM_SCHEMA:
            self._message_columns = _MESSAGE_COLUMNS_BEFORE_REPLACED
        elif version < RECALLED_FROM_SCHEMA:
            self._message_columns = _MESSAGE_COLUMNS_BEFORE_RECALLED
        if version < ROLES_FROM_SCHEMA:
            self._conversation_query = _CONVERSATION_QUERY_BEFORE_ROLES
        elif version < KNOWLEDGE_FROM_SCHEMA:
            self._conversation_query = _CONVERSATION_QUERY_BEFORE_KNOWLEDGE
        self._database, self._uri = self._read_only_uri(*self._log_state()), True
        with self._guard():
            self._conn().execute("SELECT count(*) FROM sqlite_master").fetchone()

    def _upgrade(self) -> None:
        """Apply the migration steps this file lacks, in order, in one transaction (foreign
        keys off: tables are rebuilt); then mark answers whose writer is gone as stopped."""
        connection = self._conn()
        connection.execute("PRAGMA foreign_keys = OFF")  # (a no-op inside a transaction)
        try:
            with self._write() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for step in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[step]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {step + 1}")
                conn.execute(
                    "UPDATE messages SET status = ? WHERE status = ? AND written < ?",
                    (Status.STOPPED, Status.STREAMING, time.time() - STALE_STREAMING_S),
                )
        finally:
            connection.execute("PRAGMA foreign_keys = ON")

    # --- connections and transactions --------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        try:
            conn = sqlite3.connect(
                self._database, uri=self._uri, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise PhichatError(f"{self.path}: cannot open history database: {exc}") from None
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        with self._connections_lock:
            self._connections.append(conn)
        self._local.conn = conn
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
        if self.read_only:
            raise PhichatError(f"{self.path}: the history database is read-only; nothing was saved")
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
        self,
        title: str = "",
        model: str = "",
        device: str = "",
        kind: str = Kind.CHAT,
        role: str | None = None,
        knowledge: str | None = None,
    ) -> Conversation:
        """Start a conversation (kind 'prompt' for a one-shot --prompt exchange), with a role
        (a [roles] name) and a knowledge folder if given."""
        kind = Kind(kind)
        created = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO conversations (title, created, model, device, kind, role, knowledge)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (title, created, model, device, kind, role, knowledge),
            )
        conversation_id = cur.lastrowid or 0
        return Conversation(
            conversation_id,
            title,
            created,
            model,
            device,
            kind,
            updated=created,
            role=role,
            knowledge=knowledge,
        )

    def conversation(self, conversation_id: int) -> Conversation:
        """One conversation; PhichatError if there is none with that id."""
        with self._guard():
            row = (
                self._conn()
                .execute(
                    self._conversation_query + " WHERE c.id = ? GROUP BY c.id", (conversation_id,)
                )
                .fetchone()
            )
        if row is None:
            raise PhichatError(f"no conversation {conversation_id} in {self.path}")
        return _conversation(row)

    def conversations(self, limit: int | None = None, archived: bool = False) -> list[Conversation]:
        """Conversations, pinned ones first, then most recently active first; archived ones
        only when `archived` is true."""
        older = self._conversation_query is _CONVERSATION_QUERY_BEFORE_ROLES  # none archived
        where = "" if archived or older else " WHERE c.archived = 0"
        with self._guard():
            rows = (
                self._conn()
                .execute(
                    self._conversation_query
                    + where
                    + " GROUP BY c.id ORDER BY pinned DESC, updated DESC, c.id DESC LIMIT ?",
                    (-1 if limit is None else limit,),
                )
                .fetchall()
            )
        return [_conversation(row) for row in rows]

    def _set(self, conversation_id: int, column: str, value: Any) -> None:
        """Set one column of a conversation (PhichatError if there is none with that id)."""
        with self._write() as conn:
            cur = conn.execute(
                f"UPDATE conversations SET {column} = ? WHERE id = ?", (value, conversation_id)
            )
        if cur.rowcount == 0:
            raise PhichatError(f"no conversation {conversation_id} in {self.path}")

    def set_role(self, conversation_id: int, role: str | None) -> None:
        """Give a conversation a role (a [roles] name), or none."""
        self._set(conversation_id, "role", role)

    def set_knowledge(self, conversation_id: int, folder: str | None) -> None:
        """Make a folder (an absolute path) a conversation's knowledge, or none."""
        self._set(conversation_id, "knowledge", folder)

    def set_pinned(self, conversation_id: int, pinned: bool) -> None:
        """Pin a conversation to the top of the list, or unpin it."""
        self._set(conversation_id, "pinned", int(pinned))

    def set_archived(self, conversation_id: int, archived: bool) -> None:
        """Archive a conversation out of the list (it is still searched), or restore it."""
        self._set(conversation_id, "archived", int(archived))

    def fork_conversation(self, conversation_id: int, at: int | None = None) -> Conversation:
        """A new conversation holding conversation `conversation_id`'s messages up to message
        `at` (default: its last), those replaced left out, with their vectors and the files
        each carried (attachments); it keeps the parent's title, role and knowledge, and names
        the parent and `at`. The messages keep their times, stats and what each recalled (as the
        fork's own ids), so the fork's prompt is the parent's: a saved state or the KV cache of
        the parent serves it. UsageError when `at` is not a message of that conversation still
        in it."""
        parent = self.conversation(conversation_id)
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {self._message_columns}, written FROM messages"
                " WHERE conversation = ? AND replaced = 0 ORDER BY id",
                (conversation_id,),
            ).fetchall()
            if not rows:
                raise UsageError(f"conversation {conversation_id} has no messages to fork")
            ids = [row["id"] for row in rows]
            at = ids[-1] if at is None else at
            if at not in ids:
                raise UsageError(
                    f"message {at} is not in conversation {conversation_id}"
                    " (or was replaced there): fork at one of its messages"
                )
            rows = rows[: ids.index(at) + 1]
            cur = conn.execute(
                "INSERT INTO conversations (title, created, model, device, kind, role, parent,"
                " forked_at, knowledge) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    parent.title,
                    time.time(),
                    parent.model,
                    parent.device,
                    parent.kind,
                    parent.role,
                    conversation_id,
                    at,
                    parent.knowledge,
                ),
            )
            fork_id = cur.lastrowid or 0
            first = conn.execute(_NEXT_MESSAGE_ID).fetchone()[0]
            new_ids = {row["id"]: first + i for i, row in enumerate(rows)}
            conn.executemany(
                "INSERT INTO messages (id, conversation, role, content, created, tokens,"
                " sampling, tokens_per_s, status, written, model, recalled)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        new_ids[row["id"]],
                        fork_id,
                        row["role"],
                        row["content"],
                        row["created"],
                        row["tokens"],
                        row["sampling"],
                        row["tokens_per_s"],
                        _message(row).status,  # one still streaming is stopped in the fork
                        row["written"],
                        row["model"],
                        _remapped(row["recalled"], new_ids),
                    )
                    for row in rows
                ],
            )
            copies = [(new, old) for old, new in new_ids.items()]
            conn.executemany(
                "INSERT INTO vectors (message, embedder, vector)"
                " SELECT ?, embedder, vector FROM vectors WHERE message = ?",
                copies,
            )
            conn.executemany(
                "INSERT INTO attachments (message, path, first_line, last_line, whole)"
                " SELECT ?, path, first_line, last_line, whole FROM attachments"
                " WHERE message = ? ORDER BY id",
                copies,
            )
        return self.conversation(fork_id)

    def set_title(self, conversation_id: int, title: str) -> None:
        """Rename a conversation."""
        with self._write() as conn:
            conn.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id)
            )

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete a conversation with its messages and their vectors (ON DELETE CASCADE)."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        if cur.rowcount == 0:
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
        status: str = Status.FINISHED,
        model: str | None = None,
        replaces: Sequence[int] = (),
        recalled: Sequence[int] = (),
        attachments: Sequence[Source] = (),
        title: str | None = None,
    ) -> Message:
        """Save one message now (committed on return), marking the messages it `replaces`
        (ids in the same conversation) replaced and recording the `attachments` it carries,
        all in the same transaction; `recalled`: the ids of older messages shown with a user
        message (see phichat.memory). The first user message of an untitled conversation
        gives it its title (from `title`, default its content). An answer still being
        written is added with status STREAMING and saved as it grows with update_message()."""
        role, status = Role(role), Status(status)
        sampling, tokens_per_s = finite(sampling), finite(tokens_per_s)
        created = time.time()
        with self._write() as conn:
            try:
                cur = conn.execute(
                    "INSERT INTO messages (conversation, role, content, created, tokens, sampling,"
                    " tokens_per_s, status, written, model, recalled)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        conversation_id,
                        role,
                        content,
                        created,
                        tokens,
                        _sampling_json(sampling),
                        tokens_per_s,
                        status,
                        created,
                        model,
                        json.dumps(list(recalled)) if recalled else None,
                    ),
                )
            except sqlite3.IntegrityError:
                raise PhichatError(f"no conversation {conversation_id} in {self.path}") from None
            message_id = cur.lastrowid or 0
            conn.executemany(
                "UPDATE messages SET replaced = 1 WHERE id = ? AND conversation = ?",
                [(replaced, conversation_id) for replaced in replaces],
            )
            self._insert_attachments(conn, message_id, attachments)
            if role is Role.USER:
                conn.execute(
                    "UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                    (title_from(content if title is None else title), conversation_id),
                )
        return Message(
            message_id,
            conversation_id,
            role,
            content,
            created,
            tokens,
            sampling,
            tokens_per_s,
            status,
            model=model,
            recalled=tuple(recalled),
        )

    def update_message(
        self,
        message_id: int,
        content: str,
        *,
        status: str = Status.STREAMING,
        tokens: int | None = None,
        sampling: dict[str, Any] | None = None,
        tokens_per_s: float | None = None,
    ) -> None:
        """Save the whole text so far of an answer being written, as it grows: one short
        UPDATE, cheap enough to run every second (a streaming answer joins the word index and
        gets a vector only once it ends). The last call gives its final status, FINISHED or
        STOPPED. Stats left None keep what is stored."""
        status = Status(status)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE messages SET content = ?, status = ?, written = ?,"
                " tokens = coalesce(?, tokens), sampling = coalesce(?, sampling),"
                " tokens_per_s = coalesce(?, tokens_per_s) WHERE id = ?",
                (
                    content,
                    status,
                    time.time(),
                    tokens,
                    _sampling_json(finite(sampling)),
                    finite(tokens_per_s),
                    message_id,
                ),
            )
        if cur.rowcount == 0:
            raise PhichatError(f"no message {message_id} in {self.path}")

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
                    (first + i, conversation_id, Role(role), content, created, created)
                    for i, (role, content) in enumerate(messages)
                ]
                conn.executemany(
                    "INSERT INTO messages (id, conversation, role, content, created, written)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
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

    def known_sources(self, sources: Iterable[str]) -> set[str]:
        """Which of these import sources (see import_conversations) the history holds."""
        known: set[str] = set()
        with self._guard():
            for chunk, marks in _in_chunks(sources):
                rows = self._conn().execute(
                    f"SELECT source FROM conversation_sources WHERE source IN ({marks})", chunk
                )
                known.update(row["source"] for row in rows)
        return known

    def import_conversations(
        self,
        conversations: Sequence[ImportedConversation],
        embedder: str | None = None,
        vectors: Sequence[bytes] | None = None,
    ) -> dict[str, int]:
        """Add conversations with their messages, what each carried (and float32 vector blobs
        for `embedder`, one per message in order, if given) in one transaction, leaving out
        those whose source the history holds already; returns the new conversations' ids by
        source. An untitled conversation is named after its first user message."""
        added: dict[str, int] = {}
        at = 0  # where each conversation's vectors start
        with self._write() as conn:
            next_id = conn.execute(_NEXT_MESSAGE_ID).fetchone()[0]
            for conversation in conversations:
                messages = conversation.messages
                blobs = None if vectors is None else vectors[at : at + len(messages)]
                at += len(messages)
                if conn.execute(
                    "SELECT 1 FROM conversation_sources WHERE source = ?", (conversation.source,)
                ).fetchone():
                    continue
                first_user = next((m.content for m in messages if m.role is Role.USER), "")
                cur = conn.execute(
                    "INSERT INTO conversations (title, created) VALUES (?, ?)",
                    (conversation.title or title_from(first_user), conversation.created),
                )
                conversation_id = cur.lastrowid
                conn.execute(
                    "INSERT INTO conversation_sources (source, conversation) VALUES (?, ?)",
                    (conversation.source, conversation_id),
                )
                ids = range(next_id, next_id + len(messages))
                next_id += len(messages)
                conn.executemany(
                    "INSERT INTO messages (id, conversation, role, content, created, written,"
                    " replaced) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        (i, conversation_id, m.role, m.content, m.created, m.created, m.replaced)
                        for i, m in zip(ids, messages, strict=True)
                    ),
                )
                for i, m in zip(ids, messages, strict=True):
                    self._insert_attachments(conn, i, m.attachments)
                if blobs is not None:
                    conn.executemany(
                        "INSERT INTO vectors (message, embedder, vector) VALUES (?, ?, ?)",
                        ((i, embedder, blob) for i, blob in zip(ids, blobs, strict=True)),
                    )
                added[conversation.source] = conversation_id or 0
        return added

    def messages(self, conversation_id: int) -> list[Message]:
        """A conversation's messages, oldest first."""
        with self._guard():
            rows = (
                self._conn()
                .execute(
                    f"SELECT {self._message_columns} FROM messages"
                    " WHERE conversation = ? ORDER BY id",
                    (conversation_id,),
                )
                .fetchall()
            )
        return [_message(row) for row in rows]

    def messages_by_id(self, ids: Iterable[int]) -> dict[int, Message]:
        """The messages with these ids (missing ids are left out)."""
        found: dict[int, Message] = {}
        with self._guard():
            for chunk, marks in _in_chunks(ids):
                for row in self._conn().execute(
                    f"SELECT {self._message_columns} FROM messages WHERE id IN ({marks})", chunk
                ):
                    found[row["id"]] = _message(row)
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
        return [row["id"] for row in rows]

    def neighbours(self, ids: Iterable[int]) -> dict[int, tuple[int | None, int | None]]:
        """For each of these message ids, the ids of the messages just before and just after
        it in its conversation (None at either end; missing ids are left out)."""
        found: dict[int, tuple[int | None, int | None]] = {}
        with self._guard():
            for chunk, marks in _in_chunks(ids):
                for row in self._conn().execute(
                    "SELECT m.id,"
                    " (SELECT max(p.id) FROM messages p"
                    "  WHERE p.conversation = m.conversation AND p.id < m.id) AS before,"
                    " (SELECT min(n.id) FROM messages n"
                    "  WHERE n.conversation = m.conversation AND n.id > m.id) AS after"
                    f" FROM messages m WHERE m.id IN ({marks})",
                    chunk,
                ):
                    found[row["id"]] = (row["before"], row["after"])
        return found

    def keyword_search(
        self,
        text: str,
        limit: int = 50,
        conversation_id: int | None = None,
        max_docs: int = RARE_DOCS,
    ) -> list[tuple[int, float]]:
        """(message id, BM25 score) for messages holding every quoted phrase and any other
        word of `text` (stemmed: "reverse" finds "reverses"), best first; the score is FTS5's
        bm25 negated, so higher is better. Any user text is safe: terms are quoted.

        Ranking costs time per matching message, so a term found in more than `max_docs`
        messages is left out: a common word says little about which message is meant (its
        inverse document frequency is low), and meaning finds such messages."""
        with self._guard():
            conn = self._conn()
            query = _rare_words(conn, "messages_fts", text, max_docs)
            if query is None:
                return []
            sql = "SELECT f.rowid AS message, f.rank AS rank FROM messages_fts f"
            params: list[Any] = [query]
            if conversation_id is None:
                sql += " WHERE messages_fts MATCH ?"
            else:
                sql += (
                    " JOIN messages m ON m.id = f.rowid"
                    " WHERE messages_fts MATCH ? AND m.conversation = ?"
                )
                params.append(conversation_id)
            rows = conn.execute(sql + " ORDER BY f.rank LIMIT ?", [*params, limit])
            return [(row["message"], -row["rank"]) for row in rows]

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
        """Messages that have no vector for `embedder` yet (saved while it was unavailable);
        an answer still being written waits until it ends."""
        with self._guard():
            rows = (
                self._conn()
                .execute(
                    f"SELECT {self._message_columns} FROM messages m"
                    " WHERE status != ? AND NOT EXISTS"
                    " (SELECT 1 FROM vectors v WHERE v.embedder = ? AND v.message = m.id)"
                    " ORDER BY id LIMIT ?",
                    (Status.STREAMING, embedder, limit),
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
                yield (
                    rows[-1]["id"],
                    [row["message"] for row in rows],
                    b"".join([row["vector"] for row in rows]),
                )

    # --- files: indexed folders and attached files, in chunks ---------------------------

    def indexed_files(self, root: str) -> dict[str, IndexedFile]:
        """The files indexed under folder `root` ('' for attached files), by path."""
        with self._guard():
            rows = self._conn().execute(
                "SELECT id, path, size, mtime_ns, sha256 FROM files WHERE root = ?", (root,)
            )
            return {row["path"]: IndexedFile(*row) for row in rows}

    def indexed_file(self, path: str) -> IndexedFile | None:
        """The file indexed at `path`, if any."""
        with self._guard():
            row = (
                self._conn()
                .execute(
                    "SELECT id, path, size, mtime_ns, sha256 FROM files WHERE path = ?", (path,)
                )
                .fetchone()
            )
        return None if row is None else IndexedFile(*row)

    def save_file(
        self,
        path: str,
        root: str | None,
        size: int,
        mtime_ns: int,
        sha256: str,
        chunks: Sequence[tuple[int, int, str]],
    ) -> int:
        """Index a file's (first line, last line, text) chunks in place of what it held, in
        one transaction (never half a file), under folder `root` (None: where it was, else
        '': an attached file); returns its id."""
        with self._write() as conn:
            if root is None:
                row = conn.execute("SELECT root FROM files WHERE path = ?", (path,)).fetchone()
                root = "" if row is None else row["root"]
            conn.execute(
                "DELETE FROM chunks WHERE file IN (SELECT id FROM files WHERE path = ?)", (path,)
            )
            conn.execute("DELETE FROM files WHERE path = ?", (path,))
            cur = conn.execute(
                "INSERT INTO files (path, root, size, mtime_ns, sha256, indexed)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (path, root, size, mtime_ns, sha256, time.time()),
            )
            file_id = cur.lastrowid or 0
            conn.executemany(
                "INSERT INTO chunks (file, first_line, last_line, content) VALUES (?, ?, ?, ?)",
                ((file_id, first, last, text) for first, last, text in chunks),
            )
        return file_id

    def touch_file(self, file_id: int, size: int, mtime_ns: int, root: str | None = None) -> None:
        """Record a file's new size and mtime (its content unchanged); under `root` if given."""
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET size = ?, mtime_ns = ?, root = coalesce(?, root) WHERE id = ?",
                (size, mtime_ns, root, file_id),
            )

    def forget_files(self, file_ids: Iterable[int]) -> None:
        """Drop these files from the index, with their chunks and vectors."""
        with self._write() as conn:
            for chunk, marks in _in_chunks(file_ids):
                conn.execute(f"DELETE FROM chunks WHERE file IN ({marks})", chunk)
                conn.execute(f"DELETE FROM files WHERE id IN ({marks})", chunk)

    def chunk_ids(self, file_ids: Iterable[int] | None = None) -> list[int]:
        """Ids of these files' chunks (None: of every file under an indexed folder), in order."""
        with self._guard():
            conn = self._conn()
            if file_ids is None:
                rows = conn.execute(
                    "SELECT c.id FROM chunks c JOIN files f ON f.id = c.file"
                    " WHERE f.root != '' ORDER BY c.id"
                )
                return [row["id"] for row in rows]
            found: list[int] = []
            for chunk, marks in _in_chunks(file_ids):
                rows = conn.execute(f"SELECT id FROM chunks WHERE file IN ({marks})", chunk)
                found += [row["id"] for row in rows]
            return sorted(found)

    def chunks_by_id(self, ids: Iterable[int]) -> dict[int, Chunk]:
        """The chunks with these ids, with their file's path (missing ids are left out)."""
        found: dict[int, Chunk] = {}
        with self._guard():
            for chunk, marks in _in_chunks(ids):
                for row in self._conn().execute(
                    "SELECT c.id, c.file, f.path, c.first_line, c.last_line, c.content"
                    f" FROM chunks c JOIN files f ON f.id = c.file WHERE c.id IN ({marks})",
                    chunk,
                ):
                    found[row["id"]] = Chunk(*row)
        return found

    def chunk_files(self, ids: Iterable[int]) -> dict[int, int]:
        """The file of each of these chunk ids (missing ids are left out)."""
        found: dict[int, int] = {}
        with self._guard():
            for chunk, marks in _in_chunks(ids):
                rows = self._conn().execute(
                    f"SELECT id, file FROM chunks WHERE id IN ({marks})", chunk
                )
                found.update((row["id"], row["file"]) for row in rows)
        return found

    def chunk_keyword_search(
        self, text: str, limit: int, file_ids: Sequence[int] | None = None
    ) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) for chunks matching `text` as keyword_search matches messages,
        best first; within these files, or (None) every file under an indexed folder."""
        sql = (
            "SELECT s.rowid AS chunk, s.rank AS rank FROM chunks_fts s"
            " JOIN chunks c ON c.id = s.rowid JOIN files f ON f.id = c.file"
            " WHERE chunks_fts MATCH ? AND {files} ORDER BY s.rank LIMIT ?"
        )
        with self._guard():
            conn = self._conn()
            query = _rare_words(conn, "chunks_fts", text, RARE_DOCS)
            if query is None:
                return []
            if file_ids is None:
                rows = conn.execute(sql.format(files="f.root != ''"), [query, limit])
                return [(row["chunk"], -row["rank"]) for row in rows]
            found: list[tuple[int, float]] = []
            for chunk, marks in _in_chunks(file_ids):
                rows = conn.execute(sql.format(files=f"f.id IN ({marks})"), [query, *chunk, limit])
                found += [(row["chunk"], -row["rank"]) for row in rows]
            return sorted(found, key=lambda hit: -hit[1])[:limit]

    def chunks_without_vectors(
        self, embedder: str | None, limit: int = 256, file_ids: Sequence[int] | None = None
    ) -> list[tuple[int, str]]:
        """(chunk id, text) of chunks (of these files, if given) that have no vector for
        `embedder` (None: for any embedder) yet, oldest first."""
        sql = (
            "SELECT id, content FROM chunks c WHERE NOT EXISTS (SELECT 1 FROM chunk_vectors v"
            " WHERE coalesce(?, v.embedder) = v.embedder AND v.chunk = c.id){files}"
            " ORDER BY id LIMIT ?"
        )
        with self._guard():
            conn = self._conn()
            if file_ids is None:
                rows = conn.execute(sql.format(files=""), [embedder, limit])
                return [(row["id"], row["content"]) for row in rows]
            found: list[tuple[int, str]] = []
            for chunk, marks in _in_chunks(file_ids):
                rows = conn.execute(
                    sql.format(files=f" AND file IN ({marks})"), [embedder, *chunk, limit]
                )
                found += [(row["id"], row["content"]) for row in rows]
            return sorted(found)[:limit]

    def add_chunk_vectors(self, embedder: str, vectors: Iterable[tuple[int, bytes]]) -> None:
        """Store (chunk id, float32 vector blob) pairs for `embedder` in one transaction; a
        chunk deleted meanwhile (its file indexed again) is skipped."""
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO chunk_vectors (chunk, embedder, vector)"
                " SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM chunks WHERE id = ?)",
                ((chunk, embedder, blob, chunk) for chunk, blob in vectors),
            )

    def chunk_vector_ids(self, embedder: str) -> list[int]:
        """The ids of every chunk with a vector for `embedder`, ascending (read from the
        index alone: no vector is read)."""
        with self._guard():
            rows = self._conn().execute(
                "SELECT chunk FROM chunk_vectors WHERE embedder = ? ORDER BY chunk", (embedder,)
            )
            return [row[0] for row in rows]

    def chunk_vectors(self, embedder: str, ids: Iterable[int]) -> tuple[list[int], bytes]:
        """Those of these chunk ids that have a vector for `embedder`, and their float32 blobs
        joined in the same order."""
        found: list[int] = []
        blobs: list[bytes] = []
        with self._guard():
            for chunk, marks in _in_chunks(ids):
                for row in self._conn().execute(
                    "SELECT chunk, vector FROM chunk_vectors"
                    f" WHERE embedder = ? AND chunk IN ({marks})",
                    [embedder, *chunk],
                ):
                    found.append(row["chunk"])
                    blobs.append(row["vector"])
        return found, b"".join(blobs)

    def _insert_attachments(
        self, conn: sqlite3.Connection, message_id: int, attachments: Sequence[Source]
    ) -> None:
        """Record what a message carried, in the caller's transaction."""
        try:
            conn.executemany(
                "INSERT INTO attachments (message, path, first_line, last_line, whole)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (message_id, a.path, a.first_line, a.last_line, int(a.whole))
                    for a in attachments
                ],
            )
        except sqlite3.IntegrityError as exc:
            raise PhichatError(f"{self.path}: an attachment could not be saved: {exc}") from None

    def attachments(self, message_ids: Iterable[int]) -> dict[int, list[Source]]:
        """What each of these messages carried, in the order attached."""
        found: dict[int, list[Source]] = {}
        if self.read_only and not self._has_table("attachments"):
            return found
        with self._guard():
            for chunk, marks in _in_chunks(message_ids):
                for row in self._conn().execute(
                    "SELECT message, path, first_line, last_line, whole FROM attachments"
                    f" WHERE message IN ({marks}) ORDER BY id",
                    chunk,
                ):
                    found.setdefault(row["message"], []).append(
                        Source(row["path"], row["first_line"], row["last_line"], bool(row["whole"]))
                    )
        return found

    def _has_table(self, name: str) -> bool:
        with self._guard():
            return bool(
                self._conn()
                .execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
                .fetchone()
            )
