"""What each command does, once cli.py has parsed it: settings, models, then the front end."""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phichat.config import SERVER, RoleSettings, Settings, load_settings
from phichat.engines import planned_model_label
from phichat.errors import PhichatError, UsageError
from phichat.output import emit, print_warning
from phichat.text import json_text

SNIPPET_CHARS = 100
MAX_QUERY_BYTES = 64 << 10  # a longer line of stdin is no search query
IMPORT_CHUNK = 256  # texts embedded at a time on import (one step of the progress bar)

if TYPE_CHECKING:
    from phichat.files import Part, TextFile
    from phichat.memory import Encoder, Hit
    from phichat.session import ChatSession
    from phichat.store import Store


def settings_for(
    args: argparse.Namespace, overrides: dict[str, dict[str, Any]], needs_model: bool = True
) -> Settings:
    """Merged settings. `--server URL` picks the server device; `auto` never does, and asks
    llama.cpp for a GPU only when a model will be loaded. With a server no GGUF is loaded, so
    `--model-file` is refused (a `[model] path` in a config file is ignored)."""
    device = getattr(args, "device", "auto")
    if overrides.get("server", {}).get("url") is not None:
        if device not in ("auto", SERVER):
            raise UsageError(f"--server runs the model on that server, not with --device {device}")
        device = SERVER
    if device == SERVER and overrides.get("model", {}).get("path") is not None:
        raise UsageError(
            "--model-file loads a local GGUF; with a server the server's model runs "
            "(--server-model NAME picks one)"
        )
    if device == "auto":
        if needs_model:
            from phichat.llama_engine import detect_device

            device = detect_device()
        else:
            device = "cpu"
    return load_settings(device, getattr(args, "config", None), overrides)


def run_prompt(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """`phichat --prompt`: one answer on stdout, saved in its own conversation unless
    --no-history (or carried on in conversation --continue ID)."""
    from phichat import oneshot
    from phichat.session import ChatSession

    if args.no_history and args.continue_id is not None:
        raise UsageError("--no-history and --continue do not go together")
    if args.prompt == "-" and "-" in (args.files or []):
        raise UsageError("stdin can be read once: --prompt - and -f - do not go together")
    if args.use is not None:
        from phichat.files import check_folder

        if args.no_history:
            raise UsageError("--use keeps the folder's index in the history: not with --no-history")
        check_folder(args.use)
    prompt = oneshot.read_prompt(args.prompt)
    code, files = _attachments(args.files or [])
    settings = settings_for(args, overrides)
    role = _role(settings, args.role, overrides)
    session = ChatSession.open(
        settings,
        continue_id=args.continue_id,
        history=not args.no_history,
        kind="prompt",
        remember=False,
        verbose=args.verbose,
    )
    try:
        if role is not None:
            session.set_role(role)
        attached = _fit_files(settings, session, files, prompt)
        if args.use is not None:
            session.use_folder(args.use, print_warning)
        attached += session.knowledge_parts(prompt, attached)
        return oneshot.run(session, prompt, args.stats, attached) or code
    finally:
        session.close()  # the conversation's KV state is saved here
        for notice in session.take_notices():
            print_warning(notice)


def _attachments(names: list[str]) -> tuple[int, list[TextFile]]:
    """The text files `-f` names (globs expanded), each that cannot be read one line on
    stderr; with the exit code those lines call for. None readable: nothing to answer."""
    from phichat.files import read_attachments

    code = 0

    def warn(exc: PhichatError) -> None:
        nonlocal code
        print(f"phichat: error: {exc}", file=sys.stderr)
        code = max(code, exc.exit_code)

    files = read_attachments(names, warn)
    if names and not files:
        raise PhichatError("", exit_code=code)  # each file's line was said
    return code, files


def _fit_files(
    settings: Settings, session: ChatSession, files: list[TextFile], prompt: str
) -> list[Part]:
    """What of `files` goes into the prompt: whole if it fits, else the chunks most relevant
    to it, ranked in the history database (a temporary one with --no-history)."""
    if not files:
        return []
    from phichat.files import fit_files

    budget = session.attachment_budget(prompt)
    without = "the parts of the files sent are chosen by their exact words only"
    embedder = functools.cache(lambda: _embedder(settings, without))  # loaded once, if needed
    with contextlib.ExitStack() as stack:
        store = session.store
        if store is None:
            import tempfile

            from phichat.store import Store

            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="phichat-"))
            store = stack.enter_context(Store.open(Path(folder) / "files.db"))
        return fit_files(files, prompt, budget, session.count_tokens, store, embedder)


def _role(
    settings: Settings, name: str | None, overrides: dict[str, dict[str, Any]]
) -> RoleSettings | None:
    """Role `name` of the settings (None for none), less what flags set (they win); an
    unknown name is refused before any model is loaded."""
    if name is None:
        return None
    role = settings.roles.get(name)
    if role is None:
        known = ", ".join(settings.roles) or "none"
        raise UsageError(f"unknown role {name!r} (known: {known}; add it under [roles])")
    flagged = overrides.get("sampling", {})
    system = "" if overrides.get("chat", {}).get("system") is not None else role.system
    sampling = {key: value for key, value in role.sampling.items() if flagged.get(key) is None}
    return replace(role, system=system, sampling=sampling)


def run_more(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """`phichat --continue ID --more`: the rest of conversation ID's last answer, stopped or
    cut at max tokens, on stdout, saved in the same message."""
    from phichat import oneshot
    from phichat.session import ChatSession, check_continuable
    from phichat.store import Store, store_path

    if args.continue_id is None:
        raise UsageError("--more goes with --continue ID")
    if args.prompt is not None or args.no_history or args.use is not None:
        other = "--prompt" if args.prompt is not None else "--no-history"
        other = "--use" if args.use is not None else other
        raise UsageError(f"--more and {other} do not go together")
    settings = settings_for(args, overrides)
    role = _role(settings, args.role, overrides)
    with Store.open(store_path(settings.store)) as store:  # refused before the model loads
        store.conversation(args.continue_id)
        messages = [m for m in store.messages(args.continue_id) if not m.replaced]
        check_continuable(messages, planned_model_label(settings), settings.device)
    session = ChatSession.open(
        settings, continue_id=args.continue_id, kind="prompt", remember=False, verbose=args.verbose
    )
    try:
        if role is not None:
            session.set_role(role)
        return oneshot.run(session, None, args.stats)
    finally:
        session.close()
        for notice in session.take_notices():
            print_warning(notice)


def run_tui(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """`phichat`: the chat app (textual is imported only here)."""
    from phichat.tui.app import run

    return run(settings_for(args, overrides))


def run_command(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """pull | history | show | search | export | import."""
    settings = settings_for(args, overrides, needs_model=False)
    if args.command == "pull":
        return pull(settings)
    from phichat.store import Store, store_path

    with Store.open(store_path(settings.store)) as store:
        if args.command == "history":
            return history(store, args.json, args.all)
        if args.command == "fork":
            emit(str(store.fork_conversation(args.id, args.at).id))
            return 0
        if args.command == "search" and args.files:
            if args.conversation is not None:
                raise UsageError("--files searches the indexed folders, not a --conversation")
            return search_files(settings, store, args.query, args.k, args.json)
        if args.command == "search":
            return search(settings, store, args.query, args.k, args.json, args.conversation)
        if args.command == "index":
            return index(settings, store, args.folders)
        if args.command == "import":
            return import_files(settings, store, args.files)
        from phichat.export import export_conversation

        if args.command == "show":  # for reading in a terminal: what was stored is shown
            from phichat.text import escaped

            emit(escaped(export_conversation(store, args.id, "md")))
        else:  # export writes exactly what was stored
            emit(export_conversation(store, args.id, args.format))
        return 0


def pull(settings: Settings) -> int:
    """Fetch the chat model (none for a server) and the embedder into the HF cache; print
    where they are."""
    from phichat.embed import MODEL_FILES
    from phichat.hub import fetch_model, resolve_snapshot

    if settings.device != SERVER:
        emit(fetch_model(settings.model))
    embedder = settings.embedder
    emit(embedder.path or resolve_snapshot(embedder.repo, embedder.revision, list(MODEL_FILES)))
    return 0


def history(store: Store, as_json: bool = False, archived: bool = False) -> int:
    """One line per conversation (pinned first, archived ones only with `archived`): id,
    date, messages, title and what it is (pinned, archived, a fork); or, as JSON lines, each
    conversation as `export --format json` writes it."""
    from phichat.export import conversation_record
    from phichat.text import escaped

    for conversation in store.conversations(archived=archived):
        if as_json:
            emit(json_text(conversation_record(conversation)))
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.updated))
        title = conversation.shown_title
        marks = ["pinned"] if conversation.pinned else []
        marks += ["archived"] if conversation.archived else []
        if conversation.parent is not None:
            marks.append(f"fork of {conversation.parent}")
        title += f"  ({', '.join(marks)})" if marks else ""
        line = f"{conversation.id:>5}  {when}  {conversation.message_count:>4} msgs  {title}"
        emit(escaped(line))
    return 0


def search(
    settings: Settings,
    store: Store,
    query: str,
    k: int,
    as_json: bool,
    conversation_id: int | None = None,
) -> int:
    """Past messages ranked by meaning and exact words, best first, one per line: the rank,
    the cosine similarity to the query (or "words" for a match by exact words alone); only
    within conversation `conversation_id` if given. Query "-" reads one query per line from
    stdin, each hit then naming its query by line number (from 0)."""
    from phichat.memory import Memory

    if k < 1:
        raise UsageError("-k must be >= 1")
    if conversation_id is not None:
        store.conversation(conversation_id)  # PhichatError for an unknown id
    memory = Memory.open(store, _embedder(settings))
    memory.backfill()  # what was saved without a vector (--prompt, offline) is found by meaning
    if query != "-":
        _print_hits(memory.search(query, k, conversation_id), as_json)
        return 0
    for number, line in _query_lines():
        _print_hits(memory.search(line, k, conversation_id), as_json, number)
    return 0


def index(settings: Settings, store: Store, folders: list[Path]) -> int:
    """Bring each folder's files index up to date (a file that cannot be indexed is one line
    on stderr; the others go on), one summary line per folder; then embed the new chunks,
    with a progress bar on a terminal. Exit code: 2 for a folder that is none, else 0."""
    from tqdm import tqdm

    from phichat.files import embed_chunks, index_folder

    if store.read_only:
        raise PhichatError(f"{store.path}: the history database is read-only; nothing indexed")
    code = 0

    for folder in folders:
        try:
            report = index_folder(store, folder, print_warning)
        except PhichatError as exc:
            print(f"phichat: error: {exc}", file=sys.stderr)
            code = max(code, exc.exit_code)
            continue
        emit(f"{folder}: {report}")
    without = (
        "indexing without vectors for now"
        " (found by their exact words until an index with the embedder adds them)"
    )
    embedder = _embedder(settings, without) if store.chunks_without_vectors(None, 1) else None
    if embedder is not None:
        with tqdm(desc="vectors", unit="chunk", file=sys.stderr, disable=None) as bar:
            embed_chunks(store, embedder, bar.update)
    return code


def search_files(settings: Settings, store: Store, query: str, k: int, as_json: bool) -> int:
    """Chunks of the indexed folders ranked by meaning and exact words, best first: the rank,
    the path and the lines, and the start of the text (with `--json`: path, lines [first,
    last] and content). Query "-" reads one query per line, as `search -` does."""
    from phichat.files import ChunkSearch

    finder = ChunkSearch(store, _embedder(settings))
    queries = _query_lines() if query == "-" else [(None, query)]
    for number, text in queries:
        for rank, chunk in enumerate(finder.search(text, k), start=1):
            if as_json:
                record: dict[str, Any] = {} if number is None else {"query": number}
                record |= {
                    "rank": rank,
                    "path": chunk.path,
                    "lines": [chunk.first_line, chunk.last_line],
                    "content": chunk.content,
                }
                emit(json_text(record))
                continue
            from phichat.text import escaped, one_line

            where = f"{chunk.path}:{chunk.first_line}-{chunk.last_line}"
            line = f"{rank:>3}. {where}  {one_line(chunk.content, SNIPPET_CHARS)}"
            emit(escaped(line if number is None else f"[{number}] {line}"))
    return 0


def _query_lines() -> Iterator[tuple[int, str]]:
    """(line number from 0, text) of each line of stdin that holds a word to look for, read
    one at a time; blank lines and lines of punctuation alone are skipped, yet counted."""
    from phichat.config import check_text
    from phichat.store import check_search_text

    if sys.stdin is None:
        raise UsageError("search -: stdin is closed")
    for number in itertools.count():
        try:
            data = sys.stdin.buffer.readline(MAX_QUERY_BYTES + 2)  # and its "\r\n"
        except OSError as exc:
            raise PhichatError(f"cannot read stdin: {exc.strerror or exc}") from None
        if not data:
            return
        name = f"stdin line {number}"
        if len(data.rstrip(b"\r\n")) > MAX_QUERY_BYTES:
            raise UsageError(f"{name} is longer than {MAX_QUERY_BYTES >> 10} KiB")
        try:
            text = check_text(data.decode("utf-8").rstrip("\r\n"), name)
        except UnicodeDecodeError:
            raise UsageError(f"{name} is not valid UTF-8 text") from None
        try:
            check_search_text(text)
        except UsageError:
            continue
        yield number, text


def _print_hits(hits: list[Hit], as_json: bool, query: int | None = None) -> None:
    """Hits, one line each, as text or JSON; `query`: the stdin line they were found for."""
    from phichat.memory import similarity_text
    from phichat.text import escaped, one_line

    for rank, hit in enumerate(hits, start=1):
        message = hit.message
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(message.created))
        if as_json:
            record: dict[str, Any] = {} if query is None else {"query": query}
            record |= {
                "rank": rank,
                "similarity": None if hit.similarity is None else round(hit.similarity, 4),
                "exact_words": hit.keyword,
                "date": when,
                "conversation": message.conversation,
                "message": message.id,
                "role": message.role,
                "content": message.content,
            }
            emit(json_text(record))
        else:
            snippet = escaped(one_line(message.content, SNIPPET_CHARS))
            match = similarity_text(hit)
            line = f"{rank:>3}. {match}  {when}  #{message.conversation}  {message.role}: {snippet}"
            emit(line if query is None else f"[{query}] {line}")


def import_files(settings: Settings, store: Store, paths: list[Path]) -> int:
    """Import each export file in its own transaction (a bad one imports nothing and is one
    line on stderr; the others go on); one summary line per file imported. Vectors are
    computed in bulk, with a progress bar on a terminal; without the embedder, the messages
    are imported all the same and embedded later. Exit code: the worst of the files'."""
    from phichat.importer import read_conversations

    if store.read_only:
        raise PhichatError(f"{store.path}: the history database is read-only; nothing imported")
    code = 0
    without = (
        "importing without vectors for now (the app as it starts, or `phichat search`, adds them)"
    )
    embedder = functools.cache(lambda: _embedder(settings, without))  # loaded once, if needed
    for path in paths:
        try:
            conversations = read_conversations(path)
            known = store.known_sources(c.source for c in conversations)
            new = [c for c in conversations if c.source not in known]
            texts = [m.content for c in new for m in c.messages]
            model = embedder() if texts else None
            vectors = None if model is None else _vectors(model, texts, path.name)
            model_id = None if model is None else model.model_id
            added = store.import_conversations(new, model_id, vectors)
        except PhichatError as exc:
            print(f"phichat: error: {exc}", file=sys.stderr)
            code = max(code, exc.exit_code)
            continue
        messages = sum(len(c.messages) for c in new if c.source in added)
        already = len(conversations) - len(added)
        emit(
            f"{path}: {_count(len(added), 'conversation')}, {_count(messages, 'message')}"
            " imported" + (f", {already} already there" if already else "")
        )
    return code


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _embedder(settings: Settings, without: str | None = None) -> Encoder | None:
    """The embedder, loaded as the app loads it; None where it cannot load, with a warning
    that says what the command does `without` it (default: search matches exact words only),
    and why."""
    from phichat.memory import WORDS_ONLY, load_embedder

    embedder, problem = load_embedder(settings.embedder, without=without or WORDS_ONLY)
    if problem is not None:
        print_warning(problem)
    return embedder


def _vectors(embedder: Encoder, texts: list[str], name: str) -> list[bytes]:
    """float32 vector blobs of `texts`, in order, embedded in chunks of similar length with a
    progress bar on stderr (on a terminal only)."""
    from tqdm import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    blobs: list[bytes] = [b""] * len(texts)
    with tqdm(total=len(texts), desc=name, unit="msg", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(order), IMPORT_CHUNK):
            chunk = order[start : start + IMPORT_CHUNK]
            vectors = embedder.encode([texts[i] for i in chunk])
            for i, vector in zip(chunk, vectors, strict=True):
                blobs[i] = vector.tobytes()
            bar.update(len(chunk))
    return blobs
