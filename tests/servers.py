"""Real servers on loopback ports for the remote-engine tests and benchmark.

- `LocalServer`: llama-cpp-python's `python -m llama_cpp.server`, or llama.cpp's own `llama-server`
  (built into .cache/ by .ci/llama-server), serving a GGUF on a free port, started and stopped.
- `ReplayServer`: a tiny HTTP server that answers each "METHOD /path" with a fixed response (a
  status and JSON, or an SSE stream) and records the requests it got: the error cases, and vLLM
  and Ollama replayed from their recorded responses.
- `closed_port()` / `silent_port()`: a port nobody listens on, and one that accepts connections
  and never says a word.
- `RawServer`: a server that hands each request's socket to a function writing raw bytes, for
  what a well-behaved HTTP server never sends (no length and no chunks, a byte every few
  seconds, a line that never ends, a body without end).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER = ROOT / ".cache" / "llama-server"
MODEL_ALIAS = "smollm2"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A port with nothing listening on it: connecting is refused."""
    return free_port()


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port whose listener lets connections in (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


class LocalServer:
    """An OpenAI-compatible server process on a free loopback port."""

    def __init__(self, kind: str, model: Path, log: Path, n_ctx: int = 2048, threads: int = 2):
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        if kind == "llama-server":
            command = [
                str(LLAMA_SERVER), "-m", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), "-c", str(n_ctx), "-t", str(threads),
                "--alias", MODEL_ALIAS, "--parallel", "1",
            ]  # fmt: skip
        else:
            command = [
                sys.executable, "-m", "llama_cpp.server", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(n_ctx),
                "--n_threads", str(threads), "--model_alias", MODEL_ALIAS,
            ]  # fmt: skip
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until /v1/models answers 200 (the model is loaded), or the process dies."""

        def up_or_ended() -> bool:
            if self.process.poll() is not None:
                return True
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=1) as answer:
                    return answer.status == 200
            except OSError:
                return False

        try:
            wait_until(up_or_ended, f"{self.kind} to start", START_TIMEOUT_S, every=0.1)
        except AssertionError:
            self.stop()
            raise
        if self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"{self.kind} exited at start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()


@dataclass
class Reply:
    """One canned response: JSON (`body` as an object) or an SSE stream (`body` as text)."""

    status: int = 200
    body: Any = None
    content_type: str = "application/json"

    def encode(self) -> bytes:
        if isinstance(self.body, str):
            return self.body.encode("utf-8")
        return json.dumps(self.body).encode("utf-8")


@dataclass
class Received:
    """A request the replay server got."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ReplayServer:
    """Answers "METHOD /path" from `routes` (404 for the rest); `received` lists the requests."""

    routes: dict[str, Reply]
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        replay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                replay.received.append(
                    Received(self.command, self.path, dict(self.headers.items()), body)
                )
                reply = replay.routes.get(f"{self.command} {self.path}")
                if reply is None:
                    reply = Reply(404, {"detail": "Not Found"})
                data = reply.encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        # a short poll: close() waits for it (the default half second, after every test)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), daemon=True
        )
        self._thread.start()

    def requests_to(self, method: str, path: str) -> list[Received]:
        """The requests received for one route."""
        return [r for r in self.received if r.method == method and r.path == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def sse(events: list[Any]) -> str:
    """An OpenAI-style SSE body: one `data:` line per event, then `data: [DONE]`."""
    lines = [f"data: {json.dumps(event)}\n\n" for event in events]
    return "".join(lines) + "data: [DONE]\n\n"


class RawServer:
    """Answers each request by calling `answer(conn, request_line)`, which writes the raw
    response (its own status line and headers) and returns to close the connection; a client
    that hangs up ends it with an OSError, counted in `hung_up`. Yields its /v1 URL as a
    context manager."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.hung_up = threading.Semaphore(0)
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            head, _, body = head.partition(b"\r\n\r\n")
            length = next(
                (int(h.split(b":")[1]) for h in head.split(b"\r\n")
                 if h.lower().startswith(b"content-length:")),
                0,
            )  # fmt: skip
            while len(body) < length:
                body += conn.recv(65536)
            try:
                self.answer(conn, head.split(b"\r\n")[0].decode())
            except OSError:
                self.hung_up.release()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._listener.close()
