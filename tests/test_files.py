"""Files in the chat: the chunker, folder indexing (incremental, .gitignore, bad files), chunk
search by the history's ranking, `phichat index`, `search --files` and `--prompt -f`. Real
SQLite, the real MiniLM embedder, the tiny wired Phi-3 for answers."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phichat.errors import PhichatError
from phichat.files import (
    CHUNK_CHARS,
    ChunkSearch,
    attach_text,
    fit_files,
    index_folder,
    read_attachments,
    read_text_file,
    split,
)
from phichat.store import Store

if TYPE_CHECKING:
    from conftest import CliRun

FACT = "The launch code for the orbital test is ZEBRA-42, kept by Ines."


def filler(n: int) -> str:
    """`n` lines of prose about gardening, each different."""
    return "\n".join(
        f"Line {i}: tomatoes and beans need water every {i % 7 + 1} days in a dry summer."
        for i in range(n)
    )


def words_only(text: str) -> int:
    """A stand-in token count: a token per 4 characters, rounded up."""
    return -(-len(text) // 4)


def test_small_text_is_one_chunk_with_its_lines() -> None:
    assert split("a\nb\n\nc\n") == [(1, 4, "a\nb\n\nc")]
    assert split("\n\nhello\n\n") == [(3, 3, "hello")]
    assert split("") == []


def test_a_long_text_is_cut_before_headings_and_top_level_definitions() -> None:
    body = "\n".join(f"    x{i} = {i} * 2  # a line of the body" for i in range(12))
    code = "\n".join(
        f"@decorator\ndef function_{n}():\n{body}\n\n\nclass Thing{n}:\n{body}\n" for n in range(4)
    )
    chunks = split(code)
    lines = code.split("\n")
    for first, last, text in chunks:
        assert text == "\n".join(lines[first - 1 : last])  # 1-based, inclusive
        assert len(text) <= CHUNK_CHARS
        assert lines[first - 1].startswith(("@decorator", "class Thing")), text[:40]
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks)
    markdown = "\n\n".join(f"## Part {n}\n\n" + filler(8) for n in range(6))
    starts = [markdown.split("\n")[first - 1] for first, _, _ in split(markdown)]
    assert all(line.startswith("## Part") for line in starts), starts


def test_lines_without_boundaries_and_an_endless_line_are_cut_in_size() -> None:
    chunks = split(filler(200))
    assert all(len(text) <= CHUNK_CHARS for _, _, text in chunks)
    assert [c[0] for c in chunks[1:]] == [c[1] + 1 for c in chunks[:-1]]  # no line lost
    long_line = "x" * (CHUNK_CHARS * 2 + 10)
    pieces = split(f"start\n{long_line}\nend")
    assert [(a, b) for a, b, _ in pieces] == [(1, 1), (2, 2), (2, 2), (2, 2), (3, 3)]
    assert "".join(text for a, _, text in pieces if a == 2) == long_line


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store.open(tmp_path / "history.db")
    yield opened  # type: ignore[misc]
    opened.close()


def make_folder(root: Path) -> Path:
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "notes.md").write_text(f"# Notes\n\n{FACT}\n")
    (docs / "sub" / "garden.txt").write_text(filler(60) + "\n")
    (docs / ".gitignore").write_text("secret.txt\nbuild/\n")
    (docs / "secret.txt").write_text("the password is hunter2\n")
    (docs / "build").mkdir()
    (docs / "build" / "out.txt").write_text("generated\n")
    (docs / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "broken").symlink_to(root / "nowhere")
    (docs / "sub" / "loop").symlink_to(docs)
    os.mkfifo(docs / "pipe")
    return docs


def test_a_folder_is_indexed_once_then_only_what_changed(tmp_path: Path, store: Store) -> None:
    docs = make_folder(tmp_path)
    said: list[str] = []
    report = index_folder(store, docs, lambda exc: said.append(str(exc)))
    indexed = set(store.indexed_files(str(docs)))
    assert indexed == {str(docs / n) for n in ("notes.md", "sub/garden.txt", ".gitignore")}
    assert (report.indexed, report.binary) == (3, 1)
    assert sorted(line.split(": ", 1)[1] for line in said) == [
        "is a broken symlink",
        "is a directory loop (a symlink back up): skipped",
        "is not a regular file (a FIFO, socket or device)",
        "is not valid UTF-8 text",
    ]
    assert report.problems == 4

    again = index_folder(store, docs, lambda exc: None)
    assert (again.indexed, again.unchanged) == (0, 3)
    garden = docs / "sub" / "garden.txt"
    before = store.indexed_files(str(docs))[str(garden)]
    os.utime(garden, ns=(before.mtime_ns + 10**9, before.mtime_ns + 10**9))  # touched only
    touched = index_folder(store, docs, lambda exc: None)
    assert (touched.indexed, touched.unchanged) == (0, 3)
    assert store.indexed_files(str(docs))[str(garden)].id == before.id  # not chunked again

    (docs / "notes.md").write_text("# Notes\n\nThe launch code changed to OKAPI-7.\n")
    (docs / "sub" / "garden.txt").unlink()
    changed = index_folder(store, docs, lambda exc: None)
    assert (changed.indexed, changed.unchanged, changed.removed) == (1, 1, 1)
    assert set(store.indexed_files(str(docs))) == {str(docs / "notes.md"), str(docs / ".gitignore")}
    found = store.chunk_keyword_search("OKAPI", 10)
    assert [store.chunks_by_id([i])[i].path for i, _ in found] == [str(docs / "notes.md")]
    assert store.chunk_keyword_search("ZEBRA", 10) == []  # the old text left with its chunks


def test_a_file_is_indexed_whole_or_not_at_all(tmp_path: Path, store: Store) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(filler(100))
    index_folder(store, docs, lambda exc: None)
    before = store.chunk_ids()
    (docs / "a.txt").write_text(filler(100) + "\nOne more line about OKAPI.")
    conn = sqlite3.connect(store.path)  # a trigger makes the 5th chunk's insert fail
    conn.execute(
        "CREATE TRIGGER fail AFTER INSERT ON chunks WHEN (SELECT count(*) FROM chunks) > 4"
        " BEGIN SELECT raise(ABORT, 'disk trouble'); END"
    )
    conn.commit()
    with pytest.raises(sqlite3.IntegrityError, match="disk trouble"):
        index_folder(store, docs, lambda exc: None)
    assert store.chunk_ids() == before  # the old chunks, all of them
    conn.execute("DROP TRIGGER fail")
    conn.commit()
    conn.close()
    assert index_folder(store, docs, lambda exc: None).indexed == 1
    assert store.chunk_keyword_search("OKAPI", 10)


def test_chunks_are_ranked_by_meaning_and_words_within_a_budget(
    tmp_path: Path, store: Store, minilm_dir: Path
) -> None:
    from phichat.embed import Embedder
    from phichat.files import embed_chunks

    docs = make_folder(tmp_path)
    (docs / "space.md").write_text(
        "# Rockets\n\nThe second stage burns liquid oxygen and kerosene for six minutes.\n"
    )
    index_folder(store, docs, lambda exc: None)
    embedder = Embedder.from_dir(minilm_dir)
    assert embed_chunks(store, embedder) == len(store.chunk_ids())
    search = ChunkSearch(store, embedder)
    by_meaning = search.rank("what fuel does the rocket use")[0]
    assert store.chunks_by_id([by_meaning])[by_meaning].path == str(docs / "space.md")
    by_words = search.rank("ZEBRA-42")[0]
    assert store.chunks_by_id([by_words])[by_words].path == str(docs / "notes.md")
    parts = search.within("how often do tomatoes need water", 120, words_only)
    assert parts and all(p.source.path.endswith("garden.txt") for p in parts)
    assert words_only(attach_text(parts)) <= 120 + 2 * len(parts)


@pytest.mark.slow
def test_attached_files_go_whole_when_they_fit_else_their_best_chunks(
    tmp_path: Path, store: Store, minilm_dir: Path
) -> None:
    from phichat.embed import Embedder

    small = tmp_path / "small.md"
    small.write_text(f"# Small\n\n{FACT}\n")
    big = tmp_path / "big.txt"
    big.write_text(filler(400) + f"\n{FACT}\n" + filler(400) + "\n")
    said: list[PhichatError] = []
    files = read_attachments([str(small)], said.append)
    whole = fit_files(files, "what is the launch code?", 1000, words_only, store, lambda: None)
    assert [(str(p.source), p.text) for p in whole] == [
        (f"{small} (whole, lines 1-3)", small.read_text())
    ]
    assert store.chunk_ids([]) == []  # nothing indexed for a file that fits

    files = read_attachments([str(big)], said.append)
    embedder = Embedder.from_dir(minilm_dir)
    parts = fit_files(files, "what is the launch code?", 300, words_only, store, lambda: embedder)
    assert not said
    assert words_only(attach_text(parts)) <= 300 + 2 * len(parts)
    assert any(FACT in p.text for p in parts)
    for part in parts:
        lines = big.read_text().split("\n")[part.source.first_line - 1 : part.source.last_line]
        assert part.text == "\n".join(lines) and not part.source.whole


def test_attachments_that_cannot_be_read_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "bin.dat").write_bytes(b"a\x00b")
    (tmp_path / "big.log").write_bytes(b"x" * ((4 << 20) + 1))
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    os.mkfifo(tmp_path / "fifo")
    many = tmp_path / "many"
    many.mkdir()
    for i in range(1001):
        (many / f"{i}.txt").touch()
    said: list[PhichatError] = []
    names = ["ok.txt", "bin.dat", "big.log", "dangling", "fifo", "*.nothing", "many/*.txt", "."]
    files = read_attachments([str(tmp_path / n) for n in names], said.append)
    assert [f.text for f in files] == ["fine\n"]
    whys = [str(exc).split(": ", 1)[1] for exc in said]
    assert whys == [
        "is a binary file, not text",
        "is over the 4 MiB cap for a text file",
        "is a broken symlink",
        "is not a regular file (a FIFO, socket or device)",
        "matches no file",
        "matches more than 1,000 files",
        "is a directory (phichat index DIR indexes a folder)",
    ]
    assert all(exc.exit_code == 2 for exc in said)
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.txt"
        locked.write_text("no")
        locked.chmod(0)
        with pytest.raises(PhichatError, match="cannot read it") as caught:
            read_text_file(locked)
        assert caught.value.exit_code == 1


@pytest.mark.slow
def test_index_and_search_files_on_the_command_line(
    tmp_path: Path, minilm_dir: Path, phichat_cli: CliRun
) -> None:
    docs = make_folder(tmp_path)
    indexed = phichat_cli("index", str(docs))
    assert indexed.returncode == 0, indexed.stderr
    assert (
        indexed.stdout
        == f"{docs}: 3 files indexed (7 chunks), 1 binary skipped, 4 skipped (said above)\n"
    )
    assert len(indexed.stderr.strip().splitlines()) == 4
    assert all(line.startswith("phichat: warning: ") for line in indexed.stderr.splitlines())
    again = phichat_cli("index", str(docs))
    assert again.stdout.startswith(f"{docs}: 0 files indexed (0 chunks), 3 unchanged")

    found = phichat_cli("search", "--files", "launch code", "--json", "-k", "1")
    assert found.returncode == 0, found.stderr
    hit = json.loads(found.stdout)
    assert hit == {
        "rank": 1,
        "path": str(docs / "notes.md"),
        "lines": [1, 3],
        "content": f"# Notes\n\n{FACT}",
    }
    batch = phichat_cli("search", "--files", "-", "--json", "-k", "1", stdin="launch\n\nwater\n")
    hits = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [(h["query"], Path(h["path"]).name) for h in hits] == [
        (0, "notes.md"),
        (2, "garden.txt"),
    ]
    text = phichat_cli("search", "--files", "ZEBRA-42").stdout.splitlines()
    assert text[0].startswith(f"  1. {docs / 'notes.md'}:1-3  # Notes The launch code")

    for args, fragment in [
        (("index", str(tmp_path / "nowhere")), "no such folder"),
        (("index", str(docs / "notes.md")), "is not a folder"),
        (("search", "--files", "x", "--conversation", "1"), "not a --conversation"),
        (("search", "--files", "..."), "search needs a word"),
    ]:
        result = phichat_cli(*args)
        assert result.returncode == 2 and fragment in result.stderr, result


@pytest.mark.slow  # the model answers, several times
def test_prompt_with_files_keeps_what_was_attached(
    tmp_path: Path, tiny_phi3_path: Path, minilm_dir: Path, phichat_cli: CliRun
) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text(f"# Notes\n\n{FACT}\n")
    (tmp_path / "bin.dat").write_bytes(b"\x00")
    result = phichat_cli(
        "--prompt",
        "What is the launch code?",
        "-f",
        str(notes),
        "-f",
        str(tmp_path / "bin.dat"),
        "-f",
        str(tmp_path / "*.none"),
        "--stats",
    )
    assert result.stdout == "Hello world\n"
    assert result.returncode == 2  # answered; the files that could not be read said so
    err = result.stderr.splitlines()
    assert err[0] == f"phichat: error: {tmp_path / 'bin.dat'}: is a binary file, not text"
    assert err[1] == f"phichat: error: {tmp_path / '*.none'}: matches no file"
    assert err[2] == f"sources: {notes} (whole, lines 1-3)"
    listing = phichat_cli("history").stdout
    assert "What is the launch code?" in listing  # titled by the question
    exported = json.loads(phichat_cli("export", listing.split()[0], "--format", "json").stdout)
    question = exported["messages"][0]["content"]
    assert question.startswith(f"[Attached: {notes} (whole, lines 1-3)]\n```\n# Notes")
    assert FACT in question and question.endswith("\n\nWhat is the launch code?")
    assert exported["messages"][0]["attachments"] == [
        {"path": str(notes), "lines": [1, 3], "whole": True}
    ]
    assert "attachments" not in exported["messages"][1]
    assert FACT in phichat_cli("show", listing.split()[0]).stdout

    none = phichat_cli("--prompt", "hi", "-f", str(tmp_path / "bin.dat"))
    assert (none.returncode, none.stdout) == (2, "")
    assert len(none.stderr.splitlines()) == 1
    both = phichat_cli("--prompt", "-", "-f", "-", stdin="x")
    assert both.returncode == 2 and "stdin can be read once" in both.stderr
    alone = phichat_cli("-f", str(notes))
    assert alone.returncode == 2 and "-f attaches a file to --prompt" in alone.stderr


@pytest.mark.slow  # the model answers, several times
def test_a_file_too_big_for_the_window_brings_its_relevant_chunks(
    tmp_path: Path, tiny_phi3_path: Path, minilm_dir: Path, phichat_cli: CliRun
) -> None:
    big = tmp_path / "big.txt"
    big.write_text(filler(300) + f"\n{FACT}\n" + filler(300) + "\n")
    args = ("--prompt", "What is the launch code for the orbital test?", "--ctx", "1024")
    result = phichat_cli(*args, "-f", "-", "--stats", "--no-history", stdin=big.read_text())
    assert result.returncode == 0, result.stderr
    sources = result.stderr.splitlines()[0]
    assert sources.startswith("sources: <stdin> (lines ") and "whole" not in sources
    fact_line = 302
    ranges = [s.split("lines ")[1].rstrip(")").split("-") for s in sources.split("; ")]
    assert any(int(a) <= fact_line <= int(b) for a, b in ranges), sources
    prompt_tokens = int(result.stderr.split("prompt tokens: ")[1].split()[0])
    assert 200 < prompt_tokens <= 1024 - 512  # room kept for the answer

    tiny = phichat_cli(
        "--prompt", "What is the code?", "--ctx", "512", "--max-tokens", "256", "-f", str(big)
    )
    assert tiny.returncode == 2 and tiny.stdout == ""
    assert tiny.stderr.endswith("no part of the attached files fits: raise --ctx\n"), tiny.stderr


def test_a_regenerate_and_a_later_turn_still_read_the_attached_file(
    tmp_path: Path, fake_engine: object
) -> None:
    from phichat.config import load_settings
    from phichat.files import read_attachments as read
    from phichat.session import ChatSession

    notes = tmp_path / "notes.md"
    notes.write_text(f"# Notes\n\n{FACT}\n")
    settings = load_settings("cpu", overrides={"sampling": {"max_tokens": 8}})
    session = ChatSession.open(settings, fake_engine, remember=False)  # type: ignore[arg-type]
    try:
        files = read([str(notes)], lambda exc: None)
        parts = fit_files(
            files,
            "What is the code?",
            session.attachment_budget("What is the code?"),
            session.count_tokens,
            session.store,
            lambda: None,  # type: ignore[arg-type]
        )
        "".join(session.send("What is the code?", attached=parts))
        assert session.conversation_id is not None
        title = session.conversation(session.conversation_id).title
        assert title == "What is the code?"
        "".join(session.regenerate())
        assert FACT in session.last_fit.messages[-1]["content"]  # type: ignore[union-attr]
        "".join(session.send("And who keeps it?"))
        assert any(FACT in m["content"] for m in session.last_fit.messages)  # type: ignore[union-attr]
    finally:
        session.close()
