"""What each command does, once cli.py has parsed it: settings, models, then the front end."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from phichat.config import SERVER, Settings, load_settings
from phichat.errors import PhichatError, UsageError
from phichat.output import emit

SNIPPET_CHARS = 100

if TYPE_CHECKING:
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
    prompt = oneshot.read_prompt(args.prompt)
    settings = settings_for(args, overrides)
    session = ChatSession.open(
        settings,
        continue_id=args.continue_id,
        history=not args.no_history,
        kind="prompt",
        remember=False,
        verbose=args.verbose,
    )
    try:
        return oneshot.run(session, prompt, args.stats)
    finally:
        session.close()  # the conversation's KV state is saved here
        for notice in session.take_notices():
            print(f"phichat: warning: {notice}", file=sys.stderr)


def run_tui(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """`phichat`: the chat app (textual is imported only here)."""
    from phichat.tui.app import run

    return run(settings_for(args, overrides))


def run_command(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """pull | history | show | search | export."""
    settings = settings_for(args, overrides, needs_model=False)
    if args.command == "pull":
        return pull(settings)
    from phichat.store import Store, store_path

    with Store.open(store_path(settings.store)) as store:
        if args.command == "history":
            return history(store)
        if args.command == "search":
            return search(settings, store, args.query, args.k, args.json)
        from phichat.export import export_conversation

        fmt = "md" if args.command == "show" else args.format
        emit(export_conversation(store, args.id, fmt))
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


def history(store: Store) -> int:
    """One line per conversation: id, date, messages, title."""
    for conversation in store.conversations():
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.updated))
        title = conversation.title or "(untitled)"
        emit(f"{conversation.id:>5}  {when}  {conversation.message_count:>4} msgs  {title}")
    return 0


def search(settings: Settings, store: Store, query: str, k: int, as_json: bool) -> int:
    """Past messages ranked by meaning and exact words, best first, one per line: the rank,
    the cosine similarity to the query (or "words" for a match by exact words alone)."""
    from phichat.embed import Embedder
    from phichat.memory import Memory, similarity_text
    from phichat.text import one_line

    if k < 1:
        raise UsageError("-k must be >= 1")
    try:
        embedder: Embedder | None = Embedder.load(settings.embedder)
    except PhichatError as exc:
        print(f"phichat: warning: {exc}; matching exact words only", file=sys.stderr)
        embedder = None
    memory = Memory.open(store, embedder)
    memory.backfill()
    for rank, hit in enumerate(memory.search(query, k), start=1):
        message = hit.message
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(message.created))
        if as_json:
            record = {
                "rank": rank,
                "similarity": None if hit.similarity is None else round(hit.similarity, 4),
                "exact_words": hit.keyword,
                "date": when,
                "conversation": message.conversation,
                "message": message.id,
                "role": message.role,
                "content": message.content,
            }
            emit(json.dumps(record, ensure_ascii=False))
        else:
            snippet = one_line(message.content, SNIPPET_CHARS)
            match = similarity_text(hit)
            emit(f"{rank:>3}. {match}  {when}  #{message.conversation}  {message.role}: {snippet}")
    return 0
