"""Files in the chat: text files read safely, split at natural boundaries, folders kept indexed
in the history database, and the chunks that best answer a question, found by the history's
own ranking (memory.rank: BM25 and cosine as z-scores, each chunk also joined with the one
before or after it in its file) within a token budget.

A file is indexed whole or not at all (one transaction each); it is read again only when its
size or mtime changed, and chunked again only when its content hash did. Vectors come after
the words, in batches, so an interrupted `phichat index` leaves every file searchable by its
words and the rest of the vectors for the next run.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from phichat.errors import PhichatError, UsageError
from phichat.store import Chunk, Source, Store, check_search_text

if TYPE_CHECKING:
    import numpy as np

    from phichat.memory import Encoder, VectorIndex

MAX_FILE_BYTES = 4 << 20  # a bigger file is no text to chat about (logs, dumps, data)
MAX_MATCHES = 1000  # files one attachment (a glob) may bring
SNIFF_BYTES = 8192  # a NUL byte in the first this many makes a file binary
CHUNK_CHARS = 1000  # about 250 tokens: within the embedder's 256 wordpieces
EMBED_BATCH = 64  # chunks embedded (and committed) at a time
STDIN = "-"
STDIN_NAME = "<stdin>"
# A line that starts a new part: a Markdown heading, a top-level def or class, a decorator.
BOUNDARY = re.compile(r"(#{1,6}\s|(async\s+)?def\s|class\s|@\w)")


class FileProblem(UsageError):
    """A file that cannot be attached or indexed, said in one line naming it."""

    def __init__(self, name: str, why: str, exit_code: int = 2) -> None:
        super().__init__(f"{name}: {why}")
        self.exit_code = exit_code
        self.binary = why == BINARY


BINARY = "is a binary file, not text"


@dataclass(frozen=True)
class TextFile:
    """A text file as read: `name` as shown, `key` as indexed (its absolute path)."""

    name: str
    key: str
    text: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Part:
    """Attached text: a whole file or one chunk of it, and where it came from."""

    source: Source
    text: str


# --- reading --------------------------------------------------------------------------------


def decode(data: bytes, name: str) -> str:
    """`data` as text: FileProblem for a binary file (a NUL byte) or invalid UTF-8."""
    if b"\0" in data[:SNIFF_BYTES]:
        raise FileProblem(name, BINARY)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise FileProblem(name, "is not valid UTF-8 text") from None


def read_text_file(path: Path, name: str | None = None) -> TextFile:
    """A regular text file of at most MAX_FILE_BYTES; anything else is one FileProblem."""
    name = name or str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        why = "is a broken symlink" if path.is_symlink() else "no such file"
        raise FileProblem(name, why) from None
    except OSError as exc:
        raise FileProblem(name, f"cannot read it: {exc.strerror or exc}", 1) from None
    if stat.S_ISDIR(info.st_mode):
        raise FileProblem(name, "is a directory (phichat index DIR indexes a folder)")
    if not stat.S_ISREG(info.st_mode):
        raise FileProblem(name, "is not a regular file (a FIFO, socket or device)")
    if info.st_size > MAX_FILE_BYTES:
        raise FileProblem(name, f"is over the {MAX_FILE_BYTES >> 20} MiB cap for a text file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise FileProblem(name, f"cannot read it: {exc.strerror or exc}", 1) from None
    if len(data) > MAX_FILE_BYTES:
        raise FileProblem(name, f"is over the {MAX_FILE_BYTES >> 20} MiB cap for a text file")
    text = decode(data, name)
    digest = hashlib.sha256(data).hexdigest()
    return TextFile(name, str(path.absolute()), text, len(data), info.st_mtime_ns, digest)


def read_stdin() -> TextFile:
    """Standard input as an attached text file."""
    if sys.stdin is None:
        raise FileProblem(STDIN_NAME, "stdin is closed")
    try:
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise FileProblem(STDIN_NAME, f"cannot read it: {exc.strerror or exc}", 1) from None
    if len(data) > MAX_FILE_BYTES:
        raise FileProblem(STDIN_NAME, f"is over the {MAX_FILE_BYTES >> 20} MiB cap")
    text = decode(data, STDIN_NAME)
    return TextFile(STDIN_NAME, STDIN_NAME, text, len(data), 0, hashlib.sha256(data).hexdigest())


def expand(pattern: str, warn: Callable[[PhichatError], None]) -> list[Path]:
    """The files a name or glob (`src/*.py`, `**/*.md`) names, sorted, each once; FileProblem
    for a glob that matches nothing or more than MAX_MATCHES files (counted no further than
    that). A `**` that goes round a directory loop (a symlink back up) is said to `warn`."""
    pattern = os.path.expanduser(pattern)
    if not glob.has_magic(pattern):
        return [Path(pattern)]
    found = itertools.islice(glob.iglob(pattern, recursive=True), MAX_MATCHES * 10 + 1)
    files: dict[str, Path] = {}  # by real path: a file reached again through a loop is one
    looped = False
    for name in found:
        if not os.path.isdir(name):
            real = os.path.realpath(name)
            if real in files:
                looped = looped or _through_loop(Path(name))
            else:
                files[real] = Path(name)
                if len(files) > MAX_MATCHES:
                    break
    if not files:
        raise FileProblem(pattern, "matches no file")
    if len(files) > MAX_MATCHES:
        raise FileProblem(pattern, f"matches more than {MAX_MATCHES:,} files")
    if looped:
        warn(
            FileProblem(pattern, "goes round a directory loop (a symlink back up): each file once")
        )
    return sorted(files.values())


def _through_loop(path: Path) -> bool:
    """Whether `path` passes through a folder that is one of its own parents."""
    seen: set[str] = set()
    for parent in reversed(path.parents):
        real = os.path.realpath(parent)
        if real in seen:
            return True
        seen.add(real)
    return False


def read_attachments(names: Sequence[str], warn: Callable[[PhichatError], None]) -> list[TextFile]:
    """The text files these names and globs (`-`: stdin) name, each once, in order; each
    that cannot be read is passed to `warn` and left out, the others read on."""
    files: list[TextFile] = []
    seen: set[str] = set()
    for name in names:
        try:
            paths = [None] if name == STDIN else expand(name, warn)
        except FileProblem as exc:
            warn(exc)
            continue
        for path in paths:
            try:
                file = read_stdin() if path is None else read_text_file(path)
            except FileProblem as exc:
                warn(exc)
                continue
            if file.key not in seen:
                seen.add(file.key)
                files.append(file)
    return files


# --- chunks ---------------------------------------------------------------------------------


def split(text: str) -> list[tuple[int, int, str]]:
    """`text` as (first line, last line, text) chunks of at most about CHUNK_CHARS, cut at
    natural boundaries: before a heading or a top-level def or class (with its decorators),
    at a blank line, else between lines (a longer line alone is cut in pieces). A small text
    is one chunk; blank lines at a chunk's ends are left out of it."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and not lines[-1]:
        lines.pop()
    if len(text) <= CHUNK_CHARS:
        return _trimmed(lines, 0, len(lines))
    starts = [0]  # where each block (a run of lines between natural boundaries) starts
    for i in range(1, len(lines)):
        line, before = lines[i], lines[i - 1]
        heads = BOUNDARY.match(line) and not before.startswith("@")  # decorators stay with it
        if heads or (line.strip() and not before.strip()):
            starts.append(i)
    chunks: list[tuple[int, int, str]] = []
    begin, size = 0, 0  # the chunk being filled: its first line, its length
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        block = sum(len(line) + 1 for line in lines[start:end])
        opens = bool(BOUNDARY.match(lines[start]))
        if size and (size + block > CHUNK_CHARS or (opens and size >= CHUNK_CHARS // 2)):
            chunks += _trimmed(lines, begin, start)
            begin, size = start, 0
        if block <= CHUNK_CHARS:
            size += block
            continue
        for at in range(start, end):  # a long block: lines packed, a long line cut
            length = len(lines[at]) + 1
            if size and size + length > CHUNK_CHARS:
                chunks += _trimmed(lines, begin, at)
                begin, size = at, 0
            if length > CHUNK_CHARS:
                line = lines[at]
                pieces = range(0, len(line), CHUNK_CHARS)
                chunks += [(at + 1, at + 1, line[p : p + CHUNK_CHARS]) for p in pieces]
                begin, size = at + 1, 0
            else:
                size += length
    chunks += _trimmed(lines, begin, len(lines))
    return chunks


def _trimmed(lines: list[str], begin: int, end: int) -> list[tuple[int, int, str]]:
    """Lines begin..end-1 as a chunk without blank lines at either end (none if all blank)."""
    while begin < end and not lines[begin].strip():
        begin += 1
    while end > begin and not lines[end - 1].strip():
        end -= 1
    return [(begin + 1, end, "\n".join(lines[begin:end]))] if begin < end else []


# --- folders --------------------------------------------------------------------------------


@dataclass
class FolderReport:
    """What indexing a folder did."""

    indexed: int = 0
    chunks: int = 0
    unchanged: int = 0
    removed: int = 0
    binary: int = 0
    problems: int = 0
    stopped: bool = False  # before the end: the rest is indexed next time

    def __str__(self) -> str:
        files = "file" if self.indexed == 1 else "files"
        parts = [f"{self.indexed} {files} indexed ({self.chunks} chunks)"]
        parts += [f"{self.unchanged} unchanged"] if self.unchanged else []
        parts += [f"{self.removed} removed"] if self.removed else []
        parts += [f"{self.binary} binary skipped"] if self.binary else []
        parts += [f"{self.problems} skipped (said above)"] if self.problems else []
        parts += ["stopped before the end"] if self.stopped else []
        return ", ".join(parts)


def walk(root: Path, warn: Callable[[PhichatError], None]) -> Iterator[Path]:
    """Every file under `root` that no .gitignore on the way ignores (nor .git itself), in a
    stable order. Symlinked folders are followed once: a loop back into a folder already
    walked is passed to `warn` and not entered again."""
    import pathspec

    visited: set[tuple[int, int]] = set()
    specs: list[tuple[Path, pathspec.GitIgnoreSpec]] = []

    def ignored(path: Path, is_dir: bool) -> bool:
        for base, spec in reversed(specs):  # the deepest .gitignore that says decides
            if path.is_relative_to(base):
                rel = path.relative_to(base).as_posix() + ("/" if is_dir else "")
                verdict = spec.check_file(rel).include
                if verdict is not None:
                    return verdict
        return False

    def visit(folder: Path) -> Iterator[Path]:
        try:
            info = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            warn(FileProblem(str(folder), f"cannot read it: {exc.strerror or exc}", 1))
            return
        if (info.st_dev, info.st_ino) in visited:
            warn(FileProblem(str(folder), "is a directory loop (a symlink back up): skipped"))
            return
        visited.add((info.st_dev, info.st_ino))
        depth = len(specs)
        gitignore = folder / ".gitignore"
        if gitignore.is_file():
            try:
                lines = gitignore.read_text("utf-8", "replace").splitlines()
                specs.append((folder, pathspec.GitIgnoreSpec.from_lines(lines)))
            except OSError as exc:
                warn(FileProblem(str(gitignore), f"cannot read it: {exc.strerror or exc}", 1))
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows a symlink
            except OSError:
                is_dir = False
            if entry.name == ".git" or ignored(path, is_dir):
                continue
            if is_dir:
                yield from visit(path)
            else:
                yield path
        del specs[depth:]

    yield from visit(root)


def check_folder(folder: Path) -> None:
    """UsageError for a path that is no folder."""
    if not folder.is_dir():
        why = "no such folder" if not folder.exists() else "is not a folder"
        raise UsageError(f"{folder}: {why}")


def index_folder(
    store: Store,
    folder: Path,
    warn: Callable[[PhichatError], None],
    stop: threading.Event | None = None,
) -> FolderReport:
    """Bring the files index of `folder` up to date: new and changed text files indexed (one
    transaction each), unchanged ones (size and mtime, else content hash) left, files gone
    dropped. Binary files are counted; every other file that cannot be indexed goes to `warn`.
    `stop` set: it ends after the file being indexed (the rest, and files gone, left for the
    next time)."""
    check_folder(folder)
    root = folder.absolute()
    known = store.indexed_files(str(root))
    kept: set[str] = set()
    report = FolderReport()

    def problem(exc: PhichatError) -> None:
        report.problems += 1
        warn(exc)

    for path in walk(root, problem):
        if stop is not None and stop.is_set():
            report.stopped = True
            return report
        key = str(path)
        old = known.get(key)
        try:
            info = path.stat()
        except OSError:
            info = None  # read_text_file says why, in one line
        if old and info and (old.size, old.mtime_ns) == (info.st_size, info.st_mtime_ns):
            kept.add(key)
            report.unchanged += 1
            continue
        try:
            file = read_text_file(path, str(path))
        except FileProblem as exc:
            if exc.binary:
                report.binary += 1
            else:
                problem(exc)
            continue
        kept.add(key)
        existing = old or store.indexed_file(key)
        if existing is not None and existing.sha256 == file.sha256:
            store.touch_file(existing.id, file.size, file.mtime_ns, str(root))
            report.unchanged += 1
            continue
        chunks = split(file.text)
        store.save_file(key, str(root), file.size, file.mtime_ns, file.sha256, chunks)
        report.indexed += 1
        report.chunks += len(chunks)
    gone = [f.id for key, f in known.items() if key not in kept]
    if gone:
        store.forget_files(gone)
    report.removed = len(gone)
    return report


def embed_chunks(
    store: Store,
    embedder: Encoder,
    progress: Callable[[int], None] | None = None,
    file_ids: Sequence[int] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Embed every indexed chunk (of these files, if given) that has no vector for `embedder`
    yet, EMBED_BATCH at a time (each batch committed; `stop` set: none after the one being
    embedded); returns how many."""
    done = 0
    model_id = embedder.model_id
    while not (stop is not None and stop.is_set()) and (
        batch := store.chunks_without_vectors(model_id, EMBED_BATCH, file_ids)
    ):
        vectors = embedder.encode([text for _, text in batch])
        store.add_chunk_vectors(
            embedder.model_id, ((i, v.tobytes()) for (i, _), v in zip(batch, vectors, strict=True))
        )
        done += len(batch)
        if progress is not None:
            progress(len(batch))
    return done


# --- finding chunks -------------------------------------------------------------------------


class ChunkVectors:
    """Every chunk vector the database holds for one embedder, kept in memory from one search
    to the next. Each use brings it in line with the database by the chunk ids alone: the
    vectors of chunks gone (a file indexed again or dropped, a folder forgotten) are let go,
    and only new ones are read. A chunk's text never changes (a changed file gets new chunk
    rows, and their ids are never given twice), so a vector kept is never stale. Safe to
    share between threads."""

    def __init__(self, store: Store, embedder: Encoder) -> None:
        from phichat.memory import VectorIndex

        self.store, self.embedder = store, embedder
        self._index = VectorIndex(embedder.dim)
        self._lock = threading.Lock()

    def current(self) -> VectorIndex:
        """The vectors as the database holds them now, by chunk id in ascending order; the
        index returned is never changed (what changes makes a new one)."""
        import numpy as np

        from phichat.memory import VectorIndex

        model_id, dim = self.embedder.model_id, self.embedder.dim
        with self._lock:
            index = self._index
            ids = np.array(self.store.chunk_vector_ids(model_id), dtype=np.int64)
            if np.array_equal(ids, index.ids):
                return index
            staying = np.flatnonzero(np.isin(index.ids, ids))
            new = ids[~np.isin(ids, index.ids)].tolist()
            found, blob = self.store.chunk_vectors(model_id, new) if new else ([], b"")
            read = np.frombuffer(blob, dtype=np.float32).reshape(len(found), dim)
            all_ids = np.concatenate([index.ids[staying], np.array(found, dtype=np.int64)])
            vectors = np.concatenate([index.vectors(staying), read])
            order = np.argsort(all_ids, kind="stable")
            self._index = VectorIndex(dim, len(all_ids))
            self._index.add(all_ids[order], vectors[order])
            return self._index


class ChunkSearch:
    """The chunks of some files (or of every indexed folder), ranked for a question as the
    history is: the best SEARCH_DEPTH by words and by meaning, with the chunks beside them in
    their file, scored by memory.rank. `kept`: the vectors kept between searches, used when
    they are this store's and this embedder's (else the files' vectors are read for this one)."""

    def __init__(
        self,
        store: Store,
        embedder: Encoder | None,
        file_ids: Sequence[int] | None = None,
        kept: ChunkVectors | None = None,
    ) -> None:
        import numpy as np

        from phichat.memory import VectorIndex

        self.store, self.embedder, self.file_ids = store, embedder, file_ids
        self.index = VectorIndex(embedder.dim if embedder else 0)
        self.rows: np.ndarray | None = None  # the files' rows in the index (None: all of it)
        if embedder is None:
            return
        if kept is not None and kept.store is store and kept.embedder.model_id == embedder.model_id:
            self.index = kept.current()
            if file_ids is not None:  # else every chunk is searched
                rows = self.index.rows(store.chunk_ids(file_ids))
                rows = rows[rows >= 0]
                self.rows = rows if len(rows) < len(self.index) else None
        else:
            ids, blob = store.chunk_vectors(embedder.model_id, store.chunk_ids(file_ids))
            vectors = np.frombuffer(blob, dtype=np.float32).reshape(len(ids), embedder.dim)
            self.index.add(ids, vectors)

    def rank(self, text: str) -> list[int]:
        """Chunk ids, best first, for `text`."""
        import numpy as np

        from phichat.memory import SEARCH_DEPTH, rank

        query = None if self.embedder is None else self.embedder.encode([text])[0]
        matched = dict(self.store.chunk_keyword_search(text, SEARCH_DEPTH, self.file_ids))
        near = [] if query is None else self.index.search(query, SEARCH_DEPTH, self.rows)
        found = {*matched, *(i for i, _ in near)}
        files = self.store.chunk_files({i + step for i in found for step in (-1, 0, 1)})
        around = {i + s for i in found for s in (-1, 1) if files.get(i + s) == files.get(i)}
        ids = sorted(i for i in found | around if i in files)
        at = {chunk: position for position, chunk in enumerate(ids)}

        def beside(step: int) -> np.ndarray:
            return np.array(
                [
                    at[i + step] if files.get(i + step) == files[i] and i + step in at else p
                    for p, i in enumerate(ids)
                ],
                dtype=int,
            )

        similarity = np.full(len(ids), np.nan)
        if query is not None and ids:
            rows = self.index.rows(ids)
            known = rows >= 0
            similarity[known] = self.index.vectors(rows[known]) @ query
        words = np.array([matched.get(i, 0.0) for i in ids], dtype=np.float64)
        scores = rank(similarity, words, beside(-1), beside(1))
        return [ids[n] for n in np.argsort(-scores, kind="stable")]

    def search(self, text: str, k: int) -> list[Chunk]:
        """The k chunks that best match `text`, best first (`phichat search --files`).
        UsageError for a query with no word in it (it would match everything)."""
        check_search_text(text)
        ranked = self.rank(text)[:k]
        chunks = self.store.chunks_by_id(ranked)
        return [chunks[chunk_id] for chunk_id in ranked if chunk_id in chunks]

    def within(self, text: str, budget: int, count_tokens: Callable[[str], int]) -> list[Part]:
        """The best chunks for `text` that fit in `budget` tokens (as attach_text shows them),
        in file and line order."""
        ranked = self.rank(text)
        chunks = self.store.chunks_by_id(ranked)
        chosen: list[Part] = []
        for chunk_id in ranked:
            chunk = chunks[chunk_id]
            part = Part(Source(chunk.path, chunk.first_line, chunk.last_line, False), chunk.content)
            cost = count_tokens(attach_text([part]))
            if cost <= budget:
                chosen.append(part)
                budget -= cost
        return sorted(chosen, key=lambda p: (p.source.path, p.source.first_line))


def folder_parts(
    store: Store,
    folder: str,
    question: str,
    budget: int,
    count_tokens: Callable[[str], int],
    embedder: Encoder | None,
    kept: ChunkVectors | None = None,
    embed: bool = True,
) -> list[Part]:
    """The chunks of indexed folder `folder` (an absolute path, indexed by index_folder) most
    relevant to `question` that fit in `budget` tokens, named by their path in the folder;
    chunks still without a vector are embedded first (`kept`, `embed`: see best_parts)."""
    ids = [file.id for file in store.indexed_files(folder).values()]
    if not ids or budget <= 0:
        return []
    name = functools.partial(os.path.relpath, start=folder)
    return best_parts(store, ids, question, budget, count_tokens, embedder, kept, name, embed)


def best_parts(
    store: Store,
    file_ids: Sequence[int],
    question: str,
    budget: int,
    count_tokens: Callable[[str], int],
    embedder: Encoder | None,
    kept: ChunkVectors | None,
    name: Callable[[str], str],
    embed: bool = True,
) -> list[Part]:
    """The chunks of these indexed files most relevant to `question` that fit in `budget`
    tokens (their chunks still without a vector embedded first), each named `name(its path)`
    (`kept`: see ChunkSearch). `embed` off: none while a chunk of theirs has no vector."""
    if embedder is not None:
        if embed:
            embed_chunks(store, embedder, file_ids=file_ids)
        elif store.chunks_without_vectors(embedder.model_id, 1, file_ids):
            return []
    parts = ChunkSearch(store, embedder, file_ids, kept).within(question, budget, count_tokens)
    return [Part(replace(p.source, path=name(p.source.path)), p.text) for p in parts]


# --- attaching ------------------------------------------------------------------------------


def attach_text(parts: Sequence[Part]) -> str:
    """Attached parts as they go into a message: each marked with its source, fenced as data."""
    blocks = []
    for part in parts:
        ticks = max((len(run) for run in re.findall(r"`+", part.text)), default=0)
        fence = "`" * max(3, ticks + 1)
        blocks.append(f"[Attached: {part.source}]\n{fence}\n{part.text}\n{fence}")
    return "\n\n".join(blocks)


def whole_part(file: TextFile) -> Part:
    """All of `file`, as it goes into a message when it fits."""
    lines = max(1, file.text.rstrip("\n").count("\n") + 1)
    return Part(Source(file.name, 1, lines, True), file.text)


def with_attachments(text: str, parts: Sequence[Part]) -> str:
    """A user message with its attachments before its text."""
    return f"{attach_text(parts)}\n\n{text}" if parts else text


def written_text(content: str, parts: int) -> str:
    """What the user wrote of a message `content` that carries `parts` attached parts before
    it (as with_attachments put them there); `content` itself where they are not there."""
    rest = content
    for _ in range(parts):
        header, _, rest = rest.partition("\n")
        fence, _, rest = rest.partition("\n")  # no run of backticks in the part is this long
        end = rest.find(f"\n{fence}\n\n")
        if not header.startswith("[Attached: ") or len(fence) < 3 or fence.strip("`") or end < 0:
            return content
        rest = rest[end + len(fence) + 3 :]
    return rest


def fit_files(
    files: Sequence[TextFile],
    question: str,
    budget: int,
    count_tokens: Callable[[str], int],
    store: Store,
    embedder: Callable[[], Encoder | None],
    kept: ChunkVectors | None = None,
) -> list[Part]:
    """What of `files` goes with `question` in `budget` tokens: every file whole if they all
    fit; else each file is indexed (as an attached file, in `store`) and the chunks most
    relevant to the question go in (`embedder()` is asked for only then; `kept`: see
    ChunkSearch)."""
    whole = [whole_part(file) for file in files]
    if count_tokens(attach_text(whole)) <= budget:
        return whole
    ids, names = [], {}
    for file in files:
        old = store.indexed_file(file.key)
        if old is None or old.sha256 != file.sha256:
            chunks = split(file.text)
            ids.append(
                store.save_file(file.key, None, file.size, file.mtime_ns, file.sha256, chunks)
            )
        else:
            ids.append(old.id)
        names[file.key] = file.name
    parts = best_parts(
        store, ids, question, budget, count_tokens, embedder(), kept, names.__getitem__
    )
    if not parts:
        raise UsageError(
            f"the window leaves {budget} tokens for files beside the prompt and the answer;"
            " no part of the attached files fits: raise --ctx"
        )
    return parts
