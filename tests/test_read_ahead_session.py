"""Read-ahead through the session (issue 18): a draft's prompt is fitted and tokenized once
however many steps read it, and right after an answer the next turn's history (where the cut
moves into old history, the window it keeps) is read before the user sends. Real llama.cpp on
SmolLM2, whose greedy answer depends on every token read."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phichat.config import load_settings
from phichat.memory import FittedContext
from phichat.session import ChatSession

NEXT = "And what about the weather there?"


@pytest.fixture
def session(smollm_path: Path) -> Iterator[ChatSession]:
    settings = load_settings(
        "cpu",
        overrides={
            "model": {"path": str(smollm_path)},
            "engine": {"n_ctx": 512, "threads": 2, "state_cache_mb": 0},
            "sampling": {"temperature": 0.0, "max_tokens": 12},
            "chat": {"system": "Answer briefly.", "recall_tokens": 0},
        },
    )
    opened = ChatSession.open(settings, remember=False)
    yield opened
    opened.close()


def test_a_read_ahead_in_steps_fits_and_tokenizes_the_draft_once(
    session: ChatSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    "".join(session.send("Name three rivers in Europe."))
    fits: list[str] = []
    renders: list[list[dict[str, str]]] = []
    fit, render = session.fit, session.engine.prompt_tokens  # type: ignore[attr-defined]

    def counted_fit(text: str, *args: Any, **kwargs: Any) -> FittedContext:
        fits.append(text)
        return fit(text, *args, **kwargs)

    def counted_render(messages: list[dict[str, str]]) -> list[int]:
        renders.append(messages)
        return render(messages)

    monkeypatch.setattr(session, "fit", counted_fit)
    monkeypatch.setattr(session.engine, "prompt_tokens", counted_render)
    draft = "Which of those rivers is the longest, and through which countries does it flow? "
    steps = []
    while step := session.read_ahead(draft, threading.Event(), limit=4):
        steps.append(step)
    assert len(steps) > 3 and steps[:-1] == [4] * (len(steps) - 1)
    assert fits == [draft] and len(renders) == 2  # the prompt, and the prompt typed on
    assert session.read_ahead(draft + "Is it ", threading.Event()) > 0  # new words settled
    assert fits == [draft, draft + "Is it "] and len(renders) == 4


def next_turn_moves_the_cut(session: ChatSession) -> bool:
    """Whether the next turn, NEXT, keeps less of the history than the last answer's prompt
    (the cut moves), and fits the history as an empty draft does."""
    last = session.last_fit
    assert last is not None
    after = session.fit(NEXT)
    return after.dropped > last.dropped and after.messages[:-1] == session.fit("").messages[:-1]


@pytest.mark.slow
def test_reading_ahead_after_an_answer_leaves_the_moved_cut_read(session: ChatSession) -> None:
    for number in range(40):
        "".join(session.send(f"Tell me one fact about the number {number}, in one sentence."))
        if next_turn_moves_the_cut(session):
            break
    else:
        pytest.fail("the cut never moved")
    window = session.fit(NEXT).messages[:-1]
    read = session.read_ahead("", threading.Event())  # as the app does once the answer ends
    assert read > session.count_tokens(NEXT) + 40  # the moved window, not only the message
    assert session.read_ahead("", threading.Event()) == 0  # all of it read
    answer = "".join(session.send(NEXT))
    stats, fitted = session.last_stats, session.last_fit
    assert stats is not None and fitted is not None and fitted.messages[:-1] == window
    assert stats.prompt_tokens - stats.cached_tokens <= session.count_tokens(NEXT) + 8
    engine = session.engine
    engine.llama.n_tokens = 0  # type: ignore[attr-defined]
    assert "".join(engine.stream(fitted.messages, session.answer_sampling)) == answer


def test_an_answer_then_a_read_ahead_stopped_at_once_reads_nothing(session: ChatSession) -> None:
    "".join(session.send("Name three rivers in Europe."))
    cancel = threading.Event()
    cancel.set()
    assert session.read_ahead("", cancel) == 0
