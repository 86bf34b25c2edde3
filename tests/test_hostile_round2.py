"""Hostile input, round two (issue 22): a terminal that goes away without a SIGHUP, the
process that started phichat gone, two stop signals at once, a database refused.

The app runs as a real process on a pseudo-terminal that is not its controlling terminal, so
closing this side's end takes the terminal away and no hangup signal is sent.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import pty
import re
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import TIMEOUT_S, Tmux, run, wait_until
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from servers import RawServer
from test_hostile import LONG_PROMPT, answer_process, read_at_least, saved, toml_literal
from test_remote import GREEDY, stream_error

from phichat.config import SECTIONS
from phichat.errors import PhichatError
from phichat.store import APPLICATION_ID, SCHEMA_VERSION, Store, default_path

if TYPE_CHECKING:
    from conftest import CliRun

PHICHAT = Path(sys.executable).parent / "phichat"
ESCAPES = re.compile(rb"\x1b\[[0-9;?<>=$]*[ -/]*[@-~]|\x1b[]P_^][^\x07\x1b]*(\x07|\x1b\\)|\x1b.")
EXIT_S = 15  # to stop, save and index the answer, and exit (~3 s), on a busy machine
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


class PtyApp:
    """A command on a 120x40 pseudo-terminal it has no control of (a session of its own, no
    controlling terminal): what it draws is read as it comes, keys are typed into it."""

    def __init__(self, command: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color"}
        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env
        )
        os.close(slave)
        self._drawn = bytearray()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self._drawn += os.read(self.master, 65536)
                except OSError:  # the other side has closed
                    return

    def text(self) -> str:
        """Everything drawn so far, without the escape sequences."""
        return ESCAPES.sub(b"", bytes(self._drawn)).decode("utf-8", "replace")

    def wait_for_text(self, text: str) -> None:
        wait_until(lambda: text in self.text(), repr(text))

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close_terminal(self) -> None:
        """Close this side of the terminal (the reader first: a read under way would keep it)."""
        self._stop.set()
        self._reader.join()
        os.close(self.master)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        if not self._stop.is_set():
            self.close_terminal()


def app_command(smollm_config: Path) -> list[str]:
    flags = f"--config {smollm_config} --max-tokens 2000 --temperature 0 --repeat-penalty 1.3"
    return [str(PHICHAT), *flags.split()]


@pytest.fixture
def pty_apps() -> Iterator[list[PtyApp]]:
    started: list[PtyApp] = []
    yield started
    for app in started:
        app.kill()


def answering(app: PtyApp) -> None:
    """Send the long prompt once the app is ready; return once its answer is streaming."""
    app.wait_for_text("ready")
    app.type(LONG_PROMPT + "\r")
    wait_until(lambda: len(saved()) == 1, "the question saved")
    app.wait_for_text("Once upon a time")


def assert_answer_saved_stopped() -> None:
    [user, answer] = saved()
    assert user == ("user", "finished", LONG_PROMPT)
    assert answer[:2] == ("assistant", "stopped") and answer[2].startswith("Once upon a time")


@pytest.mark.slow
@needs_linux
def test_a_terminal_gone_without_a_hangup_ends_the_answer_and_the_app(
    smollm_config: Path, pty_apps: list[PtyApp]
) -> None:
    app = PtyApp(app_command(smollm_config))
    pty_apps.append(app)
    answering(app)
    app.close_terminal()  # reads now fail with EIO; no SIGHUP: not its controlling terminal
    started = time.monotonic()
    assert app.process.wait(timeout=TIMEOUT_S) == 129
    assert time.monotonic() - started < EXIT_S
    assert_answer_saved_stopped()


@pytest.mark.slow
@needs_linux
def test_a_terminal_gone_while_idle_ends_the_app_at_once(
    smollm_config: Path, pty_apps: list[PtyApp]
) -> None:
    app = PtyApp(app_command(smollm_config))
    pty_apps.append(app)
    app.wait_for_text("ready")
    app.close_terminal()
    started = time.monotonic()
    assert app.process.wait(timeout=TIMEOUT_S) == 129
    assert time.monotonic() - started < EXIT_S


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Orphans among this process's descendants become its children (PR_SET_CHILD_SUBREAPER),
    so the exit code of one whose parent died can be waited for."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(36, 0, 0, 0, 0)


@pytest.mark.slow
@needs_linux
def test_the_parent_gone_ends_the_answer_and_the_app(
    smollm_config: Path, pty_apps: list[PtyApp]
) -> None:
    """phichat started by a process that then dies (SIGKILL: it tells no one), the terminal
    still there: the answer stops, is saved, and the app exits."""
    parent = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)"
    with subreaper():
        app = PtyApp([sys.executable, "-c", parent, *app_command(smollm_config)])
        pty_apps.append(app)
        answering(app)
        children = Path(f"/proc/{app.process.pid}/task/{app.process.pid}/children")
        [pid] = [int(child) for child in children.read_text().split()]
        app.process.kill()
        app.process.wait()
        started = time.monotonic()
        while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() - started < TIMEOUT_S, "the app went on"
            time.sleep(0.05)
    assert os.waitstatus_to_exitcode(ended[1]) == 129
    assert time.monotonic() - started < EXIT_S
    assert_answer_saved_stopped()


@pytest.mark.slow
def test_the_app_without_a_terminal_is_refused_at_once(smollm_config: Path) -> None:
    """`phichat < /dev/null` (or started in the background by a script): Textual would read
    the end of stdin over and over at full speed."""
    result = subprocess.run(
        app_command(smollm_config), stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr == (
        b"phichat: error: the chat app needs a terminal, and stdin is not one "
        b"(--prompt answers without one)\n"
    )


@pytest.mark.slow
@needs_linux
def test_the_app_under_timeout_ends_with_its_terminal(smollm_config: Path, tmp_path: Path) -> None:
    """`timeout` runs phichat in a process group of its own, which the terminal's hangup does
    not reach: Textual stops itself there (job control), and then its terminal closes."""
    if subprocess.run(["which", "tmux"], capture_output=True).returncode:
        pytest.skip("tmux is not installed")
    tmux = Tmux(tmp_path / "tmux.sock")
    try:
        tmux.start(["sh", "-c", f"timeout 600 {' '.join(app_command(smollm_config))}"])
        exe = str(PHICHAT)
        find = ["pgrep", "-f", f"python.* {exe} --config"]
        wait_until(lambda: subprocess.run(find, capture_output=True).stdout.strip(), "the app")
        [pid] = subprocess.run(find, capture_output=True).stdout.split()
        time.sleep(1)
        subprocess.run([*tmux.base, "kill-session"], capture_output=True)

        def ended() -> bool:
            status = Path(f"/proc/{int(pid)}/status")
            return not status.exists() or "State:\tZ" in status.read_text()

        started = time.monotonic()
        wait_until(ended, "the app to exit")
        assert time.monotonic() - started < EXIT_S
    finally:
        tmux.kill()


# --- two stop signals: the first decides ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("gap_s", [0.05, 0.3])
def test_sigint_then_sigterm_exits_as_sigint_did(smollm_config: Path, gap_s: float) -> None:
    """Ctrl+C, then a `kill` `gap_s` later, while the answer stops or phichat saves: 130, and
    the answer saved, marked stopped. (Two signals sent at the same instant have no order: the
    kernel may hand them to two of the process's threads, and either may run first.)"""
    process = answer_process(smollm_config)
    first = read_at_least(process, 40)
    process.send_signal(signal.SIGINT)
    time.sleep(gap_s)
    process.send_signal(signal.SIGTERM)
    rest, err = process.communicate(timeout=TIMEOUT_S)
    assert (process.returncode, err) == (130, b"")
    [user, answer] = saved()
    assert user == ("user", "finished", LONG_PROMPT)
    assert answer[:2] == ("assistant", "stopped")
    assert (first + rest).decode().rstrip("\n") == answer[2]


# --- a database refused is left as it was ------------------------------------------------------


def marked_database(path: Path, version: int, *statements: str) -> bytes:
    """An SQLite file with phichat's application id and `version`, made by `statements`."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {version}")
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("version", "statements", "why"),
    [
        (0, ["CREATE TABLE stray (x)"], "phichat's mark on other tables"),
        (0, ["CREATE TABLE conversations (x)"], "phichat's mark on other tables"),
        (SCHEMA_VERSION, ["CREATE TABLE stray (x)"], f"but not schema {SCHEMA_VERSION}'s "),
        (SCHEMA_VERSION, [], f"but not schema {SCHEMA_VERSION}'s "),
        (3, ["CREATE TABLE conversations (x)"], "but not schema 3's conversations, "),
    ],
)
def test_a_database_with_phichats_mark_but_not_its_tables_is_left_as_it_was(
    tmp_path: Path, version: int, statements: list[str], why: str
) -> None:
    path = tmp_path / "history.db"
    before = marked_database(path, version, *statements)
    with pytest.raises(PhichatError) as refused:
        Store.open(path)
    assert "not a phichat history database (phichat's mark" in str(refused.value)
    assert why in str(refused.value)
    assert "it was left untouched" in str(refused.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.db"]


def test_phichats_own_database_with_a_table_of_the_users_opens(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with Store.open(path) as store:
        store.create_conversation(title="kept")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE my_notes (x)")
        conn.commit()
    with Store.open(path) as store:
        assert [c.title for c in store.conversations()] == ["kept"]


# --- a server that lets the connection in and then says too little ------------------------------


def trickled_headers(conn: socket.socket, request_line: str) -> None:
    """The status line and headers a byte at a time, never ending: each read gets something."""
    for byte in itertools.cycle(b"HTTP/1.1 200 OK\r\nX-Slow: "):
        conn.sendall(bytes([byte]))
        time.sleep(0.1)


def no_headers(conn: socket.socket, request_line: str) -> None:
    time.sleep(60)


@pytest.mark.slow
@pytest.mark.parametrize("answer", [trickled_headers, no_headers])
def test_the_answers_deadline_covers_waiting_for_the_headers(answer: Callable) -> None:
    """[server] timeout 0.5 s, max_tokens 1: the answer's deadline is 0.508 s, though no read
    waits 0.5 s while the headers trickle in."""
    with RawServer(answer) as server:
        started = time.perf_counter()
        sampling = replace(GREEDY, max_tokens=1)
        message = stream_error(server.url, sampling, timeout=0.5, kind="generic")
        assert time.perf_counter() - started < 3
    assert message.startswith(f"127.0.0.1:{server.port} ")
    if answer is trickled_headers:
        assert message == (
            f"127.0.0.1:{server.port} did not finish the answer within 0.508s ([server] timeout "
            "x (1 + max_tokens / 64)) after 0 tokens; what came is kept"
        )
    else:
        assert "said nothing for 0.5s" in message


# --- text a terminal would obey, in every output -------------------------------------------------

STEERING = "ok \x1b]52;c;aGk=\x07 \x9b2J \u202egnp.exe\u202c \u2066x\u2069 \x7f \x85 end"
OBEYED = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def steering_conversation() -> int:
    with Store.open(default_path()) as store:
        conversation = store.create_conversation(title=f"title {STEERING}")
        store.add_message(conversation.id, "user", f"question {STEERING}")
        store.add_message(conversation.id, "assistant", f"answer {STEERING}")
    return conversation.id


def stored_texts(args: list[str], out: str) -> list[str]:
    """The stored texts a JSON output holds: the title (history), the messages (export)."""
    if args[0] == "history":
        return [json.loads(out.splitlines()[0])["title"]]
    return [message["content"] for message in json.loads(out)["messages"]]


@pytest.mark.parametrize(
    "args",
    [["history", "--json"], ["export", "{id}", "--format", "json"], ["history"], ["show", "{id}"]],
)
def test_stored_text_is_shown_never_obeyed(
    phichat_cli: CliRun, steering_conversation: int, args: list[str]
) -> None:
    """No escape, C1 control or bidi override reaches the terminal raw; JSON reads back as
    stored."""
    result = phichat_cli(*[arg.format(id=steering_conversation) for arg in args])
    assert (result.returncode, result.stderr) == (0, "")
    assert "end" in result.stdout and not OBEYED.findall(result.stdout)
    if "json" in args or "--json" in args:
        texts = stored_texts(args, result.stdout)
        assert texts and all(text.endswith(STEERING) for text in texts), texts


def test_search_results_in_json_are_shown_never_obeyed(
    phichat_cli: CliRun, steering_conversation: int, minilm_dir: Path
) -> None:
    result = phichat_cli("search", "gnp.exe question", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout and not OBEYED.findall(result.stdout)
    contents = [json.loads(line)["content"] for line in result.stdout.splitlines()]
    assert f"question {STEERING}" in contents


# --- anything at all in a server's stream, and at the config path -------------------------------

KEYS = ["choices", "delta", "content", "finish_reason", "usage", "timings", "error", "message"]
KEYS += ["completion_tokens", "cache_n", "role", "text", "index", "id", "object"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
DELTA = st.fixed_dictionaries(
    {"choices": st.lists(st.fixed_dictionaries({"delta": JSON_VALUES}), min_size=1, max_size=2)}
)
SSE_LINE = st.one_of(
    JSON_VALUES.map(lambda value: b"data: " + json.dumps(value).encode()),
    DELTA.map(lambda value: b"data: " + json.dumps(value).encode()),
    st.binary(max_size=40).map(lambda raw: b"data: " + raw),
    st.binary(max_size=40),
    st.sampled_from([b"data: [DONE]", b": ping", b"", b"event: x", b"data:", b"retry: 5"]),
)


class ChunkServer(RawServer):
    """A server listing one model, whose chat answer is `body` (set per example), sent with a
    length, chunked, or until the connection closes (`framing`)."""

    body = b""
    framing = "close"

    def __init__(self) -> None:
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket, request_line: str) -> None:
        if request_line.startswith("GET /v1/models "):
            body = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        if not request_line.startswith("POST /v1/chat/completions "):
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        framing = {
            "close": b"Connection: close",
            "length": b"Content-Length: %d" % len(self.body),
            "chunked": b"Transfer-Encoding: chunked",
        }[self.framing]
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n%s\r\n\r\n" % framing
        body = self.body
        if self.framing == "chunked":
            body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        conn.sendall(head + body)


@pytest.fixture(scope="module")
def chunk_server() -> Iterator[ChunkServer]:
    with ChunkServer() as server:
        yield server


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("PHICHAT_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    lines=st.lists(SSE_LINE, max_size=8),
    framing=st.sampled_from(["close", "length", "chunked"]),
    separator=st.sampled_from([b"\n\n", b"\n", b"\r\n\r\n"]),
)
def test_any_chunks_from_a_server(
    lines: list[bytes],
    framing: str,
    separator: bytes,
    chunk_server: ChunkServer,
    phichat_cli: CliRun,
) -> None:
    """Whatever a server streams: the answer, or one error line and exit 1 (warnings aside);
    never a traceback or an internal error. (Each example takes ~1 s: 40 by default.)"""
    chunk_server.body = b"".join(line + separator for line in lines)
    chunk_server.framing = framing
    flags = ["--server", chunk_server.url, "--max-tokens", "8", "--no-history", "--prompt", "hi"]
    result = phichat_cli(*flags)
    event(f"exit {result.returncode}")
    said = result.stderr.strip().splitlines()
    errors = [line for line in said if line.startswith("phichat: error: ")]
    assert result.returncode in (0, 1) and len(errors) == result.returncode, result
    assert all(line.startswith(("phichat: error: ", "phichat: warning: ")) for line in said)
    assert "internal error" not in result.stderr, result


TOML_KEYS = [*SECTIONS, "server", "keys", "models", "x", "a.b", '"q"', "n_ctx", "path", "name"]
TOML_BARE = st.sampled_from(TOML_KEYS) | st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
TOML_SCALARS = (
    st.booleans().map(toml_literal)
    | st.integers().map(toml_literal)
    | st.floats().map(toml_literal)
    | st.text(max_size=20).map(toml_literal)
    | st.sampled_from(['"~nosuchuser/x"', '"~/x.db"', '""', '"/dev/zero"', '"."', "[]", "{}"])
)


def toml_documents() -> st.SearchStrategy[str]:
    """TOML that parses (tables nested at any depth, arrays, inline tables, known and unknown
    keys) and text that does not."""
    assignment = st.builds(lambda k, v: f"{k} = {v}", TOML_BARE, TOML_SCALARS)
    header = st.lists(TOML_BARE, min_size=1, max_size=40).map(lambda ks: "[" + ".".join(ks) + "]")
    deep = st.integers(1, 200_000).map(lambda n: "x = " + "[" * n + "]" * n)
    line = st.one_of(assignment, assignment, header, deep.filter(lambda s: len(s) < 300))
    parsed = st.lists(line, max_size=8).map("\n".join)
    return st.one_of(parsed, parsed, st.text(max_size=60), deep)


def config_paths(tmp: Path) -> st.SearchStrategy[str]:
    """Where --config points: the file written, or anything hostile instead."""
    written = str(tmp / "hostile.toml")
    odd = [str(tmp), str(tmp / "fifo"), str(tmp / "missing.toml"), "/dev/zero", "/dev/null"]
    odd += ["/proc/self/mem", "~nosuchuser/config.toml", "~/nonexistent.toml", "", "."]
    odd += ["/" + "d" * 5000, str(tmp / "nested" / "x.toml"), str(tmp / "ünï cödé.toml")]
    return st.one_of(st.just(written), st.just(written), st.sampled_from(odd))


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("configs")
    os.mkfifo(tmp / "fifo")
    return tmp


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("PHICHAT_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(document=toml_documents(), data=st.data())
def test_any_config_file_at_any_path(
    document: str,
    data: st.DataObject,
    capsys: pytest.CaptureFixture[str],
    tiny_phi3_path: Path,
    config_dir: Path,
) -> None:
    """Exit 0, 1 or 2 with at most one error line (warnings aside); no traceback, no internal
    error."""
    path = data.draw(config_paths(config_dir), label="--config")
    (config_dir / "hostile.toml").write_text(document, "utf-8", "surrogateescape")
    code, _, err = run(capsys, "--config", path, "--prompt", "hi", "--max-tokens", "4")
    event(f"exit {code}")
    said = err.strip().splitlines()
    assert code in (0, 1, 2), (path, document, err)
    assert len([line for line in said if line.startswith("phichat: error: ")]) == min(code, 1)
    assert all(line.startswith(("phichat: error: ", "phichat: warning: ")) for line in said), err
    assert "internal error" not in err, (path, document, err)


# --- the pieces that notice a terminal gone, in this process --------------------------------------


def test_a_hung_up_end_is_seen_without_reading_it() -> None:
    from phichat.tui.terminal import _dead

    read_end, write_end = os.pipe()
    try:
        assert not _dead(read_end)
        os.close(write_end)  # the other side gone: POLLHUP, though nothing was read
        assert _dead(read_end)
    finally:
        os.close(read_end)


def test_a_failed_write_to_the_terminal_is_reported_once_and_dropped() -> None:
    from phichat.tui.terminal import _SurvivingFile

    read_end, write_end = os.pipe()
    lost: list[str] = []
    with os.fdopen(write_end, "w") as file:
        surviving = _SurvivingFile(file, lambda: lost.append("lost"))
        surviving.write("drawn")
        surviving.flush()
        assert os.read(read_end, 100) == b"drawn" and lost == []
        os.close(read_end)  # the terminal gone: writes fail from now on
        for _ in range(3):
            surviving.write("more")
            surviving.flush()  # no exception reaches Textual's writer thread
        assert lost == ["lost"]
        with contextlib.suppress(OSError):
            file.close()


def test_the_app_is_refused_without_a_terminal_in_process(phichat_cli: CliRun) -> None:
    """Same as `phichat < /dev/null`, in this process (stdin's descriptor swapped for a while)."""
    saved_stdin = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(devnull, 0)
        result = phichat_cli()
    finally:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)
        os.close(devnull)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "phichat: error: the chat app needs a terminal, and stdin is not one "
        "(--prompt answers without one)\n"
    )
