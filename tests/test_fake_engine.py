"""The scripted engine keeps the contract the llama.cpp engine keeps, so tests that drive the
session and the app with it see what they would see with a model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_engine import ANSWER, STORY, FakeEngine, tokens_of

from phichat.config import SEED_MAX, EngineSettings, Sampling
from phichat.engine import ChatEngine, GenerationStats
from phichat.errors import UsageError

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
LONG = Sampling(temperature=0, max_tokens=200)


@pytest.fixture(scope="module")
def smollm(smollm_path: Path) -> Iterator[ChatEngine]:
    from phichat.llama_engine import LlamaEngine

    real = LlamaEngine.load(smollm_path, "cpu", EngineSettings(n_ctx=2048, threads=2))
    yield real
    real.close()


@pytest.fixture(params=[pytest.param("llama.cpp", marks=pytest.mark.slow), "scripted"])
def engine(request: pytest.FixtureRequest) -> ChatEngine:
    """The real engine on SmolLM2, then the scripted one telling the story."""
    if request.param == "scripted":
        return FakeEngine(STORY, n_ctx=2048)
    return request.getfixturevalue("smollm")


def test_max_tokens_ends_the_answer_with_length(engine: ChatEngine) -> None:
    stats = GenerationStats()
    text = "".join(engine.stream(CHAT, Sampling(temperature=0, max_tokens=5), stats=stats))
    assert text and (stats.generated_tokens, stats.finish) == (5, "length")
    assert stats.prompt_tokens > 5
    # the seed drawn for each answer is reported; a seed given is the one used
    again, given = GenerationStats(), GenerationStats()
    assert list(engine.stream(CHAT, Sampling(temperature=0, max_tokens=1), stats=again))
    given_seed = Sampling(temperature=0, max_tokens=1, seed=SEED_MAX)
    assert list(engine.stream(CHAT, given_seed, stats=given))
    assert again.seed != stats.seed and given.seed == SEED_MAX


def test_cancel_stops_after_the_token_in_hand_and_keeps_the_text(engine: ChatEngine) -> None:
    cancel, stats, chunks = threading.Event(), GenerationStats(), []
    for chunk in engine.stream(CHAT, LONG, cancel, stats):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert len(chunks) == 3 and stats.finish == "stopped"
    assert 3 <= stats.generated_tokens <= 4  # llama.cpp may have dropped a blank leading token


def test_cancel_before_the_first_token_gives_nothing(engine: ChatEngine) -> None:
    cancel, stats = threading.Event(), GenerationStats()
    cancel.set()
    assert list(engine.stream(CHAT, LONG, cancel, stats)) == []
    assert (stats.finish, stats.generated_tokens) == ("stopped", 0)


def test_a_prompt_beyond_the_window_is_refused(engine: ChatEngine) -> None:
    too_long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(UsageError, match="context window"):
        list(engine.stream(too_long, LONG))


def test_a_held_answer_waits_for_release_or_cancel() -> None:
    engine = FakeEngine(hold_at=2)
    stream = engine.stream(CHAT, LONG)
    assert [next(stream), next(stream)] == tokens_of(ANSWER)[:2]
    rest: list[str] = []
    reader = threading.Thread(target=lambda: rest.extend(stream))
    reader.start()
    assert engine.holding.wait(30)
    engine.release(1)
    engine.release()
    reader.join(30)
    assert "".join(tokens_of(ANSWER)[:2] + rest) == ANSWER and not engine.holding.is_set()

    cancel, stats = threading.Event(), GenerationStats()
    held = threading.Thread(target=lambda: list(engine.stream(CHAT, LONG, cancel, stats)))
    held.start()
    assert engine.holding.wait(30)
    cancel.set()
    held.join(30)
    assert (stats.finish, stats.generated_tokens) == ("stopped", 2)
