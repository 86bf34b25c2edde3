"""Reading the message while it is typed (issue 18): the engine reads the settled part of the
next prompt into the KV cache ahead of Enter, and the answer is exactly the cold answer. Real
llama.cpp on SmolLM2 (whose answer depends on every token read) and the wired tiny Phi-3
(Phi-3's tokenizer and template, through the session)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_phi3 import ANSWER

from phichat.config import EngineSettings, Sampling, load_settings
from phichat.engine import GenerationStats
from phichat.llama_engine import LlamaEngine
from phichat.session import ChatSession, settled_text

GREEDY = Sampling(temperature=0.0, max_tokens=24)
HISTORY = [
    {"role": "system", "content": "You are a terse geography tutor."},
    {"role": "user", "content": "Name three rivers in Europe."},
    {"role": "assistant", "content": "The Danube, the Rhine and the Loire."},
]
DRAFT = "Which of those rivers is the longest, and through which countries does it flow?"
EDITED = "Which of those mountains is the highest, and through which countries does it flow?"
PASTE = " ".join(
    f"Line {n}: the ferry left the harbour at {n} past six and reached the island by noon."
    for n in range(24)
)  # about 600 tokens


@pytest.fixture(scope="module")
def engine(smollm_path: Path) -> Iterator[LlamaEngine]:
    loaded = LlamaEngine.load(smollm_path, "cpu", EngineSettings(n_ctx=2048, threads=2))
    yield loaded
    loaded.close()


def prompt(text: str) -> list[dict[str, str]]:
    return [*HISTORY, {"role": "user", "content": text}]


def held(engine: LlamaEngine) -> list[int]:
    """The tokens the context holds."""
    return engine.llama.input_ids[: engine.llama.n_tokens].tolist()


def answer(engine: LlamaEngine, text: str) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    return "".join(engine.stream(prompt(text), GREEDY, stats=stats)), stats


def cold(engine: LlamaEngine, text: str) -> str:
    """The answer to `text` with nothing in the context."""
    engine.llama.n_tokens = 0
    return answer(engine, text)[0]


def read(
    engine: LlamaEngine,
    draft: str,
    cancel: threading.Event | None = None,
    limit: int | None = None,
) -> int:
    messages = prompt(settled_text(draft))
    return engine.read_ahead(messages, cancel or threading.Event(), limit=limit)


@pytest.mark.parametrize(
    ("draft", "settled"),
    [
        ("Which of those riv", "Which of those"),
        ("Which of those ", "Which of those"),
        ("one\nline\tand  more", "one\nline\tand"),
        ("word", ""),
        ("", ""),
    ],
)
def test_the_settled_part_of_a_draft_ends_at_its_last_complete_word(
    draft: str, settled: str
) -> None:
    assert settled_text(draft) == settled


@pytest.mark.slow
def test_an_answer_after_reading_ahead_is_the_answer_read_cold(engine: LlamaEngine) -> None:
    expected = cold(engine, DRAFT)
    engine.llama.n_tokens = 0
    done = read(engine, DRAFT)
    assert done == len(held(engine)) > len(engine.prompt_tokens(HISTORY))
    after, stats = answer(engine, DRAFT)
    assert after == expected
    assert stats.cached_tokens >= done
    assert stats.prompt_tokens - stats.cached_tokens <= 12  # the last word and the template


@pytest.mark.slow  # two greedy answers, cold and after the read-ahead
def test_an_edit_before_the_read_point_rolls_back_to_it(engine: LlamaEngine) -> None:
    expected = cold(engine, EDITED)
    engine.llama.n_tokens = 0
    read(engine, DRAFT)
    before = held(engine)
    settled = engine._settled_tokens(prompt(settled_text(EDITED)))
    shared = engine.llama.longest_token_prefix(before, settled)
    assert shared < len(before)  # the edit is before the read point
    assert read(engine, EDITED) == len(settled) - shared
    assert held(engine) == settled  # nothing of the old draft past the edit is left
    after, _ = answer(engine, EDITED)
    assert after == expected


def test_a_read_ahead_in_steps_reads_on_where_the_last_step_ended(engine: LlamaEngine) -> None:
    engine.llama.n_tokens = 0
    whole = len(engine._settled_tokens(prompt(settled_text(DRAFT))))
    steps = []
    while step := read(engine, DRAFT, limit=10):
        steps.append(step)
    assert steps[:-1] == [10] * (len(steps) - 1) and sum(steps) == whole == len(held(engine))


def test_typing_is_read_ahead_on_one_thread_fewer_and_a_paste_on_all(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llama_cpp

    ctx = engine.llama.ctx
    threads: list[tuple[int, int, int]] = []  # (tokens, threads, batch threads) of each step
    evaluate = engine._eval

    def spy(pending: list[int], cancel: threading.Event | None) -> bool:
        threads.append(
            (len(pending), llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx))
        )
        return evaluate(pending, cancel)

    monkeypatch.setattr(engine, "_eval", spy)
    engine.llama.n_tokens = 0
    read(engine, DRAFT)  # the history and the draft at once: a large step
    read(engine, DRAFT + " Also, which")  # a word or two typed on: a small step
    read(engine, DRAFT + " " + PASTE + " x")  # a paste
    assert threads[0][0] >= 32 and threads[0][1:] == (2, 2)
    assert threads[1][0] < 32 and threads[1][1:] == (1, 1)
    assert threads[2][0] >= 32 and threads[2][1:] == (2, 2)
    answer(engine, DRAFT)  # the answer reads its few new tokens on every thread
    assert threads[-1][0] < 32 and threads[-1][1:] == (2, 2)
    assert (llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)) == (2, 2)


def test_text_deleted_at_the_end_keeps_what_was_read(engine: LlamaEngine) -> None:
    engine.llama.n_tokens = 0
    read(engine, DRAFT)
    before = held(engine)
    assert read(engine, DRAFT[: len(DRAFT) // 2]) == 0  # typed again, it is read already
    assert held(engine) == before


@pytest.mark.slow
def test_a_cancelled_read_ahead_stops_at_once_and_the_answer_is_still_right(
    engine: LlamaEngine,
) -> None:
    expected = cold(engine, PASTE + " What time")
    engine.llama.n_tokens = 0
    cancel = threading.Event()
    assert read(engine, PASTE, cancel, limit=64) == 64
    assert read(engine, PASTE, cancel) > 0
    total = len(held(engine))
    assert total > engine.llama.n_batch  # read in more than one step
    engine.llama.n_tokens = 0
    done: list[int] = []
    reader = threading.Thread(target=lambda: done.append(read(engine, PASTE, cancel)))
    reader.start()
    while not engine.lock.locked() and reader.is_alive():  # until a step is under way
        time.sleep(0.001)
    cancel.set()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert done[0] < total  # stopped before the end
    assert len(held(engine)) == done[0]
    assert read(engine, PASTE, cancel) == 0  # cancelled before it starts: nothing read
    after, stats = answer(engine, PASTE + " What time")
    assert after == expected
    assert stats.cached_tokens == done[0]


@pytest.fixture
def session(tiny_phi3_path: Path) -> Iterator[ChatSession]:
    settings = load_settings(
        "cpu",
        overrides={
            "model": {"path": str(tiny_phi3_path)},
            "engine": {"n_ctx": 1024, "threads": 2, "state_cache_mb": 0},
            "sampling": {"temperature": 0.0, "max_tokens": 8},
            "chat": {"system": "Answer briefly."},
        },
    )
    opened = ChatSession.open(settings, remember=False)  # no embedder: nothing overflows here
    yield opened
    opened.close()


def test_the_session_reads_the_draft_ahead_on_phi3_and_enter_reads_only_its_end(
    session: ChatSession,
) -> None:
    assert "".join(session.send("Name three rivers in Europe.")) == ANSWER
    assert session.read_ahead(DRAFT, threading.Event()) > 0
    assert "".join(session.send(DRAFT)) == ANSWER
    stats = session.last_stats
    assert stats is not None
    assert stats.prompt_tokens - stats.cached_tokens <= 12


def test_the_session_reads_an_edit_of_the_last_message_ahead(session: ChatSession) -> None:
    assert "".join(session.send("Name three rivers in Europe.")) == ANSWER
    assert "".join(session.send(DRAFT)) == ANSWER
    assert session.read_ahead(EDITED, threading.Event(), editing=True) > 0
    assert "".join(session.edit_last(EDITED)) == ANSWER
    stats = session.last_stats
    assert stats is not None
    assert stats.prompt_tokens - stats.cached_tokens <= 12
