"""Saved llama.cpp KV states, one per conversation: a switch or a restart need not read a long
conversation again (minutes on a laptop CPU for Phi-3-mini).

A state file is llama.cpp's own sequence-state file (`llama_state_seq_save_file`): the token ids
it holds, then their KV cache. Files live in one folder, named `<key>-<signature>-<bytes>.kv`:
the conversation's key, a signature of everything that makes a state valid (the model file,
context size, KV type, flash attention, device, phichat's and llama.cpp's versions), so a state
of another model or setup is never even opened, and the file's size as written, so a truncated
file is never handed to llama.cpp (which aborts the process on one). Each is written under a
temporary name and renamed, and the folder is kept under its cap by evicting the least recently
used states. A state is only ever a cache: the engine compares its tokens with the prompt and
uses the common prefix, so a stale state can cost time but never change an answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SUFFIX = ".kv"
TEMPORARY = ".tmp"
MAGIC = 0x67677371  # "ggsq": LLAMA_STATE_SEQ_MAGIC
VERSION = 3  # LLAMA_STATE_SEQ_VERSION of the llama.cpp phichat is tested with
HEADER = struct.Struct("<III")  # magic, version, token count; the token ids follow


def signature(*facts: object) -> str:
    """A short hash of everything that makes a state valid."""
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:16]


class StateCache:
    """The saved states of one engine setup (`sig`), in `folder`, at most `cap_bytes` in all;
    what goes wrong is told to `note` (a log), in one line, and never raised."""

    def __init__(self, folder: Path, sig: str, cap_bytes: int, note: Callable[[str], None]) -> None:
        self.folder = folder
        self.sig = sig
        self.cap_bytes = cap_bytes
        self.note = note
        self.problem: str | None = None  # why the last save failed, for the user

    def _saved(self, key: str) -> list[Path]:
        """`key`'s state files of this setup (normally one)."""
        return list(self.folder.glob(f"{key}-{self.sig}-*{SUFFIX}"))

    def find(self, key: str) -> Path | None:
        """`key`'s intact saved state of this setup, if any; a file whose size is not the size it
        was written with is deleted, with a log line."""
        found: list[tuple[float, Path]] = []
        for path in self._saved(key):
            with contextlib.suppress(OSError, ValueError):
                written = int(path.name.removesuffix(SUFFIX).rsplit("-", 1)[1])
                stat = path.stat()
                if stat.st_size == written:
                    found.append((stat.st_mtime, path))
                    continue
                self.note(f"ignoring KV state {path}: {stat.st_size} bytes of {written}")
                path.unlink()
        return max(found)[1] if found else None

    def tokens(self, key: str) -> list[int] | None:
        """The token ids of `key`'s saved state (read from its header alone), or None when there
        is none or it is damaged."""
        path = self.find(key)
        if path is None:
            return None
        try:
            with path.open("rb") as handle:
                magic, version, count = HEADER.unpack(handle.read(HEADER.size))
                data = handle.read(4 * count)
        except (OSError, struct.error):
            magic = version = count = 0
            data = b""
        if magic != MAGIC or version != VERSION or len(data) != 4 * count:
            self.note(f"ignoring KV state {path}: damaged header")
            return None
        return list(struct.unpack(f"<{count}i", data))

    def load(self, ctx: Any, key: str, capacity: int) -> list[int] | None:
        """Load `key`'s state into sequence 0 of llama.cpp context `ctx`; its token ids, or None
        when it could not be loaded (sequence 0 is then empty)."""
        import llama_cpp

        path = self.find(key)
        if path is None:
            return None
        tokens = (llama_cpp.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        read = llama_cpp.llama_state_seq_load_file(
            ctx, os.fsencode(path), 0, tokens, capacity, ctypes.byref(count)
        )
        if read == 0:
            self.note(f"ignoring KV state {path}: llama.cpp could not load it")
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        return tokens[: count.value]

    def save(self, ctx: Any, key: str, tokens: Sequence[int]) -> bool:
        """Save sequence 0 of `ctx` (holding `tokens`) as `key`'s state, evicting the least
        recently used others to stay under the cap; False (and `problem` says why) when it did
        not fit or could not be written. A half-written file is never left under a state's
        name."""
        import llama_cpp

        size = HEADER.size + 4 * len(tokens) + llama_cpp.llama_state_seq_get_size(ctx, 0)
        temporary = self.folder / f".{key}-{self.sig}.{os.getpid()}{TEMPORARY}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for old in self._saved(key):
                old.unlink()
            if size > self.cap_bytes:
                self._make_room(0)
                self.problem = (
                    f"the conversation's KV state ({size / 1e6:.0f} MB) is larger than the cap "
                    f"({self.cap_bytes / 1e6:.0f} MB): not saved"
                )
                return False
            if not self._make_room(size):
                raise OSError("other processes are writing states that fill the cap")
            array = (llama_cpp.llama_token * len(tokens))(*tokens)
            written = llama_cpp.llama_state_seq_save_file(
                ctx, os.fsencode(temporary), 0, array, len(tokens)
            )
            if written == 0:
                raise OSError("llama.cpp could not write it (is the disk full?)")
            os.replace(temporary, self.folder / f"{key}-{self.sig}-{written}{SUFFIX}")
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            self.problem = f"could not save the conversation's KV state in {self.folder}: {exc}"
            self.note(self.problem)
            return False
        self.problem = None
        return True

    def forget(self, key: str) -> None:
        """Delete every saved state of conversation `key` (of any setup)."""
        for path in self.folder.glob(f"{key}-*{SUFFIX}"):
            with contextlib.suppress(OSError):
                path.unlink()

    def _make_room(self, incoming: int) -> bool:
        """Delete the least recently used states (any setup) until `incoming` more bytes fit
        under the cap; False if they cannot. Files being written by a live process count;
        those a killed process left half-written are deleted."""
        states, total = [], 0
        for path in self.folder.iterdir():
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                if path.name.endswith(TEMPORARY):
                    if _writer_alive(path):
                        total += size
                    else:
                        path.unlink()
                elif path.suffix == SUFFIX:
                    states.append((path.stat().st_mtime, size, path))
                    total += size
        for _, size, path in sorted(states):
            if total + incoming <= self.cap_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
        return total + incoming <= self.cap_bytes


def _writer_alive(temporary: Path) -> bool:
    """Whether the process writing `temporary` (.<name>.<pid>.tmp) still runs."""
    try:
        pid = int(temporary.name.removesuffix(TEMPORARY).rsplit(".", 1)[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
