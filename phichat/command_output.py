"""What a shell command prints, as an attached text file (`!COMMAND` in the app). The command
runs in a session of its own, with no terminal: stdin is empty, stderr is kept for the one line
that says why it failed, and nothing it does reaches the terminal phichat draws on. It may print
up to MAX_COMMAND_BYTES for up to COMMAND_TIMEOUT_S seconds: past either, what came is kept, the
rest refused in one line and the command (with everything it started) killed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

from phichat.errors import PhichatError
from phichat.files import FileProblem, TextFile, decode
from phichat.text import one_line

MAX_COMMAND_BYTES = 1 << 20  # what a command may print: about 250k tokens, far over any window
COMMAND_TIMEOUT_S = 30.0  # how long it may run
NAME_CHARS = 48  # a command as its chip names it
READ_BYTES = 65536
ERR_BYTES = 4096  # of stderr kept, for its first line
POLL_S = 0.05  # how often a running command's time and `cancel` are checked


def command_name(command: str) -> str:
    """How an attached command's output is named: `!` and the command, on one line, short."""
    return "!" + one_line(command, NAME_CHARS)


def command_output(
    command: str,
    warn: Callable[[PhichatError], None],
    max_bytes: int = MAX_COMMAND_BYTES,
    timeout_s: float = COMMAND_TIMEOUT_S,
    cancel: Callable[[], bool] = lambda: False,
) -> TextFile | None:
    """What `command` (run by the shell, in the current folder) prints on stdout, as a text
    file; None when that is nothing usable. A command that fails, prints too much or too long,
    or prints what is not text is one line to `warn` each; what it printed before is kept.
    `cancel()` true (polled) kills it and gives None."""
    name = command_name(command)
    if not command.strip():
        warn(FileProblem(name, "no command to run"))
        return None
    try:
        process = subprocess.Popen(  # the user's own command, run by their shell
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # no controlling terminal, and a group to kill
        )
    except OSError as exc:
        warn(FileProblem(name, f"cannot run it: {exc.strerror or exc}"))
        return None
    out, err, why = _collect(process, max_bytes, timeout_s, cancel)
    if why is not None:
        _kill(process)
    status = process.wait()
    if why == "cancelled":
        return None
    if why is not None:
        warn(FileProblem(name, why))
    elif status != 0:
        warn(FileProblem(name, _failure(status, err)))
    if len(out) > max_bytes:
        out = out[:max_bytes]
        if b"\n" in out:
            out = out[: out.rfind(b"\n") + 1]  # whole lines (and whole characters)
    if not out.strip():
        if why is None and status == 0:
            warn(FileProblem(name, "printed nothing"))
        return None
    try:
        text = decode(out, name)
    except FileProblem as exc:
        warn(exc)
        return None
    digest = hashlib.sha256(out).hexdigest()
    return TextFile(name, f"{name}#{digest[:16]}", text, len(out), time.time_ns(), digest)


def _collect(
    process: subprocess.Popen[bytes], max_bytes: int, timeout_s: float, cancel: Callable[[], bool]
) -> tuple[bytes, bytes, str | None]:
    """Read the command's stdout and stderr (each in a thread) to their end and wait for it
    to exit: (stdout, the start of stderr, why it was cut short: over `max_bytes`, over
    `timeout_s`, "cancelled"; None: it ended by itself)."""
    out, err = bytearray(), bytearray()
    over = threading.Event()

    def read_out(pipe: IO[bytes]) -> None:
        while chunk := os.read(pipe.fileno(), READ_BYTES):
            out.extend(chunk)
            if len(out) > max_bytes:
                over.set()
                return

    def read_err(pipe: IO[bytes]) -> None:
        while chunk := os.read(pipe.fileno(), READ_BYTES):
            err.extend(chunk[: max(0, ERR_BYTES - len(err))])  # its first line is what is shown

    def reading(read: Callable[[IO[bytes]], None], pipe: IO[bytes] | None) -> None:
        """Run `read` on `pipe`, then close it (here only: no fd is closed while read)."""
        assert pipe is not None
        with pipe, contextlib.suppress(OSError):
            read(pipe)

    readers = [
        threading.Thread(target=reading, args=(read_out, process.stdout), daemon=True),
        threading.Thread(target=reading, args=(read_err, process.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout_s
    while any(reader.is_alive() for reader in readers) or process.poll() is None:
        if over.is_set():
            return bytes(out), bytes(err), f"printed over {_size(max_bytes)}: the rest refused"
        if cancel():
            return bytes(out), bytes(err), "cancelled"
        if time.monotonic() > deadline:
            return bytes(out), bytes(err), f"still running after {timeout_s:g} s: stopped"
        over.wait(POLL_S)
    why = f"printed over {_size(max_bytes)}: the rest refused" if over.is_set() else None
    return bytes(out), bytes(err), why


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Kill the command and everything it started (its session's process group)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:  # pragma: no cover - Windows has no process groups to kill
            process.kill()
    except ProcessLookupError:
        pass


def _failure(status: int, err: bytes) -> str:
    """Why a command failed, in one line: its exit status or signal, and its first line on
    stderr."""
    why = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
    lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    return f"{why}: {one_line(lines[0], 200)}" if lines else why


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n:,} bytes"
