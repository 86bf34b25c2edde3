"""Read-ahead on a server (issue 18, item 5): llama.cpp's llama-server reads the settled part of
the next prompt into its cache in small steps while it is typed, and the answer is the one a
cold read gets; a stop closes the step under way at once; other servers are sent nothing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import LLAMA_SERVER, LocalServer, ReplayServer, Reply

from phichat.config import Sampling, ServerSettings
from phichat.engine import GenerationStats
from phichat.remote_engine import RemoteEngine
from phichat.session import settled_text

STEP = 64  # tokens per read-ahead step, as the app asks
GREEDY = Sampling(temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=7, max_tokens=16)
FACTS = " ".join(f"Fact {i}: river number {i} is {i * 7} km long." for i in range(24))
QUESTION = f"{FACTS} How long is river number 5?"


@pytest.fixture(scope="module")
def llama_server(
    smollm_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    if not LLAMA_SERVER.is_file():
        message = f"{LLAMA_SERVER} is missing: run .ci/llama-server (it builds it from the sdist)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = LocalServer("llama-server", smollm_path, tmp_path_factory.mktemp("server") / "log")
    yield server
    server.stop()


@pytest.fixture
def engine(llama_server: LocalServer) -> Iterator[RemoteEngine]:
    engine = RemoteEngine.connect(ServerSettings(url=llama_server.url, timeout=60), 1024)
    yield engine
    engine.close()


def answer(
    engine: RemoteEngine, text: str, sampling: Sampling = GREEDY
) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    messages = [{"role": "user", "content": text}]
    return "".join(engine.stream(messages, sampling, stats=stats, conversation="c")), stats


def read_in_steps(engine: RemoteEngine, draft: str) -> list[int]:
    """Read `draft`'s settled part ahead, step by step as the app does; the tokens of each."""
    messages = [{"role": "user", "content": settled_text(draft)}]
    steps = []
    while read := engine.read_ahead(messages, threading.Event(), "c", STEP):
        steps.append(read)
    return steps


@pytest.mark.slow
def test_a_read_ahead_fills_the_servers_cache_and_the_answer_is_the_cold_one(
    engine: RemoteEngine,
) -> None:
    cold, cold_stats = answer(engine, QUESTION)
    assert cold_stats.prompt_tokens - cold_stats.cached_tokens > 200  # read after Enter
    answer(engine, "Hi")  # the server's cache holds another prompt now

    steps = read_in_steps(engine, QUESTION)
    assert sum(steps) > 200 and max(steps) <= STEP
    assert read_in_steps(engine, QUESTION) == []  # read once

    warm, stats = answer(engine, QUESTION)
    assert warm == cold
    assert stats.prompt_tokens == cold_stats.prompt_tokens
    assert stats.prompt_tokens - stats.cached_tokens <= 12  # the last word and the template's


@pytest.mark.slow
def test_after_an_answer_the_next_read_ahead_keeps_what_the_server_holds(
    engine: RemoteEngine,
) -> None:
    first, _ = answer(engine, QUESTION)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first}]
    draft = "And how long is river number 9?"
    messages = [*history, {"role": "user", "content": settled_text(draft)}]
    steps = []
    while read := engine.read_ahead(messages, threading.Event(), "c", STEP):
        steps.append(read)
    assert 0 < sum(steps) < 40  # a first step of 64 would have made the server drop the rest

    stats = GenerationStats()
    "".join(engine.stream([*history, {"role": "user", "content": draft}], GREEDY, stats=stats))
    assert stats.prompt_tokens - stats.cached_tokens <= 12


@pytest.mark.slow
def test_a_stopped_read_ahead_closes_its_step_at_once_and_frees_the_server(
    engine: RemoteEngine,
) -> None:
    long = " ".join(f"Lake {i} lies {i * 3} m above the sea." for i in range(110))
    messages = [{"role": "user", "content": long}]
    started = time.perf_counter()
    first = engine.read_ahead(messages, threading.Event(), "c", STEP)
    assert 0 < first <= STEP
    per_token_s = (time.perf_counter() - started) / first
    cancel = threading.Event()

    def read_on() -> None:
        while engine.read_ahead(messages, cancel, "c", STEP):
            pass

    reader = threading.Thread(target=read_on)
    reader.start()
    time.sleep(STEP * per_token_s / 2)  # mid-step
    cancel.set()
    stopped = time.perf_counter()
    reader.join(timeout=30)
    assert time.perf_counter() - stopped < 1.0

    started = time.perf_counter()
    hi, _ = answer(engine, "Hi", Sampling(temperature=0.0, max_tokens=1))
    took = time.perf_counter() - started
    rest_s = (engine.count_tokens(long) - STEP) * per_token_s
    assert hi
    assert took < rest_s / 3, f"the next answer took {took:.1f}s; the rest to read: {rest_s:.1f}s"


def test_other_servers_are_sent_nothing_before_enter() -> None:
    models = Reply(body={"data": [{"id": "m", "owned_by": "someone"}]})
    server = ReplayServer({"GET /v1/models": models})
    try:
        engine = RemoteEngine.connect(ServerSettings(url=server.url, kind="generic"), 1024)
        messages = [{"role": "user", "content": "a draft being typed"}]
        assert engine.read_ahead(messages, threading.Event(), "c", STEP) == 0
        assert [r.path for r in server.received] == ["/v1/models"]
        engine.close()
    finally:
        server.close()


def test_a_read_ahead_the_server_refuses_is_quiet() -> None:
    server = ReplayServer(
        {
            "GET /v1/models": Reply(body={"data": [{"id": "m", "owned_by": "llamacpp"}]}),
            "POST /apply-template": Reply(500, {"error": {"message": "no template"}}),
        }
    )
    try:
        engine = RemoteEngine.connect(ServerSettings(url=server.url), 1024)
        assert engine.kind == "llama-server"
        messages = [{"role": "user", "content": "a draft being typed"}]
        assert engine.read_ahead(messages, threading.Event(), "c", STEP) == 0
        assert server.requests_to("POST", "/apply-template")
        engine.close()
    finally:
        server.close()
