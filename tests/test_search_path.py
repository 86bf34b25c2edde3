"""One search path: `phichat search` (and `search --files`) load the embedder and rank as the
app's side pane does, and say the same line when the embedder cannot load. Real SQLite, the
real MiniLM embedder; no chat model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phichat.config import load_settings
from phichat.embed import Embedder
from phichat.files import ChunkSearch
from phichat.session import BackgroundMemory
from phichat.store import Store

if TYPE_CHECKING:
    from conftest import CliRun

MESSAGES = [
    ("user", "My bicycle tyre keeps going flat."),
    ("assistant", "Patch the inner tube and check the rim tape."),
    ("user", "And what about sourdough bread?"),
    ("assistant", "Feed the starter the night before and bake at 240 degrees."),
]


def saved_without_vectors() -> None:
    """A conversation saved as `--prompt` saves it: without vectors yet."""
    with Store.open() as store:
        chat = store.create_conversation()
        for role, text in MESSAGES:
            store.add_message(chat.id, role, text)


@pytest.mark.slow  # the embedder loaded twice, every message embedded
def test_cli_search_ranks_as_the_side_pane_does(minilm_dir: Path, phichat_cli: CliRun) -> None:
    saved_without_vectors()
    result = phichat_cli("search", "how do I fix a puncture", "--json")
    assert result.returncode == 0, result.stderr
    found = [json.loads(line)["message"] for line in result.stdout.splitlines()]

    settings = load_settings("cpu", None, {})
    with Store.open() as store:
        pane = BackgroundMemory(settings, store)  # what ChatSession.search asks
        memory = pane.get(timeout=30)
        pane.close()  # its backfill is done: every message has its vector
        assert memory is not None and pane.problem is None
        hits = memory.search("how do I fix a puncture", 10)
    assert found == [hit.message.id for hit in hits]
    assert found[0] in (1, 2) and len(found) == len(MESSAGES)  # by meaning: no word in common


def test_without_the_embedder_search_says_what_the_app_says(
    tmp_path: Path, phichat_cli: CliRun
) -> None:
    saved_without_vectors()
    gone = tmp_path / "no-embedder"
    result = phichat_cli("--embedder-dir", str(gone), "search", "sourdough")
    files = phichat_cli("--embedder-dir", str(gone), "search", "--files", "sourdough")

    settings = load_settings("cpu", None, {"embedder": {"path": str(gone)}})
    with Store.open() as store:
        pane = BackgroundMemory(settings, store)
        pane.get(timeout=30)
        pane.close()
    said = f"phichat: warning: {pane.problem}\n"
    assert (
        pane.problem == f"search matches exact words only: embedder directory {gone} does not exist"
    )
    assert (result.returncode, result.stderr) == (0, said)
    assert result.stdout.splitlines()[0].startswith("  1. words ")
    assert "sourdough bread" in result.stdout.splitlines()[0]
    assert (files.returncode, files.stdout, files.stderr) == (0, "", said)


@pytest.mark.slow  # a folder indexed and embedded, the embedder loaded twice
def test_search_files_prints_the_chunks_the_ranking_puts_first(
    tmp_path: Path, minilm_dir: Path, phichat_cli: CliRun
) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "bikes.md").write_text("# Bikes\n\nPatch the inner tube when a tyre goes flat.\n")
    (folder / "bread.md").write_text("# Bread\n\nFeed the sourdough starter the night before.\n")
    assert phichat_cli("index", str(folder)).returncode == 0

    result = phichat_cli("search", "--files", "puncture repair", "-k", "1", "--json")

    assert result.returncode == 0, result.stderr
    [hit] = [json.loads(line) for line in result.stdout.splitlines()]
    assert hit["path"] == str(folder / "bikes.md") and hit["rank"] == 1
    assert "inner tube" in hit["content"]
    with Store.open() as store:
        embedder = Embedder.load(load_settings("cpu", None, {}).embedder)
        best = ChunkSearch(store, embedder).search("puncture repair", 1)
        assert [chunk.content for chunk in best] == [hit["content"]]
