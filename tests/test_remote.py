"""The remote engine against real servers on loopback ports.

llama-cpp-python's `llama_cpp.server` and llama.cpp's own `llama-server` (built by .ci/llama-server)
serve SmolLM2; every test that needs a model runs against both. Error cases use real sockets: a
closed port, a port that never answers, and a tiny HTTP server returning 401/404/500. vLLM and
Ollama cannot run here: their recorded responses (tests/data/remote) are replayed over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import (
    LLAMA_SERVER,
    MODEL_ALIAS,
    LocalServer,
    ReplayServer,
    Reply,
    closed_port,
    silent_port,
    sse,
)

from phichat.config import Sampling
from phichat.engine import GenerationStats
from phichat.errors import PhichatError, UsageError
from phichat.remote_engine import RemoteEngine, ServerSettings, split_url

RECORDED = Path(__file__).parent / "data" / "remote"
SERVER_KINDS = ["llama-cpp-python", "llama-server"]
FALLBACK_CTX = 1024
JSON = "application/json"
GREEDY = Sampling(temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=7, max_tokens=48)
# Greedy, SmolLM2 answers this with "hello, hello, ..." past 1000 tokens on both servers.
LONG_ANSWER = [{"role": "user", "content": "Write the word hello 500 times, separated by spaces."}]
LONG = Sampling(temperature=0.0, repeat_penalty=1.0, seed=1, max_tokens=1000)


def start_server(kind: str, model: Path, log: Path) -> LocalServer:
    """A llama_cpp.server or llama-server on SmolLM2 (llama-server skipped if not built)."""
    if kind == "llama-server" and not LLAMA_SERVER.is_file():
        message = f"{LLAMA_SERVER} is missing: run .ci/llama-server (it builds it from the sdist)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return LocalServer(kind, model, log)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def local_server(
    request: pytest.FixtureRequest, smollm_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    server = start_server(request.param, smollm_path, tmp_path_factory.mktemp("server") / "log")
    yield server
    server.stop()


@pytest.fixture
def engine(local_server: LocalServer) -> Iterator[RemoteEngine]:
    engine = RemoteEngine.connect(ServerSettings(url=local_server.url, timeout=30), FALLBACK_CTX)
    yield engine
    engine.close()


@pytest.fixture
def replays() -> Iterator[list[ReplayServer]]:
    """Replay servers a test starts, closed after it."""
    started: list[ReplayServer] = []
    yield started
    for server in started:
        server.close()


def replay(replays: list[ReplayServer], routes: dict[str, Reply]) -> ReplayServer:
    server = ReplayServer(routes)
    replays.append(server)
    return server


def recorded(name: str) -> dict[str, Reply]:
    """A server's recorded responses, keyed by "METHOD /path"."""
    data = json.loads((RECORDED / f"{name}.json").read_text())
    return {
        key: Reply(
            value.get("status", 200), value["body"], value.get("content_type", "application/json")
        )
        for key, value in data.items()
        if not key.startswith("_")
    }


def connect_error(url: str, **settings: object) -> str:
    """The one line RemoteEngine.connect fails with."""
    with pytest.raises(PhichatError) as caught:
        RemoteEngine.connect(ServerSettings(url=url, **settings), FALLBACK_CTX)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- against real llama.cpp servers ---------------------------------------------------------


def test_connect_learns_kind_model_window_and_tokenizer(
    local_server: LocalServer, engine: RemoteEngine, smollm_path: Path
) -> None:
    from llama_cpp import Llama

    assert engine.kind == local_server.kind
    assert engine.device == "server"
    assert engine.model_label == MODEL_ALIAS
    assert engine.device_label == f"127.0.0.1:{local_server.port}"
    # llama-server says its window in /props; llama_cpp.server does not, so the config's applies
    assert engine.n_ctx == (2048 if local_server.kind == "llama-server" else FALLBACK_CTX)
    vocab = Llama(str(smollm_path), vocab_only=True, verbose=False)
    for text in ["hello world", "Ünïcödé, 数字 123!\n\n  indented", ""]:
        expected = len(vocab.tokenize(text.encode(), add_bos=False, special=False))
        assert engine.count_tokens(text) == expected


def test_greedy_answer_is_the_servers_own_answer(
    local_server: LocalServer, engine: RemoteEngine
) -> None:
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours of the rainbow."},
    ]
    stats = GenerationStats()
    streamed = "".join(engine.stream(messages, GREEDY, stats=stats))

    body = engine.request_body(messages, GREEDY, seed=7)
    body.update(stream=False)
    del body["stream_options"]
    answer = httpx.post(f"{local_server.url}/chat/completions", json=body, timeout=60).json()
    choice = answer["choices"][0]
    assert streamed and streamed == choice["message"]["content"].lstrip()
    assert stats.finish == choice["finish_reason"]
    assert stats.generated_tokens == answer["usage"]["completion_tokens"]
    assert stats.seed == 7
    assert 0 < stats.ttft_s < 30 and stats.decode_s > 0


def test_stop_mid_answer_closes_it_and_frees_the_server(
    local_server: LocalServer, engine: RemoteEngine
) -> None:
    cancel, stats, parts = threading.Event(), GenerationStats(), []
    for chunk in engine.stream(LONG_ANSWER, LONG, cancel, stats):
        parts.append(chunk)
        if len(parts) == 20:
            cancel.set()
            stopped_at = time.perf_counter()
    stop_s = time.perf_counter() - stopped_at
    assert len(parts) == 20 and stats.finish == "stopped"

    # Left running, the server would still be generating 980 tokens at this answer's pace.
    rest_s = (LONG.max_tokens - stats.generated_tokens) * stats.decode_s / 19
    assert stop_s < rest_s / 4, f"the stop took {stop_s:.2f}s"
    started = time.perf_counter()
    answer = list(engine.stream([{"role": "user", "content": "Hi"}], GREEDY, stats=None))
    took = time.perf_counter() - started
    assert answer
    assert took < rest_s / 4, (
        f"the next answer took {took:.2f}s; the stopped one had {rest_s:.1f}s left"
    )


def test_stop_while_the_server_says_nothing_returns_at_once() -> None:
    with silent_port() as port:
        settings = ServerSettings(url=f"http://127.0.0.1:{port}/v1", model="m", timeout=60)
        engine = RemoteEngine(settings, FALLBACK_CTX)
        cancel, stats = threading.Event(), GenerationStats()
        threading.Timer(0.3, cancel.set).start()
        started = time.perf_counter()
        assert list(engine.stream(LONG_ANSWER, GREEDY, cancel, stats)) == []
        took = time.perf_counter() - started
        engine.close()
    assert took < 5, f"the stop took {took:.1f}s"
    assert stats.finish == "stopped"


def test_unknown_model_lists_the_servers_models(local_server: LocalServer) -> None:
    message = connect_error(local_server.url, model="phi-3-mini")
    assert f"127.0.0.1:{local_server.port} has no model 'phi-3-mini'" in message
    assert f"it serves: {MODEL_ALIAS}" in message


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_server_dying_mid_answer_raises_after_what_came(
    kind: str, smollm_path: Path, tmp_path: Path
) -> None:
    server = start_server(kind, smollm_path, tmp_path / "log")
    try:
        engine = RemoteEngine.connect(ServerSettings(url=server.url, timeout=30), FALLBACK_CTX)
        stats, parts = GenerationStats(), []
        with pytest.raises(PhichatError) as caught:
            for chunk in engine.stream(LONG_ANSWER, LONG, stats=stats):
                parts.append(chunk)
                if len(parts) == 10:
                    server.kill()
        engine.close()
    finally:
        server.stop()
    message = str(caught.value)
    assert f"127.0.0.1:{server.port} hung up mid-answer after" in message
    assert "what came is kept" in message and "\n" not in message
    assert len(parts) >= 10 and stats.finish == "stopped"


# --- errors against real sockets ------------------------------------------------------------


def test_connection_refused() -> None:
    port = closed_port()
    message = connect_error(f"http://127.0.0.1:{port}/v1")
    assert message == f"cannot reach 127.0.0.1:{port}: connection refused (is the server running?)"


def test_a_port_that_never_answers_times_out() -> None:
    with silent_port() as port:
        started = time.perf_counter()
        message = connect_error(f"http://127.0.0.1:{port}/v1", timeout=0.5)
        assert time.perf_counter() - started < 5
    assert f"127.0.0.1:{port} accepted the connection but said nothing for 0.5s" in message


def test_unknown_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_host(host: str, *args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # No name lookup leaves this machine: the resolver answers "no such host" here.
    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    message = connect_error("http://gpu-box.invalid:8080/v1")
    assert message == "cannot reach gpu-box.invalid:8080: unknown host 'gpu-box.invalid'"


def test_tls_to_a_plain_http_server_fails_in_one_line(replays: list[ReplayServer]) -> None:
    server = replay(replays, {})
    message = connect_error(f"https://127.0.0.1:{server.port}/v1")
    assert message.startswith(f"TLS with 127.0.0.1:{server.port} failed (")
    assert "http:// vs https://" in message


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_names_the_variable_not_the_key(
    status: int, replays: list[ReplayServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = Reply(status, {"error": {"message": "Invalid API key", "type": "auth_error"}})
    server = replay(replays, {"GET /v1/models": refused})
    monkeypatch.setenv("PHICHAT_TEST_KEY", "sk-wrong-123")
    message = connect_error(server.url, api_key_env="PHICHAT_TEST_KEY")
    assert message == (
        f"127.0.0.1:{server.port} refused the API key (HTTP {status}: Invalid API key); "
        "check the key in $PHICHAT_TEST_KEY"
    )
    assert server.received[0].headers["Authorization"] == "Bearer sk-wrong-123"

    monkeypatch.delenv("PHICHAT_TEST_KEY")
    assert connect_error(server.url, api_key_env="PHICHAT_TEST_KEY").endswith(
        "; $PHICHAT_TEST_KEY is not set"
    )
    assert "Authorization" not in server.received[-1].headers
    assert connect_error(server.url).endswith(
        "put the name of the variable holding the key in [server] api_key_env"
    )


def test_unknown_model_and_wrong_path(replays: list[ReplayServer]) -> None:
    models = Reply(body={"object": "list", "data": [{"id": "qwen"}, {"id": "mistral"}]})
    server = replay(replays, {"GET /v1/models": models})
    message = connect_error(server.url, model="phi3")
    assert message == f"127.0.0.1:{server.port} has no model 'phi3'; it serves: qwen, mistral"

    message = connect_error(f"http://127.0.0.1:{server.port}/api")
    assert message == (
        f"127.0.0.1:{server.port}: HTTP 404 for /api/models (Not Found); "
        "is the URL right (it usually ends in /v1)?"
    )


def test_model_gone_from_the_server_between_answers(replays: list[ReplayServer]) -> None:
    routes = recorded("vllm")
    server = replay(replays, routes)
    engine = RemoteEngine.connect(ServerSettings(url=server.url), FALLBACK_CTX)
    # the model is swapped on the server: chat answers vLLM's 404, and /v1/models lists another
    routes["POST /v1/chat/completions"] = routes["unknown model"]
    routes["GET /v1/models"] = Reply(body={"object": "list", "data": [{"id": "llama-70b"}]})
    with pytest.raises(PhichatError) as caught:
        list(engine.stream([{"role": "user", "content": "hi"}], GREEDY))
    engine.close()
    assert str(caught.value) == (
        f"127.0.0.1:{server.port} has no model 'meta-llama/Llama-3.1-8B-Instruct'; "
        "it serves: llama-70b"
    )


def test_server_error_during_an_answer(replays: list[ReplayServer]) -> None:
    failed = Reply(500, {"error": {"message": "CUDA error: out of memory", "code": 500}})
    server = replay(
        replays,
        {
            "GET /v1/models": Reply(body={"data": [{"id": "big"}]}),
            "POST /v1/chat/completions": failed,
        },
    )
    engine = RemoteEngine.connect(ServerSettings(url=server.url), FALLBACK_CTX)
    stats = GenerationStats()
    with pytest.raises(PhichatError) as caught:
        list(engine.stream([{"role": "user", "content": "hi"}], GREEDY, stats=stats))
    engine.close()
    assert (
        str(caught.value) == f"127.0.0.1:{server.port} failed (HTTP 500: CUDA error: out of memory)"
    )
    assert stats.finish == "stopped" and stats.generated_tokens == 0


def test_error_event_mid_stream_keeps_the_text_before_it(replays: list[ReplayServer]) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "Partial"}, "finish_reason": None}]}
    error = {"error": {"code": 500, "message": "decode failed", "type": "server_error"}}
    stream = Reply(body=sse([chunk, error]), content_type="text/event-stream")
    server = replay(
        replays,
        {
            "GET /v1/models": Reply(body={"data": [{"id": "m"}]}),
            "POST /v1/chat/completions": stream,
        },
    )
    engine = RemoteEngine.connect(ServerSettings(url=server.url), FALLBACK_CTX)
    parts: list[str] = []
    stats = GenerationStats()
    with pytest.raises(PhichatError, match="the server failed mid-answer: decode failed"):
        parts.extend(engine.stream([{"role": "user", "content": "hi"}], GREEDY, stats=stats))
    engine.close()
    assert parts == ["Partial"] and stats.finish == "stopped"


def test_urls_with_and_without_v1() -> None:
    assert split_url("http://gpu-box:8080/v1") == ("http://gpu-box:8080/v1", "http://gpu-box:8080")
    assert split_url("http://gpu-box:8080/") == ("http://gpu-box:8080/v1", "http://gpu-box:8080")
    assert split_url("https://h/openai/v1/") == ("https://h/openai/v1", "https://h")
    for bad in ["gpu-box:8080", "ftp://gpu-box/v1", "http:///v1"]:
        with pytest.raises(UsageError, match="must look like http://host:port/v1"):
            split_url(bad)


# --- vLLM and Ollama, replayed from their recorded responses --------------------------------

MAPPED = Sampling(
    temperature=0.3, top_p=0.9, repeat_penalty=1.2, repeat_last_n=64, seed=11, max_tokens=100
)


def test_vllm_mapping(replays: list[ReplayServer]) -> None:
    server = replay(replays, recorded("vllm"))
    engine = RemoteEngine.connect(ServerSettings(url=server.url), FALLBACK_CTX)
    assert engine.kind == "vllm"
    assert engine.model_label == "meta-llama/Llama-3.1-8B-Instruct"
    assert engine.n_ctx == 8192  # max_model_len from /v1/models

    assert engine.count_tokens("Hello, world!") == 4
    asked = server.requests_to("POST", "/tokenize")[-1].body
    assert asked == {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "prompt": "Hello, world!",
        "add_special_tokens": False,
    }

    stats = GenerationStats()
    messages = [{"role": "user", "content": "Hi"}]
    assert "".join(engine.stream(messages, MAPPED, stats=stats)) == "Hello! How can I help?"
    assert (stats.prompt_tokens, stats.generated_tokens, stats.finish) == (42, 7, "end")
    body = server.requests_to("POST", "/v1/chat/completions")[0].body
    assert body["repetition_penalty"] == 1.2
    assert not {"repeat_penalty", "repeat_last_n", "top_k", "min_p"} & body.keys()
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"]) == (
        0.3,
        0.9,
        11,
        100,
    )
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == messages

    notices = engine.take_notices(MAPPED)
    assert notices == ["vLLM applies repeat_penalty to the whole text; repeat_last_n is ignored"]
    assert engine.take_notices(MAPPED) == []
    engine.close()


def test_ollama_mapping(replays: list[ReplayServer]) -> None:
    server = replay(replays, recorded("ollama"))
    engine = RemoteEngine.connect(ServerSettings(url=server.url, model="llama3.2"), FALLBACK_CTX)
    assert engine.kind == "ollama"
    assert engine.model_label == "llama3.2:latest"
    assert engine.n_ctx == 8192  # num_ctx from /api/show, not the model's 131072
    assert server.requests_to("POST", "/api/show")[0].body == {"model": "llama3.2:latest"}

    # Ollama has no tokenizer endpoint: an estimate that errs high (13 bytes / 3)
    assert engine.count_tokens("Hello, world!") == 5
    assert not server.requests_to("POST", "/tokenize")

    stats = GenerationStats()
    messages = [{"role": "user", "content": "Hi"}]
    assert "".join(engine.stream(messages, MAPPED, stats=stats)) == "Hello! How can I help?"
    assert (stats.prompt_tokens, stats.generated_tokens, stats.finish) == (26, 7, "end")
    body = server.requests_to("POST", "/v1/chat/completions")[0].body
    # Ollama substitutes 1.0 for a missing temperature or top_p: both always go
    assert (body["temperature"], body["top_p"], body["seed"], body["max_tokens"]) == (
        0.3,
        0.9,
        11,
        100,
    )
    assert not {"repeat_penalty", "repetition_penalty", "repeat_last_n"} & body.keys()
    assert engine.take_notices(MAPPED) == [
        "Ollama's OpenAI API takes no repeat_penalty: the model's own setting applies"
    ]
    assert engine.take_notices(Sampling(repeat_penalty=1.0)) == []
    engine.close()


def test_ollama_without_num_ctx_assumes_its_default(replays: list[ReplayServer]) -> None:
    routes = recorded("ollama")
    routes["POST /api/show"].body = {**routes["POST /api/show"].body, "parameters": ""}
    server = replay(replays, routes)
    engine = RemoteEngine.connect(ServerSettings(url=server.url), FALLBACK_CTX)
    assert engine.model_label == "llama3.2:latest"  # the first model listed
    assert engine.n_ctx == 2048
    engine.close()


def test_ollama_unknown_model(replays: list[ReplayServer]) -> None:
    server = replay(replays, recorded("ollama"))
    message = connect_error(server.url, model="llama3.3")
    assert message.endswith("it serves: llama3.2:latest, nomic-embed-text:latest")


def test_kind_from_the_config_skips_detection(replays: list[ReplayServer]) -> None:
    server = replay(replays, recorded("vllm"))
    settings = ServerSettings(url=server.url, kind="generic")
    engine = RemoteEngine.connect(settings, FALLBACK_CTX)
    assert (engine.kind, engine.n_ctx) == ("generic", FALLBACK_CTX)
    assert engine.count_tokens("Hello, world!") == 5
    assert [r.path for r in server.received] == ["/v1/models"]
    body = engine.request_body([], MAPPED, seed=1)
    assert not {"repeat_penalty", "repetition_penalty"} & body.keys()
    engine.close()
    with pytest.raises(UsageError, match="unknown server kind 'tgi'"):
        RemoteEngine.connect(ServerSettings(url=server.url, kind="tgi"), FALLBACK_CTX)
