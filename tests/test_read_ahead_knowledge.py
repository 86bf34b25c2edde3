"""Read-ahead with a knowledge folder (`/use DIR`, issue 18): the draft is read with the
folder's chunks chosen for its words so far, so Enter reads only the last words when the whole
message brings the same chunks, and the answer is the one the sent prompt gets read cold. Real
llama.cpp on SmolLM2, the real MiniLM embedder, a real folder."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from phichat.config import load_settings
from phichat.session import ChatSession

FACT = "The launch code for the orbital test is ZEBRA-42, kept by Ines on the north pad."
GARDEN = "Bed 3 holds the beans: they need water every four days in a dry summer."
QUESTION = "What is the launch code for the orbital test, and who keeps it?"


@pytest.fixture
def session(smollm_path: Path, minilm_dir: Path) -> Iterator[ChatSession]:
    settings = load_settings(
        "cpu",
        overrides={
            "model": {"path": str(smollm_path)},
            "engine": {"n_ctx": 1024, "threads": 2, "state_cache_mb": 0},
            "sampling": {"temperature": 0.0, "max_tokens": 8},
            "chat": {"recall_tokens": 0, "knowledge_tokens": 200},
        },
    )
    opened = ChatSession.open(settings)
    assert opened.memory is not None and opened.memory.get(timeout=120) is not None
    yield opened
    opened.close()


@pytest.mark.slow
def test_a_draft_is_read_with_the_folder_chunks_for_its_words(
    session: ChatSession, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "launch.md").write_text(f"# Launch\n\n{FACT}\n")
    (docs / "garden.txt").write_text(f"{GARDEN}\n")
    session.use_folder(docs, lambda exc: None)
    first = "How often do the beans of bed 3 need water?"
    "".join(session.send(first, attached=session.knowledge_parts(first)))

    while session.read_ahead(QUESTION, threading.Event()):  # typed, up to "keeps"
        pass
    parts = session.knowledge_parts(QUESTION)  # as Enter chooses them
    assert "launch.md" in [part.source.path for part in parts]
    answer = "".join(session.send(QUESTION, attached=parts))
    stats, fitted = session.last_stats, session.last_fit
    assert stats is not None and fitted is not None
    assert FACT in fitted.messages[-1]["content"]
    assert stats.prompt_tokens - stats.cached_tokens <= 12  # "it?" and the template's end
    engine = session.engine
    engine.llama.n_tokens = 0  # type: ignore[attr-defined]
    assert "".join(engine.stream(fitted.messages, session.answer_sampling)) == answer
