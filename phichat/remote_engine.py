"""An OpenAI-compatible inference server as phichat's engine, streamed over SSE.

Drives llama.cpp's `llama-server`, llama-cpp-python's `llama_cpp.server`, vLLM, Ollama or any
other `/v1/chat/completions` endpoint through the same interface as the local llama.cpp engine.
The kind of server is detected once, at connect, from what it exposes (`/v1/models`, `/props`,
`/api/version`, `/extras/tokenize/count`) unless the config names it; its entry in `QUIRKS`
decides how sampling is sent, where the window size comes from and how tokens are counted.

The client is httpx plus a few lines of SSE parsing: the servers send one JSON object per
`data:` line, so httpx-sse would add a dependency for a dozen lines, and the openai SDK would
bring pydantic models, retries and its own error types between us and the socket that a stop
must shut at once.

A server is trusted only so far. `max_tokens` is enforced here too: tokens are counted as the
client sees them, one per content delta (a delta carries at least one token), or the server's
own `completion_tokens` where a chunk reports more; the first delta past the limit ends the
answer (finish length) and closes the connection, unread. A server that packs many tokens in a
delta is counted low, so the answer's text is also capped (TOKEN_TEXT_LIMIT characters per token
of max_tokens). An SSE line, an error body and a JSON answer are read up to a cap each; an
answer as a whole gets `timeout` x (1 + max_tokens / TOKENS_PER_TIMEOUT) seconds, besides the
per-read `timeout`, so a server trickling a byte at a time ends too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from phichat.config import (
    Device,
    Sampling,
    ServerKind,
    ServerSettings,
    redact_url,
    server_host,
    split_server_url,
)
from phichat.engine import Finish, GenerationStats, settled_tokens, shared_prefix
from phichat.errors import PhichatError, UsageError

if TYPE_CHECKING:
    import httpx

OLLAMA_DEFAULT_CTX = 2048  # what Ollama loads a model with unless its Modelfile sets num_ctx
BYTES_PER_TOKEN = 3  # estimate where the server cannot count: errs towards more tokens
CANCEL_POLL_S = 0.05  # how often a stream's watcher looks at the cancel event and the clock
ERROR_TEXT_LIMIT = 200
SSE_LINE_LIMIT = 1 << 20  # bytes in one SSE line: a `data:` that never ends must not fill memory
TOKEN_TEXT_LIMIT = 64  # characters of answer per token of max_tokens (tokens average ~4)
ERROR_BODY_LIMIT = 64 << 10  # bytes of an error response read for its message
JSON_BODY_LIMIT = 16 << 20  # bytes of a JSON answer (a model list, a token count)
TOKENS_PER_TIMEOUT = 64  # an answer's deadline: `timeout` to begin, and one more per 64 tokens

Cards = list[dict[str, Any]]  # the server's model list (/v1/models "data")


@dataclass(frozen=True)
class Tokenizer:
    """A server's own token counter: POST `body(text, model)` to `path` (under the server's
    root); the answer holds the `count`, or the `tokens` themselves."""

    path: str
    body: Callable[[str, str], dict[str, Any]]
    answer: Literal["count", "tokens"]
    counts_bos: bool = False  # counts a BOS token in any text: measured once, then taken off

    def count(self, answer: dict[str, Any]) -> int | None:
        """The count in the server's answer; None where it holds none."""
        found = answer.get(self.answer)
        if self.answer == "tokens":
            return len(found) if isinstance(found, list) else None
        return found if isinstance(found, int) else None


@dataclass
class _ReadAhead:
    """A read-ahead on a server: the prompt `messages`, its settled `tokens`, how many of them
    the server has read (`at`)."""

    messages: list[dict[str, str]]
    tokens: list[int]
    at: int


@dataclass(frozen=True)
class Quirks:
    """What differs between kinds of server: the name messages give it, where it says its
    window, its tokenizer, and how the repeat penalty is sent (or why it cannot be)."""

    name: str
    window: Callable[[RemoteEngine, Cards], int | None] | None = None
    tokenizer: Tokenizer | None = None
    repeat_penalty: str | None = None  # the request's field for it; None: not taken at all
    sends_repeat_last_n: bool = False
    fixed_repeat_last_n: tuple[int, str] | None = None  # what it applies, said when asked other
    sampler_defaults_off: bool = False  # top_k and min_p sent off: the server has them on
    reads_ahead: bool = False  # reads a prompt sent with max_tokens 0 into its cache_prompt


class RemoteEngine:
    """One model on an OpenAI-compatible server; what `connect` learned decides the rest."""

    device: Device = "server"

    def __init__(self, settings: ServerSettings, fallback_ctx: int) -> None:
        """Clients for `settings`, validated by the settings schema (nothing is sent yet:
        `connect` does that)."""
        import httpx

        self.settings = settings
        self.api, self.root = split_server_url(settings.url or "")
        self.device_label = server_host(self.root)
        self.kind: ServerKind = settings.kind  # "auto" until `connect` detects it
        self.model_label = settings.model
        self._n_ctx = fallback_ctx
        self._counts_tokens = False
        self._tokenizer_failed = False  # estimate until the next answer begins
        self._token_overhead = 0
        self._told: set[str] = set()
        self._read: _ReadAhead | None = None  # what was read ahead since the last answer
        self._held: tuple[str | None, int] | None = None  # the last answer's conversation and
        # how many tokens the server held after it (its prompt and answer)
        headers = {}
        key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        if key and not (key.isascii() and key.isprintable() and key == key.strip()):
            raise UsageError(
                f"${settings.api_key_env} holds what an HTTP header cannot carry (a line break, "
                "a control or non-ASCII character, or spaces around it); the key is not shown"
            )
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = httpx.Timeout(settings.timeout)
        self._client = httpx.Client(timeout=timeout, headers=headers)
        # Answers each get a fresh connection, so that a stop can shut its socket.
        fresh = httpx.Limits(max_keepalive_connections=0)
        self._stream_client = httpx.Client(timeout=timeout, headers=headers, limits=fresh)

    # --- connecting ----------------------------------------------------------------------

    @classmethod
    def connect(cls, settings: ServerSettings, fallback_ctx: int) -> RemoteEngine:
        """Reach the server, pick the model, detect the server's kind and window size.

        `fallback_ctx` (the config's context size) is used where the server does not say.
        """
        engine = cls(settings, fallback_ctx)
        try:
            cards = engine._models()
            engine.model_label = engine._pick_model(cards)
            if engine.kind == "auto":
                engine.kind = engine._detect(cards)
            engine._n_ctx = engine._window(cards) or fallback_ctx
            engine._token_overhead = engine._probe_tokenizer()
        except BaseException:
            engine.close()
            raise
        return engine

    def _models(self) -> list[dict[str, Any]]:
        cards = self._call("GET", f"{self.api}/models", what="list models").get("data")
        if not isinstance(cards, list):
            raise PhichatError(
                f"{self.device_label}: {redact_url(self.api)}/models did not answer with a model "
                "list; is this an OpenAI-compatible server (the URL usually ends in /v1)?"
            )
        return [
            c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str) and c["id"]
        ]

    def _pick_model(self, cards: list[dict[str, Any]]) -> str:
        ids = [str(card["id"]) for card in cards]
        wanted = self.settings.model
        if not wanted:
            if not ids:
                raise PhichatError(f"{self.device_label} serves no model")
            return ids[0]
        for name in (wanted, f"{wanted}:latest"):  # Ollama lists "llama3" as "llama3:latest"
            if name in ids:
                return name
        raise PhichatError(self._unknown_model(wanted, ids))

    def _unknown_model(self, wanted: str, ids: list[str]) -> str:
        served = _one_line(", ".join(ids)) if ids else "none"
        if served.endswith("…"):  # cut the list at a whole name
            served = f"{served.rpartition(', ')[0] or served}, … ({len(ids)} models)"
        return f"{self.device_label} has no model {wanted!r}; it serves: {served}"

    @property
    def quirks(self) -> Quirks:
        """How this kind of server differs; one not detected yet (no `connect`) as any other."""
        return QUIRKS["generic" if self.kind == "auto" else self.kind]

    def _detect(self, cards: Cards) -> ServerKind:
        owners = [card.get("owned_by") for card in cards]
        if "vllm" in owners:
            return "vllm"
        if "llamacpp" in owners:
            return "llama-server"
        if "version" in self._probe("GET", f"{self.root}/api/version"):
            return "ollama"
        if "default_generation_settings" in self._probe("GET", f"{self.root}/props"):
            return "llama-server"
        count = self._probe("POST", f"{self.root}/extras/tokenize/count", json={"input": ""})
        if "count" in count:
            return "llama-cpp-python"
        return "generic"

    def _window(self, cards: Cards) -> int | None:
        """The context size the server runs the model with, where it says."""
        window = self.quirks.window
        return window(self, cards) if window is not None else None

    def _window_from_props(self, cards: Cards) -> int | None:
        settings = self._probe("GET", f"{self.root}/props").get("default_generation_settings")
        return _positive_int((settings or {}).get("n_ctx"))

    def _window_from_card(self, cards: Cards) -> int | None:
        card = next((c for c in cards if c.get("id") == self.model_label), {})
        return _positive_int(card.get("max_model_len"))

    def _window_from_ollama(self, cards: Cards) -> int:
        shown = self._probe("POST", f"{self.root}/api/show", json={"model": self.model_label})
        found = re.search(r"^num_ctx\s+(\d+)", str(shown.get("parameters", "")), re.M)
        return int(found.group(1)) if found else OLLAMA_DEFAULT_CTX

    def _probe_tokenizer(self) -> int:
        """Whether the server's own tokenizer answers; returns the tokens it adds to any text
        (llama_cpp.server counts a BOS token; the others are asked for none)."""
        tokenizer = self.quirks.tokenizer
        if tokenizer is None:
            return 0
        try:
            empty = self._server_count("")
        except PhichatError:
            return 0
        self._counts_tokens = True
        return empty if tokenizer.counts_bos else 0

    def _probe(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        """A JSON object from an endpoint only some servers have; {} where it is not one."""
        try:
            return self._call(method, url, what="probe", **kwargs)
        except PhichatError:
            return {}

    # --- the engine interface ------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """The context window in tokens: the server's where it says, else the config's."""
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        """Tokens in `text`: the server's tokenizer where it has one, else an estimate that
        errs high (one token per three bytes of UTF-8).

        A tokenizer that fails (the server gone between answers) is not asked again until an
        answer begins: counting never fails, so the session saves the user's message, and the
        chat request that follows says what is wrong.
        """
        if self._counts_tokens and not self._tokenizer_failed:
            try:
                return max(0, self._server_count(text) - self._token_overhead)
            except PhichatError:
                self._tokenizer_failed = True
        return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)

    def _server_count(self, text: str) -> int:
        tokenizer = self.quirks.tokenizer
        assert tokenizer is not None  # asked only where `_probe_tokenizer` found one
        body = tokenizer.body(text, self.model_label)
        count = tokenizer.count(self._call_json("POST", f"{self.root}{tokenizer.path}", body))
        return count if count is not None else _bad_count(self.device_label)

    def take_notices(self, sampling: Sampling) -> list[str]:
        """One line for each setting in `sampling` this server cannot honour, each said once."""
        lines = [line for line in self._unsupported(sampling) if line not in self._told]
        self._told.update(lines)
        return lines

    def _unsupported(self, sampling: Sampling) -> list[str]:
        if sampling.repeat_penalty == 1.0:
            return []
        quirks = self.quirks
        if quirks.repeat_penalty is None:
            return [
                f"{quirks.name}'s OpenAI API takes no repeat_penalty: the model's own setting "
                "applies"
            ]
        fixed = quirks.fixed_repeat_last_n
        if fixed is not None and sampling.repeat_last_n != fixed[0]:
            return [f"{quirks.name} {fixed[1]}"]
        return []

    def request_body(self, messages: list[dict[str, str]], sampling: Sampling, seed: int) -> dict:
        """The streamed chat request, with sampling mapped for this kind of server."""
        body: dict[str, Any] = {
            "model": self.model_label,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "seed": seed,
        }
        quirks = self.quirks
        if quirks.sampler_defaults_off:  # as the local engine samples
            body.update(top_k=0, min_p=0.0)
        if quirks.repeat_penalty is not None:
            body[quirks.repeat_penalty] = sampling.repeat_penalty
        if quirks.sends_repeat_last_n:
            body["repeat_last_n"] = sampling.repeat_last_n
        if quirks.reads_ahead:
            body["cache_prompt"] = True  # what a read-ahead left in the cache is used
        return body

    def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        stats: GenerationStats | None = None,
        conversation: str | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text as the server streams it; fill `stats` as it goes.

        Setting `cancel` shuts the connection at once, whatever the request is waiting for,
        so the server stops generating, and the answer ends quietly (stats.finish "stopped").
        A server that hangs up mid-answer, sends a chunk of the wrong shape or runs past the
        answer's deadline raises PhichatError after the text that came (stats.finish is then
        "stopped"). At most max_tokens tokens are taken (see the module's docstring).
        """
        import httpx

        stats = stats if stats is not None else GenerationStats()
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        stats.seed, stats.finish = seed, Finish.STOPPED
        self._read, self._held = None, None  # the server's cache holds this prompt next
        deadline_s = self.settings.timeout * (1 + sampling.max_tokens / TOKENS_PER_TIMEOUT)
        watch = _ConnectionWatch(cancel, deadline_s)
        request = self._stream_client.build_request(
            "POST",
            f"{self.api}/chat/completions",
            json=self.request_body(messages, sampling, seed),
            extensions={"trace": watch.trace},
        )
        started, finish = time.perf_counter(), None
        try:
            response = self._send(request, "chat", self._stream_client)
            self._tokenizer_failed = False
            try:
                answer = self._read_answer(response, sampling.max_tokens, stats, started, watch)
                finish = yield from answer
            finally:
                response.close()
        except (PhichatError, httpx.HTTPError, ssl.SSLError, OSError) as exc:
            if watch.cancelled:  # the shut connection is why the request failed
                return
            if watch.expired:
                raise self._deadline_error(deadline_s, stats) from None
            if isinstance(exc, PhichatError):
                raise
            if stats.generated_tokens:
                raise PhichatError(
                    f"{self.device_label} hung up mid-answer after {stats.generated_tokens} "
                    f"tokens ({_one_line(str(exc)) or type(exc).__name__}); what came is kept"
                ) from None
            raise self._transport_error(exc, "chat") from None
        finally:
            watch.close()
        if finish is None:
            if watch.cancelled:  # a stream without a length ends quietly when shut
                return
            if watch.expired:
                raise self._deadline_error(deadline_s, stats)
            raise PhichatError(
                f"{self.device_label} ended the answer without finishing it "
                f"after {stats.generated_tokens} tokens; what came is kept"
            )
        stats.finish = Finish.LENGTH if finish == "length" else Finish.END
        self._held = (conversation, stats.prompt_tokens + stats.generated_tokens)

    def _read_answer(
        self,
        response: httpx.Response,
        max_tokens: int,
        stats: GenerationStats,
        started: float,
        watch: _ConnectionWatch,
    ) -> Generator[str, None, str | None]:
        """The answer's text from the stream, up to max_tokens tokens and TOKEN_TEXT_LIMIT
        characters per token; returns the finish reason ("length" where this side cut it),
        None where the stream ended without one or a stop came."""
        first_at = started
        counted = chars = 0
        text_limit = max_tokens * TOKEN_TEXT_LIMIT
        finish = None
        usage: dict[str, Any] = {}
        leading = True
        for event in _sse_events(response, self.device_label):
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            if isinstance(event.get("timings"), dict):  # llama-server's own numbers
                stats.cached_tokens = _positive_int(event["timings"].get("cache_n")) or 0
            for reason, text in _choices(event):
                finish = reason or finish
                if not text:
                    continue
                told = _positive_int(usage.get("completion_tokens")) or 0
                if max(counted + 1, told) > max_tokens:
                    return "length"  # the server ignores max_tokens: read no further
                now = time.perf_counter()
                if not counted:
                    first_at, stats.ttft_s = now, now - started
                counted += 1
                stats.generated_tokens, stats.decode_s = counted, now - first_at
                text = text[: text_limit - chars]
                chars += len(text)
                if leading:
                    text = text.lstrip()
                    leading = not text
                if text:
                    yield text
                if chars >= text_limit:
                    return "length"
            if watch.cancelled:
                return None
        if finish is not None:
            _record_usage(stats, usage)
        return finish

    def _deadline_error(self, deadline_s: float, stats: GenerationStats) -> PhichatError:
        return PhichatError(
            f"{self.device_label} did not finish the answer within {deadline_s:.3g}s "
            f"([server] timeout x (1 + max_tokens / {TOKENS_PER_TIMEOUT})) after "
            f"{stats.generated_tokens} tokens; what came is kept"
        )

    def read_ahead(
        self,
        messages: list[dict[str, str]],
        cancel: threading.Event,
        conversation: str | None = None,
        limit: int | None = None,
    ) -> int:
        """For a server that reads ahead (llama-server: `Quirks.reads_ahead`), let it read the
        prompt's settled tokens (those more text in the last message cannot change) into its
        cache: its own template and tokenizer give them (/apply-template, /tokenize), and each
        step sends the next `limit` of them to /completion with nothing to generate
        (n_predict 0, cache_prompt), a request `cancel` closes at once. The first step after
        an answer in `conversation` sends at least the tokens the server then held: a shorter
        prompt would make it drop the rest. Other servers: nothing is sent before Enter. A
        failure is not told here: the prompt, sent, tells it. Returns the tokens the server
        read (its own count; 0: nothing left to read)."""
        if not self.quirks.reads_ahead:
            return 0
        import httpx

        try:
            read = self._read
            if read is None or read.messages != messages:
                tokens = settled_tokens(messages, lambda m: self._server_tokens(m, cancel))
                at = shared_prefix(read.tokens[: read.at], tokens) if read is not None else 0
                read = self._read = _ReadAhead([dict(m) for m in messages], tokens, at)
            if read.at >= len(read.tokens) or cancel.is_set():
                return 0
            held, self._held = self._held, None
            end = len(read.tokens) if limit is None else read.at + limit
            if held is not None and held[0] == conversation:
                end = max(end, held[1])
            end = min(end, len(read.tokens))
            timings = self._post(
                f"{self.root}/completion",
                {"prompt": read.tokens[:end], "n_predict": 0, "cache_prompt": True},
                cancel,
            ).get("timings")
        except (PhichatError, ValueError, httpx.HTTPError, ssl.SSLError, OSError):
            return 0
        sent, read.at = end - read.at, end
        evaluated = timings.get("prompt_n") if isinstance(timings, dict) else None
        return max(1, _positive_int(evaluated) or sent)

    def _server_tokens(self, messages: list[dict[str, str]], cancel: threading.Event) -> list[int]:
        """The tokens the server reads for the chat request of `messages`: its template's
        prompt, tokenized as the chat endpoint does (special tokens parsed, BOS added)."""
        prompt = self._post(f"{self.root}/apply-template", {"messages": messages}, cancel)
        tokens = self._post(
            f"{self.root}/tokenize",
            {"content": prompt.get("prompt"), "add_special": True, "parse_special": True},
            cancel,
        ).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise PhichatError(f"{self.device_label}: /tokenize answered without tokens")
        return tokens

    def _post(self, url: str, body: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
        """POST `body` to `url` on a connection of its own, shut at once when `cancel` is
        set; the JSON object answered (PhichatError when it is not one, or stopped)."""
        watch = _ConnectionWatch(cancel, self.settings.timeout)
        request = self._stream_client.build_request(
            "POST", url, json=body, extensions={"trace": watch.trace}
        )
        try:
            response = self._send(request, "read ahead", self._stream_client)
            answer = _parse_json(_read_capped(response, JSON_BODY_LIMIT))
        finally:
            watch.close()
        if watch.cancelled or watch.expired or not isinstance(answer, dict):
            raise PhichatError(f"{self.device_label}: {urlsplit(url).path} gave no answer")
        return answer

    def prepare(self, conversation: str | None) -> None:
        """Nothing to get ready: the server keeps its own cache."""

    def fork(self, parent: str, child: str) -> None:
        """Nothing is kept per conversation here (the server keeps its own cache)."""

    def forget(self, conversation: str) -> None:
        """Nothing is kept per conversation here (the server keeps its own cache)."""

    def close(self) -> None:
        """Drop the connections to the server."""
        self._client.close()
        self._stream_client.close()

    # --- HTTP and its errors -------------------------------------------------------------

    def _call_json(self, method: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(method, url, json=body, what="count tokens")

    def _call(self, method: str, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        """The JSON object the server answers with (at most JSON_BODY_LIMIT bytes of it)."""
        import httpx

        request = self._client.build_request(method, url, **kwargs)
        response = self._send(request, what)
        try:
            body = _read_capped(response, JSON_BODY_LIMIT + 1)
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            raise self._transport_error(exc, what) from None
        where = f"{self.device_label}: {request.url.path}"
        if len(body) > JSON_BODY_LIMIT:
            raise PhichatError(f"{where} answered with more than {JSON_BODY_LIMIT >> 20} MiB")
        try:
            parsed = _parse_json(body)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise PhichatError(f"{where} did not answer with JSON")
        return parsed

    def _send(
        self, request: httpx.Request, what: str, client: httpx.Client | None = None
    ) -> httpx.Response:
        """Send a request, its response left to stream (through `client`, else the
        connect-time client); every way it can fail becomes one PhichatError line, with at
        most ERROR_BODY_LIMIT bytes of an error response read for its message."""
        import httpx

        try:
            response = (client or self._client).send(request, stream=True)
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            raise self._transport_error(exc, what) from None
        if response.status_code < 400:
            return response
        try:
            body = _read_capped(response, ERROR_BODY_LIMIT)
        except (httpx.HTTPError, ssl.SSLError, OSError):
            body = b""
        raise PhichatError(self._status_error(response, body)) from None

    def _status_error(self, response: httpx.Response, body: bytes) -> str:
        status, where = response.status_code, self.device_label
        said = _server_message(body) or _one_line(response.reason_phrase)
        if status in (401, 403):
            env = self.settings.api_key_env
            if not env:
                hint = "put the name of the variable holding the key in [server] api_key_env"
            elif not os.environ.get(env):
                hint = f"${env} is not set"
            else:
                hint = f"check the key in ${env}"
            return f"{where} refused the API key (HTTP {status}: {said}); {hint}"
        if status == 404 and response.request.url.path.endswith("/chat/completions"):
            try:
                ids = [str(card["id"]) for card in self._models()]
            except PhichatError:
                ids = []
            if self.model_label not in ids:
                return self._unknown_model(self.model_label, ids)
        if status == 404:
            return (
                f"{where}: HTTP 404 for {_one_line(response.request.url.path)} ({said}); "
                "is the URL right (it usually ends in /v1)?"
            )
        if status >= 500:
            return f"{where} failed (HTTP {status}: {said})"
        return f"{where} rejected the request (HTTP {status}: {said})"

    def _transport_error(self, exc: BaseException, what: str) -> PhichatError:
        import httpx

        where, timeout = self.device_label, self.settings.timeout
        cause = _root_cause(exc)
        if isinstance(exc, httpx.ConnectTimeout):
            message = f"cannot reach {where}: no answer to connect within {timeout:g}s"
        elif isinstance(exc, httpx.TimeoutException):
            message = (
                f"{where} accepted the connection but said nothing for {timeout:g}s "
                f"({what}); is it the right port, or does it need a longer [server] timeout?"
            )
        elif isinstance(cause, socket.gaierror):
            host = urlsplit(self.root).hostname
            message = f"cannot reach {where}: unknown host {host!r}"
        elif isinstance(cause, ssl.SSLError) or isinstance(exc, ssl.SSLError):
            detail = getattr(cause, "reason", None) or _one_line(str(cause))
            message = (
                f"TLS with {where} failed ({detail}); check http:// vs https:// "
                "and the server's certificate"
            )
        elif isinstance(cause, ConnectionRefusedError):
            message = f"cannot reach {where}: connection refused (is the server running?)"
        elif isinstance(exc, httpx.ConnectError):
            message = f"cannot reach {where}: {_one_line(str(exc))}"
        else:
            message = f"{where} hung up ({what}: {_one_line(str(exc)) or type(exc).__name__})"
        return PhichatError(message)


QUIRKS: dict[str, Quirks] = {
    "llama-server": Quirks(
        "llama-server",
        window=RemoteEngine._window_from_props,
        tokenizer=Tokenizer(
            "/tokenize", lambda text, model: {"content": text, "add_special": False}, "tokens"
        ),
        repeat_penalty="repeat_penalty",
        sends_repeat_last_n=True,
        sampler_defaults_off=True,
        reads_ahead=True,
    ),
    "llama-cpp-python": Quirks(
        "llama_cpp.server",
        tokenizer=Tokenizer(
            "/extras/tokenize/count",
            lambda text, model: {"input": text, "model": model},
            "count",
            counts_bos=True,
        ),
        repeat_penalty="repeat_penalty",
        fixed_repeat_last_n=(64, "takes no repeat_last_n per request: its own (64) applies"),
        sampler_defaults_off=True,
    ),
    "vllm": Quirks(
        "vLLM",
        window=RemoteEngine._window_from_card,
        tokenizer=Tokenizer(
            "/tokenize",
            lambda text, model: {"model": model, "prompt": text, "add_special_tokens": False},
            "count",
        ),
        repeat_penalty="repetition_penalty",
        fixed_repeat_last_n=(
            -1,
            "applies repeat_penalty to the whole text; repeat_last_n is ignored",
        ),
    ),
    "ollama": Quirks("Ollama", window=RemoteEngine._window_from_ollama),
    "generic": Quirks("the server"),
}


class _ConnectionWatch:
    """Shuts a streamed request's socket the moment `cancel` is set (`cancelled`), or once
    `deadline_s` have passed (`expired`), even while the request still waits for the server's
    first byte. httpx's trace hook hands over the socket when the connection opens; a watcher
    thread polls the event and the clock until the stream is over."""

    def __init__(self, cancel: threading.Event | None, deadline_s: float) -> None:
        self.cancel = cancel
        self.expired = False
        self._deadline = time.monotonic() + deadline_s
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="phichat-watch", daemon=True)
        self._thread.start()

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace callback: keep the socket of the connection just opened."""
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock
        if self.cancelled or self.expired:
            self._shut()

    def _watch(self) -> None:
        while not self._done.wait(CANCEL_POLL_S):
            if self.cancelled or time.monotonic() >= self._deadline:
                self.expired = not self.cancelled
                self._shut()
                return

    def _shut(self) -> None:
        with self._lock:
            if self._socket is not None:
                with contextlib.suppress(OSError):  # already closed
                    self._socket.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._done.set()
        self._thread.join()


def _sse_events(response: httpx.Response, where: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of an OpenAI-style SSE stream, up to `data: [DONE]`.

    Comments (`: ping`) and other fields are skipped; an `error` object (llama-server sends one
    when generation fails), a chunk that is not JSON and a line over SSE_LINE_LIMIT bytes each
    become a PhichatError.
    """
    kind = response.headers.get("content-type", "").partition(";")[0].strip()
    if kind != "text/event-stream":
        raise PhichatError(
            f"{where} answered with {_one_line(kind) or 'no content type'}, not a stream"
        )
    for line in _lines(response.iter_bytes()):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        try:
            event = json.loads(data)
        except RecursionError:
            raise PhichatError("the server sent a chunk nested too deeply to read") from None
        except ValueError:
            shown = data[:80].decode("utf-8", "replace")
            raise PhichatError(f"the server sent a chunk that is not JSON: {shown!r}") from None
        if not isinstance(event, dict):
            continue
        if event.get("error"):
            raise PhichatError(f"the server failed mid-answer: {_error_text(event['error'])}")
        yield event


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a byte stream; one longer than SSE_LINE_LIMIT is a PhichatError before it
    fills memory (a `data:` that never ends)."""
    pending: list[bytes] = []  # the line begun, in pieces (joined once it ends)
    size = 0
    for chunk in chunks:
        *lines, rest = chunk.split(b"\n")
        if lines:
            lines[0] = b"".join([*pending, lines[0]])
            pending, size = [], 0
        pending.append(rest)
        size += len(rest)
        for line in lines:
            _check_line(len(line))
            yield line.rstrip(b"\r")
        _check_line(size)
    if size:
        yield b"".join(pending)


def _check_line(size: int) -> None:
    if size > SSE_LINE_LIMIT:
        raise PhichatError(
            f"the server sent a line of more than {SSE_LINE_LIMIT >> 20} MiB; "
            "what came before it is kept"
        )


def _choices(event: dict[str, Any]) -> Iterator[tuple[str | None, str | None]]:
    """(finish_reason, text) of each choice in a chunk; a chunk of another shape (`choices`
    not a list, `delta` not an object, `content` not text) is a PhichatError."""
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise _wrong_shape("choices", choices)
    for choice in choices:
        if not isinstance(choice, dict):
            raise _wrong_shape("a choice", choice)
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise _wrong_shape("delta", delta)
        reason, text = choice.get("finish_reason"), delta.get("content")
        if not isinstance(reason, str | None):
            raise _wrong_shape("finish_reason", reason)
        if not isinstance(text, str | None):
            raise _wrong_shape("content", text)
        yield reason, text


def _wrong_shape(name: str, value: Any) -> PhichatError:
    return PhichatError(
        f"the server sent a chunk of the wrong shape ({name} is {type(value).__name__}); "
        "what came before it is kept"
    )


def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of a streamed response's body; the response is closed."""
    parts, size = [], 0
    try:
        for chunk in response.iter_bytes():
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    finally:
        response.close()
    return b"".join(parts)[:limit]


def _parse_json(data: bytes) -> Any:
    """JSON from bytes; ValueError also for invalid UTF-8 and for nesting too deep to read."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _record_usage(stats: GenerationStats, usage: dict[str, Any]) -> None:
    """The server's own counts (stream_options.include_usage), where it sent them."""
    prompt = _positive_int(usage.get("prompt_tokens"))
    completion = _positive_int(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _positive_int(details.get("cached_tokens")) if isinstance(details, dict) else None
    if prompt:
        stats.prompt_tokens = prompt
    if completion:
        stats.generated_tokens = completion
    if cached:
        stats.cached_tokens = cached


def _server_message(body: bytes) -> str:
    """What the server said about an error: OpenAI, FastAPI, Ollama and vLLM shapes."""
    try:
        parsed = _parse_json(body)
    except ValueError:
        return _one_line(body[: ERROR_TEXT_LIMIT * 4].decode("utf-8", "replace"))
    if isinstance(parsed, dict):
        for key in ("error", "detail", "message"):
            if parsed.get(key):
                return _error_text(parsed[key])
    return _error_text(parsed)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        error = error.get("message") or error
    if not isinstance(error, str):
        try:
            error = json.dumps(error)[: ERROR_TEXT_LIMIT * 4]
        except (ValueError, RecursionError):
            error = type(error).__name__
    return _one_line(error)


def _one_line(text: str) -> str:
    from phichat.text import clipped, escaped

    text = escaped(" ".join(text.split()))  # a server's text is shown, never obeyed
    return clipped(text, ERROR_TEXT_LIMIT)


def _root_cause(exc: BaseException) -> BaseException:
    """The deepest exception in the cause/context chain (the OSError under httpx's errors)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _bad_count(where: str) -> int:
    raise PhichatError(f"{where}: the server's tokenizer answered without a token count")
