"""The remote engine, and phichat on it (settings, `--prompt`, the app), against real servers
on loopback ports.

llama-cpp-python's `llama_cpp.server` and llama.cpp's own `llama-server` (built by .ci/llama-server)
serve SmolLM2; every test that needs a model runs against both. Error cases use real sockets: a
closed port, a port that never answers, and a tiny HTTP server returning 401/404/500. vLLM and
Ollama cannot run here: their recorded responses (tests/data/remote) are replayed over HTTP.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from helpers import SIZE, ask, notes, ready, until, wait_until
from servers import (
    LLAMA_SERVER,
    MODEL_ALIAS,
    LocalServer,
    RawServer,
    ReplayServer,
    Reply,
    closed_port,
    silent_port,
    sse,
)

from phichat.config import (
    SERVER,
    Sampling,
    ServerSettings,
    Settings,
    load_settings,
    split_server_url,
)
from phichat.engine import Finish, GenerationStats
from phichat.errors import PhichatError, UsageError
from phichat.remote_engine import SSE_LINE_LIMIT, TOKEN_TEXT_LIMIT, RemoteEngine
from phichat.store import Conversation, Message, Status, Store, default_path
from phichat.tui.app import PhichatApp
from phichat.tui.chat import AnswerMessage
from phichat.tui.prompt import PromptInput
from phichat.tui.status import StatusLine

if TYPE_CHECKING:
    from conftest import CliRun

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


def servers_own_answer(
    engine: RemoteEngine, messages: list[dict[str, str]], sampling: Sampling
) -> dict:
    """The server's non-streamed answer to the request phichat streams for `messages`."""
    body = engine.request_body(messages, sampling, seed=sampling.seed or 0)
    body.update(stream=False)
    del body["stream_options"]
    return httpx.post(f"{engine.api}/chat/completions", json=body, timeout=120).json()


def connect_error(url: str, **settings: object) -> str:
    """The one line RemoteEngine.connect fails with."""
    with pytest.raises(PhichatError) as caught:
        RemoteEngine.connect(ServerSettings(url=url, **settings), FALLBACK_CTX)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# --- against real llama.cpp servers ---------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
def test_greedy_answer_is_the_servers_own_answer(
    local_server: LocalServer, engine: RemoteEngine
) -> None:
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours of the rainbow."},
    ]
    stats = GenerationStats()
    streamed = "".join(engine.stream(messages, GREEDY, stats=stats))

    answer = servers_own_answer(engine, messages, GREEDY)
    choice = answer["choices"][0]
    assert streamed and streamed == choice["message"]["content"].lstrip()
    assert stats.finish == {"stop": Finish.END, "length": Finish.LENGTH}[choice["finish_reason"]]
    assert stats.generated_tokens == answer["usage"]["completion_tokens"]
    assert stats.seed == 7
    assert 0 < stats.ttft_s < 30 and stats.decode_s > 0


@pytest.mark.slow
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


@pytest.mark.slow
def test_unknown_model_lists_the_servers_models(local_server: LocalServer) -> None:
    message = connect_error(local_server.url, model="phi-3-mini")
    assert f"127.0.0.1:{local_server.port} has no model 'phi-3-mini'" in message
    assert f"it serves: {MODEL_ALIAS}" in message


@pytest.mark.slow
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
    root = "http://gpu-box:8080"
    assert split_server_url(f"{root}/v1") == (f"{root}/v1", root)
    assert split_server_url(f"{root}/") == (f"{root}/v1", root)
    assert split_server_url("https://h/openai/v1/") == ("https://h/openai/v1", "https://h")
    for bad in ["gpu-box:8080", "ftp://gpu-box/v1", "http:///v1", "http://h:0", "http://[::1"]:
        with pytest.raises(UsageError, match="must look like http://host:port/v1"):
            split_server_url(bad)


# --- a server trusted only so far: limits, deadlines, odd chunks, stops, secrets ------------

MODELS = Reply(body={"object": "list", "data": [{"id": "m"}]})
HI = [{"role": "user", "content": "hi"}]


def delta(text: object, **choice: object) -> dict:
    """One streamed chunk of an answer."""
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None, **choice}]}


def chat_server(replays: list[ReplayServer], body: list | str) -> ReplayServer:
    """A replay server with one model whose answer is `body` (SSE events, or the raw text)."""
    stream = body if isinstance(body, str) else sse(body)
    chat = Reply(body=stream, content_type="text/event-stream")
    return replay(replays, {"GET /v1/models": MODELS, "POST /v1/chat/completions": chat})


def stream_from(
    url: str,
    sampling: Sampling = GREEDY,
    parts: list[str] | None = None,
    cancel: threading.Event | None = None,
    **settings: object,
) -> GenerationStats:
    """Stream an answer to "hi" from the server at `url` into `parts`; the stats."""
    engine = RemoteEngine(ServerSettings(url=url, model="m", **settings), FALLBACK_CTX)  # type: ignore[arg-type]
    stats = GenerationStats()
    try:
        for chunk in engine.stream(HI, sampling, cancel, stats):
            (parts if parts is not None else []).append(chunk)
    finally:
        engine.close()
    return stats


def stream_error(url: str, sampling: Sampling = GREEDY, **settings: object) -> str:
    """The one line streaming from `url` fails with."""
    with pytest.raises(PhichatError) as caught:
        stream_from(url, sampling, **settings)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400
    return message


def framed_head(framing: str, status: str = "200 OK", kind: str = "text/event-stream") -> bytes:
    """Status line and headers for a body sent chunked, with a length, or until the close."""
    framings = {
        "chunked": "Transfer-Encoding: chunked",
        "length": "Content-Length: 1000000000",
        "close": "Connection: close",
    }
    return f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n{framings[framing]}\r\n\r\n".encode()


def framed(data: bytes, framing: str) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked" else data


def raw_answer(framing: str, deltas: int | None, then: Callable[[socket.socket], None]) -> Callable:
    """A raw server's answer: a model list for GET /v1/models, 404 for the other GETs; to the
    chat request, `deltas` chunks "w0 ", "w1 "... (None: without end, 100 a second), then
    `then(conn)`."""

    def answer(conn: socket.socket, request_line: str) -> None:
        if request_line.startswith("GET /v1/models "):
            body = json.dumps(MODELS.body).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        elif not request_line.startswith("POST /v1/chat/completions "):
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        else:
            conn.sendall(framed_head(framing))
            for n in itertools.count() if deltas is None else range(deltas):
                event = f"data: {json.dumps(delta(f'w{n} '))}\n\n".encode()
                conn.sendall(framed(event, framing))
                time.sleep(0.01)
            then(conn)

    return answer


def silence(conn: socket.socket) -> None:
    time.sleep(60)


def test_max_tokens_is_enforced_when_the_server_ignores_it() -> None:
    with RawServer(raw_answer("chunked", None, silence)) as server:
        parts: list[str] = []
        stats = stream_from(server.url, replace(GREEDY, max_tokens=16), parts)
        # the 17th chunk ends the answer unread, and the connection is closed
        assert server.hung_up.acquire(timeout=10)
    assert parts == [f"w{n} " for n in range(16)]
    assert (stats.finish, stats.generated_tokens) == (Finish.LENGTH, 16)


def test_max_tokens_counts_the_servers_tokens_and_caps_the_text(
    replays: list[ReplayServer],
) -> None:
    # two tokens a chunk, as the server's running usage says: 4 tokens are 2 chunks
    events = [{**delta("ab"), "usage": {"completion_tokens": 2 * n}} for n in range(1, 6)]
    parts: list[str] = []
    stats = stream_from(chat_server(replays, events).url, replace(GREEDY, max_tokens=4), parts)
    assert (parts, stats.finish) == (["ab", "ab"], Finish.LENGTH)

    # a whole answer in one chunk: the text is capped at TOKEN_TEXT_LIMIT characters a token
    server = chat_server(replays, [delta("x" * 10_000), delta("y", finish_reason="stop")])
    parts = []
    stats = stream_from(server.url, replace(GREEDY, max_tokens=2), parts)
    assert ("".join(parts), stats.finish) == ("x" * 2 * TOKEN_TEXT_LIMIT, Finish.LENGTH)

    # a server that honours max_tokens: its finish reason and counts are still read
    events = [delta("a"), delta("b"), delta("c"), delta("", finish_reason="length")]
    events.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})
    parts = []
    stats = stream_from(chat_server(replays, events).url, replace(GREEDY, max_tokens=3), parts)
    assert (parts, stats.finish, stats.prompt_tokens) == (["a", "b", "c"], Finish.LENGTH, 9)


def test_prompt_saves_no_more_than_max_tokens(phichat_cli: CliRun) -> None:
    with RawServer(raw_answer("close", None, silence)) as server:
        result = phichat_cli(
            "--server", server.url, *GREEDY_FLAGS, "--max-tokens", "16", "--prompt", "hi"
        )
    assert (result.returncode, result.stderr) == (0, "")
    [(_, [_, answer])] = saved_conversations()
    assert answer.content.split() == [f"w{n}" for n in range(16)]
    assert result.stdout == answer.content + "\n" and answer.status == Status.FINISHED


def test_a_line_without_end_is_cut_at_its_cap() -> None:
    def endless_line(conn: socket.socket) -> None:
        conn.sendall(b"data: ")
        while True:
            conn.sendall(b"x" * 65536)

    with RawServer(raw_answer("close", 2, endless_line)) as server:
        parts: list[str] = []
        started = time.perf_counter()
        with pytest.raises(PhichatError) as caught:
            stream_from(server.url, GREEDY, parts)
        assert time.perf_counter() - started < 10
        assert server.hung_up.acquire(timeout=10)
    assert str(caught.value) == (
        f"the server sent a line of more than {SSE_LINE_LIMIT >> 20} MiB; "
        "what came before it is kept"
    )
    assert parts == ["w0 ", "w1 "]


def test_a_trickling_server_meets_the_answers_deadline() -> None:
    def trickle(conn: socket.socket) -> None:
        while True:  # an SSE comment, a byte at a time: each read gets something
            conn.sendall(b":")
            time.sleep(0.1)

    with RawServer(raw_answer("close", 1, trickle)) as server:
        parts: list[str] = []
        started = time.perf_counter()
        with pytest.raises(PhichatError) as caught:
            # the deadline: 0.5 s x (1 + 1/64), though no read waits 0.5 s
            stream_from(server.url, replace(GREEDY, max_tokens=1), parts, timeout=0.5)
        assert time.perf_counter() - started < 5
    assert str(caught.value) == (
        f"127.0.0.1:{server.port} did not finish the answer within 0.508s ([server] timeout x "
        "(1 + max_tokens / 64)) after 1 tokens; what came is kept"
    )
    assert parts == ["w0 "]


def endless_error(conn: socket.socket, request_line: str = "") -> None:
    conn.sendall(framed_head("length", "500 Internal Server Error", "text/plain"))
    while True:
        conn.sendall(b"boom\n" * 10_000)


def test_an_error_body_is_read_up_to_its_cap() -> None:
    with RawServer(endless_error) as server:
        message = connect_error(server.url)
        assert server.hung_up.acquire(timeout=10)
        assert message.startswith(f"127.0.0.1:{server.port} failed (HTTP 500: boom boom ")
        assert len(message) < 300
        message = stream_error(server.url)
        assert message.startswith(f"127.0.0.1:{server.port} failed (HTTP 500: boom boom ")


def test_terminal_escapes_in_a_server_message_are_shown_escaped() -> None:
    from phichat.remote_engine import _server_message

    said = b'{"error": {"message": "no \\u001b]52;c;aGk=\\u0007 \\u001b[2J"}}'
    assert _server_message(said) == "no \\x1b]52;c;aGk=\\x07 \\x1b[2J"
    assert _server_message(b"oops \x1b]52;c;aGk=\x07\x1b[2J") == "oops \\x1b]52;c;aGk=\\x07\\x1b[2J"


@pytest.mark.parametrize(
    ("chunk", "why"),
    [
        ('{"choices": "abc"}', "wrong shape (choices is str)"),
        ('{"choices": ["abc"]}', "wrong shape (a choice is str)"),
        ('{"choices": [{"delta": "abc"}]}', "wrong shape (delta is str)"),
        ('{"choices": [{"delta": {"content": 5}}]}', "wrong shape (content is int)"),
        ('{"choices": [{"delta": {}, "finish_reason": [1]}]}', "wrong shape (finish_reason is"),
        ('{"choices": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ("not json", "not JSON: 'not json'"),
    ],
)
def test_a_chunk_of_the_wrong_shape_is_one_line(
    chunk: str, why: str, replays: list[ReplayServer]
) -> None:
    body = f"{sse([delta('Partial')])[: -len('data: [DONE]' + chr(10) * 2)]}data: {chunk}\n\n"
    parts: list[str] = []
    with pytest.raises(PhichatError) as caught:
        stream_from(chat_server(replays, body).url, GREEDY, parts)
    assert str(caught.value).startswith("the server sent a chunk ") and why in str(caught.value)
    assert "\n" not in str(caught.value) and parts == ["Partial"]


def test_odd_counts_in_a_chunk_are_ignored(replays: list[ReplayServer]) -> None:
    odd = {"prompt_tokens": "many", "prompt_tokens_details": "x", "completion_tokens": [1]}
    events = [{**delta("ok", finish_reason="stop"), "usage": odd, "timings": {"cache_n": "?"}}]
    parts: list[str] = []
    stats = stream_from(chat_server(replays, events).url, GREEDY, parts)
    assert (parts, stats.finish, stats.generated_tokens) == (["ok"], Finish.END, 1)


def test_prompt_with_a_chunk_of_the_wrong_shape(
    replays: list[ReplayServer], phichat_cli: CliRun
) -> None:
    server = chat_server(replays, [delta("Partial"), {"choices": "abc"}])
    result = phichat_cli("--server", server.url, *GREEDY_FLAGS, "--prompt", "hi")
    assert (result.returncode, result.stdout) == (1, "Partial\n")
    assert result.stderr == (
        "phichat: error: the server sent a chunk of the wrong shape (choices is str); "
        "what came before it is kept\n"
    )


@pytest.mark.parametrize("framing", ["close", "length", "chunked"])
def test_a_stop_ends_quietly_whatever_the_framing(framing: str) -> None:
    with RawServer(raw_answer(framing, 3, silence)) as server:
        cancel, parts = threading.Event(), []
        threading.Timer(0.5, cancel.set).start()  # while the server says nothing
        started = time.perf_counter()
        stats = stream_from(server.url, GREEDY, parts, cancel)
        assert time.perf_counter() - started < 5
    assert parts == ["w0 ", "w1 ", "w2 "] and stats.finish == Finish.STOPPED


@pytest.mark.slow
@pytest.mark.parametrize(
    ("framing", "signum"), [("close", signal.SIGTERM), ("length", signal.SIGINT)]
)
def test_a_signal_stops_a_prompt_quietly_whatever_the_framing(framing: str, signum: int) -> None:
    with RawServer(raw_answer(framing, 3, silence)) as server:
        command = [sys.executable, "-m", "phichat", "--server", server.url, *GREEDY_FLAGS]
        command += ["--prompt", "hi"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout = process.stdout
        assert stdout is not None
        first = b""

        def all_three_words_printed() -> bool:  # then the server says nothing
            nonlocal first
            first += os.read(stdout.fileno(), 1 << 16)
            return b"w2" in first

        wait_until(all_three_words_printed, "the three words", every=0)
        process.send_signal(signum)
        rest, err = process.communicate(timeout=30)
    assert (process.returncode, err.decode()) == (128 + signum, "")
    [(_, [_, answer])] = saved_conversations()
    assert (first + rest).decode() == answer.content + "\n"
    assert answer.content.split() == ["w0", "w1", "w2"] and answer.status == Status.STOPPED


@pytest.mark.parametrize("key", ["sk-secret\nX-Evil: 1", "sk-sécret", " sk-secret"])
def test_a_key_a_header_cannot_carry_is_refused_unshown(
    key: str, replays: list[ReplayServer], monkeypatch: pytest.MonkeyPatch, phichat_cli: CliRun,
    tmp_path: Path,
) -> None:  # fmt: skip
    server = replay(replays, {"GET /v1/models": MODELS})
    monkeypatch.setenv("PHICHAT_TEST_KEY", key)
    refused = (
        "$PHICHAT_TEST_KEY holds what an HTTP header cannot carry (a line break, a control or "
        "non-ASCII character, or spaces around it); the key is not shown"
    )
    assert connect_error(server.url, api_key_env="PHICHAT_TEST_KEY") == refused
    config = tmp_path / "key.toml"
    config.write_text('[server]\napi_key_env = "PHICHAT_TEST_KEY"\n')
    result = phichat_cli("--server", server.url, "--config", str(config), "--prompt", "hi")
    assert (result.returncode, result.stderr) == (2, f"phichat: error: {refused}\n")
    assert not server.received


def test_a_password_in_the_url_is_never_shown(replays: list[ReplayServer]) -> None:
    port = closed_port()
    message = connect_error(f"http://me:hunter2@127.0.0.1:{port}/v1")
    assert message == f"cannot reach 127.0.0.1:{port}: connection refused (is the server running?)"

    server = replay(replays, {"GET /v1/models": Reply(body={"data": "none"})})
    message = connect_error(f"http://me:hunter2@127.0.0.1:{server.port}/v1")
    assert message.startswith(
        f"127.0.0.1:{server.port}: http://me:***@127.0.0.1:{server.port}/v1/models did not answer"
    )
    assert server.received[0].headers["Authorization"].startswith("Basic ")  # sent, not shown
    with pytest.raises(UsageError) as caught:
        split_server_url("http://me:hunter2@gpu-box:99999/v1")
    assert "hunter2" not in str(caught.value) and "me:***@gpu-box" in str(caught.value)


def test_a_server_listing_20000_models_gets_a_short_line(replays: list[ReplayServer]) -> None:
    cards = [{"id": f"model-{n:05}"} for n in range(20_000)]
    server = replay(replays, {"GET /v1/models": Reply(body={"data": cards})})
    message = connect_error(server.url, model="nope")
    assert message.startswith(
        f"127.0.0.1:{server.port} has no model 'nope'; it serves: model-00000, model-00001, "
    )
    assert re.search(r", model-\d{5}, … \(20000 models\)$", message) and len(message) < 300


BAD_URLS = [
    ("http://127.0.0.1:0/v1", "(the port is a number from 1 to 65535)"),
    ("http://127.0.0.1:65536/v1", "(the port is a number from 1 to 65535)"),
    ("http://127.0.0.1:99999/v1", "(the port is a number from 1 to 65535)"),
    ("http://[::1", "(Invalid IPv6 URL)"),
    ("http://256.256.256.256/v1", "(Invalid IPv4 address: '256.256.256.256')"),
    ("http://h" + "a" * 100_000 + "/v1", None),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_a_bad_server_url_is_one_line(
    url: str, why: str | None, phichat_cli: CliRun, tmp_path: Path
) -> None:
    result = phichat_cli("--server", url, "--prompt", "hi")
    assert (result.returncode, result.stdout) == (2, "")
    if why is None:
        assert result.stderr == (
            "phichat: error: server URL of 100011 characters: too long (at most 2048)\n"
        )
    else:
        assert result.stderr == (
            f"phichat: error: server URL {url!r} must look like http://host:port/v1 {why}\n"
        )

    # in a config file: named with it, and no matter to commands that use no server
    config = tmp_path / "box.toml"
    config.write_text(f"[server]\nurl = {json.dumps(url)}\n")
    result = phichat_cli("--device", "server", "--config", str(config), "--prompt", "hi")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"phichat: error: {config}: server URL ")
    result = phichat_cli("history", "--config", str(config))
    assert (result.returncode, result.stderr) == (0, "")


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
    assert (stats.prompt_tokens, stats.generated_tokens, stats.finish) == (42, 7, Finish.END)
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


def test_a_failing_tokenizer_gives_estimates_until_the_next_answer(
    replays: list[ReplayServer],
) -> None:
    routes = recorded("vllm")
    server = replay(replays, routes)
    engine = RemoteEngine.connect(ServerSettings(url=server.url), FALLBACK_CTX)
    asked = len(server.requests_to("POST", "/tokenize"))
    routes["POST /tokenize"] = Reply(500, {"error": {"message": "tokenizer crashed"}})
    # counting never fails (the session saves the user's message before the chat request)
    assert engine.count_tokens("Hello, world!") == 5  # 13 bytes / 3, rounded up
    assert engine.count_tokens("Hello, world!") == 5
    assert len(server.requests_to("POST", "/tokenize")) == asked + 1  # asked once, not again

    routes["POST /tokenize"] = recorded("vllm")["POST /tokenize"]
    assert "".join(engine.stream([{"role": "user", "content": "Hi"}], GREEDY))
    assert engine.count_tokens("Hello, world!") == 4  # the server's count again
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
    assert (stats.prompt_tokens, stats.generated_tokens, stats.finish) == (26, 7, Finish.END)
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


# --- phichat on a server: settings, the one-shot CLI and the app ---------------------------

QUESTION = "Name three colours of the rainbow."
SYSTEM = "You are a terse assistant."
GREEDY_FLAGS = ["--temperature", "0", "--top-p", "1", "--repeat-penalty", "1", "--seed", "7"]
OLLAMA_NOTICE = "Ollama's OpenAI API takes no repeat_penalty: the model's own setting applies"


def server_settings(url: str, **sampling: object) -> Settings:
    """Settings for `--server URL`, GREEDY unless told otherwise."""
    values = {**asdict(GREEDY), **sampling}
    return load_settings(SERVER, None, {"server": {"url": url}, "sampling": values})


def saved_conversations() -> list[tuple[Conversation, list[Message]]]:
    with Store.open(default_path()) as store:
        return [(c, store.messages(c.id)) for c in store.conversations()]


@pytest.mark.slow
def test_prompt_prints_the_servers_own_answer_and_saves_it(
    local_server: LocalServer, engine: RemoteEngine, phichat_cli: CliRun, tmp_path: Path
) -> None:
    # A model that is not in the offline cache: with a server, no GGUF is fetched or loaded.
    config = tmp_path / "elsewhere.toml"
    config.write_text('[model]\nrepo = "nobody/not-cached-gguf"\n')
    result = phichat_cli(
        *["--server", local_server.url, "--config", str(config), *GREEDY_FLAGS],
        *["--max-tokens", "48", "--system", SYSTEM, "--prompt", QUESTION],
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    expected = servers_own_answer(engine, messages, GREEDY)["choices"][0]["message"]["content"]
    assert result.stdout == expected.lstrip() + "\n"
    [(conversation, [question, answer])] = saved_conversations()
    assert (conversation.model, conversation.device) == (MODEL_ALIAS, "server")
    assert question.content == QUESTION
    assert (answer.content, answer.status) == (expected.lstrip(), Status.FINISHED)


@pytest.mark.slow
async def test_the_app_streams_from_the_server_and_escape_frees_it(
    local_server: LocalServer,
    engine: RemoteEngine,
    apps: Callable[..., PhichatApp],
    minilm_dir: Path,
) -> None:
    app = apps(server_settings(local_server.url, max_tokens=LONG.max_tokens))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        status = str(app.query_one(StatusLine).content)
        assert status.startswith(f"{MODEL_ALIAS} · 127.0.0.1:{local_server.port} · ctx ")

        app.query_one(PromptInput).insert(LONG_ANSWER[0]["content"])
        await pilot.press("enter")
        await until(lambda: app.query(AnswerMessage), "the answer")
        answer = app.query(AnswerMessage).last()
        await until(lambda: len(answer.text.split()) >= 20, "20 words of it")
        await pilot.press("escape")
        await until(lambda: not app.chat.busy, "the stop")
        stats = session.last_stats
        assert stats is not None and stats.finish == Finish.STOPPED
        assert str(answer.query_one(".note").render()) == "stopped"
        stored = session.messages(session.conversation_id)[-1]
        assert (stored.status, stored.content) == (Status.STOPPED, answer.text)

        # Left running, the server would still be generating the rest at this answer's pace.
        rest_s = (LONG.max_tokens - stats.generated_tokens) / stats.decode_tps
        session.update_sampling(max_tokens=GREEDY.max_tokens)
        await pilot.press("ctrl+n")
        started = time.perf_counter()
        answer = await ask(pilot, QUESTION)
        took = time.perf_counter() - started
        assert took < rest_s / 4, f"the next answer took {took:.2f}s; the rest {rest_s:.1f}s"
        asked = [{"role": "user", "content": QUESTION}]
        expected = servers_own_answer(engine, asked, session.sampling)["choices"][0]
        assert answer.text == expected["message"]["content"].lstrip()


@pytest.mark.slow
def test_prompt_when_the_server_dies_mid_answer(smollm_path: Path, tmp_path: Path) -> None:
    server = start_server("llama-cpp-python", smollm_path, tmp_path / "log")
    try:
        command = [sys.executable, "-m", "phichat", "--server", server.url, *GREEDY_FLAGS]
        command += ["--max-tokens", str(LONG.max_tokens), "--prompt", LONG_ANSWER[0]["content"]]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None
        first = os.read(process.stdout.fileno(), 1 << 16)  # the answer has begun
        server.kill()
        rest, err = process.communicate(timeout=120)
    finally:
        server.stop()
    printed, errors = (first + rest).decode(), err.decode()
    assert first and process.returncode == 1, errors
    assert errors.startswith(f"phichat: error: 127.0.0.1:{server.port} hung up mid-answer after ")
    assert errors.endswith("; what came is kept\n") and errors.count("\n") == 1
    [(_, [_, answer])] = saved_conversations()
    assert printed == answer.content + "\n" and answer.status == Status.STOPPED


@pytest.mark.slow
async def test_the_app_when_the_server_dies_mid_answer(
    smollm_path: Path, tmp_path: Path, apps: Callable[..., PhichatApp], minilm_dir: Path
) -> None:
    server = start_server("llama-cpp-python", smollm_path, tmp_path / "log")
    try:
        app = apps(server_settings(server.url, max_tokens=LONG.max_tokens))
        async with app.run_test(size=SIZE) as pilot:
            session = await ready(pilot)
            app.query_one(PromptInput).insert(LONG_ANSWER[0]["content"])
            await pilot.press("enter")
            await until(lambda: app.query(AnswerMessage), "the answer")
            answer = app.query(AnswerMessage).last()
            await until(lambda: len(answer.text.split()) >= 10, "10 words of it")
            server.kill()
            await until(lambda: not app.chat.busy, "the answer to end")
            hung_up = f"127.0.0.1:{server.port} hung up mid-answer after "
            assert str(answer.query_one(".note").render()).startswith(f"error: {hung_up}")
            assert [n for n in notes(app) if n.startswith(hung_up)]
            stored = session.messages(session.conversation_id)[-1]
            assert (stored.role, stored.status) == ("assistant", Status.STOPPED)
            assert stored.content == answer.text

            # With the server gone, the next message is still saved before the request fails.
            await ask(pilot, "Are you still there?")
            refused = f"cannot reach 127.0.0.1:{server.port}: connection refused"
            assert refused in str(app.query(AnswerMessage).last().query_one(".note").render())
            stored = session.messages(session.conversation_id)[-1]
            assert (stored.role, stored.content) == ("user", "Are you still there?")
    finally:
        server.stop()


def test_what_the_server_cannot_honour_is_said_once(
    replays: list[ReplayServer], phichat_cli: CliRun, tmp_path: Path
) -> None:
    server = replay(replays, recorded("ollama"))
    config = tmp_path / "ollama.toml"
    config.write_text(f'[server]\nurl = "{server.url}"\nmodel = "llama3.2"\n')
    result = phichat_cli("--device", "server", "--config", str(config), "--prompt", "Hi")
    assert (result.returncode, result.stdout) == (0, "Hello! How can I help?\n")
    assert result.stderr == f"phichat: warning: {OLLAMA_NOTICE}\n"
    body = server.requests_to("POST", "/v1/chat/completions")[0].body
    assert body["model"] == "llama3.2:latest" and body["temperature"] == 0.7

    result = phichat_cli("--server", server.url, "--repeat-penalty", "1", "--prompt", "Hi")
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.slow
async def test_the_app_says_what_the_server_cannot_honour_once(
    replays: list[ReplayServer], apps: Callable[..., PhichatApp], minilm_dir: Path
) -> None:
    server = replay(replays, recorded("ollama"))
    app = apps(server_settings(server.url, repeat_penalty=1.1))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert (await ask(pilot, "Hi")).text == "Hello! How can I help?"
        assert (await ask(pilot, "Hi again")).text == "Hello! How can I help?"
        assert notes(app).count(OLLAMA_NOTICE) == 1
        assert len(server.requests_to("POST", "/v1/chat/completions")) == 2


async def test_the_app_says_when_the_server_cannot_be_reached(
    apps: Callable[..., PhichatApp], minilm_dir: Path
) -> None:
    port = closed_port()
    refused = f"cannot reach 127.0.0.1:{port}: connection refused (is the server running?)"
    app = apps(server_settings(f"http://127.0.0.1:{port}/v1"))
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.chat._load_error, "the connection to fail")
        await pilot.pause()
        assert refused in notes(app)
        # the server's host stands for the model it has not named yet (no GGUF's name)
        assert str(app.query_one(StatusLine).content) == f"127.0.0.1:{port} · no model loaded"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "server"], "--device server needs the server's URL: --server URL, or url"),
        (
            ["--server", "gpu-box:8080"],
            "server URL 'gpu-box:8080' must look like http://host:port/v1",
        ),
        (["--server", "http://h:1/v1", "--device", "cpu"], "not with --device cpu"),
        (["--server", "http://h:1/v1", "--model-file", "x.gguf"], "--model-file loads a local"),
    ],
)
def test_server_settings_refused_in_one_line(
    phichat_cli: CliRun, args: list[str], message: str
) -> None:
    result = phichat_cli(*args, "--prompt", "hi")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("phichat: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_server_table_in_a_config_file_is_checked(phichat_cli: CliRun, tmp_path: Path) -> None:
    config = tmp_path / "box.toml"
    config.write_text('[server]\nurl = "http://gpu-box:8080/v1"\nkind = "tgi"\n')
    result = phichat_cli("--config", str(config), "--device", "server", "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr == (
        f"phichat: error: {config}: server.kind must be one of auto, llama-server, "
        "llama-cpp-python, vllm, ollama, generic, not 'tgi'\n"
    )
    config.write_text('[server]\napi_key_env = "BOX_KEY"\ntimeout = 0\n')
    result = phichat_cli("--config", str(config), "--server", "http://h:1/v1", "--prompt", "hi")
    assert (
        result.stderr
        == f"phichat: error: {config}: server.timeout must be > 0 and <= 86400, not 0.0\n"
    )


def test_pull_for_a_server_fetches_only_the_embedder(
    phichat_cli: CliRun, minilm_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text('[model]\nrepo = "nobody/not-cached-gguf"\n')
    result = phichat_cli("pull", "--server", "http://gpu-box:8080/v1", "--config", str(config))
    assert (result.returncode, result.stdout) == (0, f"{minilm_dir}\n"), result.stderr
