"""Saved llama.cpp KV states, one per conversation: a switch or a restart need not read a long
conversation again (minutes on a laptop CPU for Phi-3-mini).

A state file is llama.cpp's own sequence-state file (as `llama_state_seq_save_file` writes it):
the token ids it holds, then their KV cache. Files live in one folder, named
`<key>-<signature>-<size>-<crc>.kv`: the conversation's key, a signature of everything that makes
a state valid (the model file, context size, KV type, flash attention, device, phichat's and
llama.cpp's versions), so a state of another model or setup is never even opened, then the
file's size and CRC-32 as written. A file that is not regular (a FIFO) or not of that size is
deleted unopened, and one whose CRC-32 differs (rotted KV data, which llama.cpp would load and
answer from) is deleted before llama.cpp sees it; either way the prompt is read instead, and the
log says why. A save copies the state to memory and writes it in the background (a switch does
not wait for it; reading that conversation's state, and closing, do), under a temporary name of
its own (which no other writer touches while its process lives), synced, and renamed; the
conversation's previous state is deleted only then, so a failed save keeps it. The folder is kept
under its cap by evicting the least recently used states. A state is only ever a cache: the
engine compares its tokens with the prompt and uses the common prefix, so a stale state can cost
time but never change an answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import stat
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SUFFIX = ".kv"
TEMPORARY = ".tmp"
MAGIC = 0x67677371  # "ggsq": LLAMA_STATE_SEQ_MAGIC
VERSION = 3  # LLAMA_STATE_SEQ_VERSION of the llama.cpp phichat is tested with
HEADER = struct.Struct("<III")  # magic, version, token count; the token ids follow
COPY_PREFIX = 8  # a state copied to memory starts with a magic and its sequence id: not in files
CHUNK = 1 << 22  # bytes read at a time for the checksum
WRITER_NICE = 19  # a background write yields the CPU to everything else
LEFTOVER_S = 3600  # a temporary file untouched this long is left over, whatever its pid says


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
        self.in_background = True  # a save is written by a thread of its own (`save`)
        self._writing: tuple[str, threading.Thread] | None = None  # the state being written

    def _saved(self, key: str) -> list[Path]:
        """`key`'s state files of this setup (normally one)."""
        return list(self.folder.glob(f"{key}-{self.sig}-*{SUFFIX}"))

    def _written(self, key: str, path: Path) -> tuple[int, int] | None:
        """The size and CRC-32 state file `path` was written with (from its name), if given."""
        parts = path.name.removesuffix(SUFFIX).removeprefix(f"{key}-{self.sig}-").split("-")
        try:
            size, crc = parts
            return int(size), int(crc, 16)
        except ValueError:
            return None

    def find(self, key: str) -> tuple[Path, int] | None:
        """`key`'s newest saved state of this setup and the CRC-32 it was written with. Any other
        file under a state's name (not a regular file, or not of the size its name gives) is
        deleted unopened, with a log line. Waits for `key`'s state being written, if any."""
        self.wait(key)
        found: list[tuple[float, Path, int]] = []
        for path in self._saved(key):
            with contextlib.suppress(OSError):
                info, written = path.stat(), self._written(key, path)
                if stat.S_ISREG(info.st_mode) and written and info.st_size == written[0]:
                    found.append((info.st_mtime, path, written[1]))
                    continue
                self.note(
                    f"ignoring KV state {path}: not a regular file of the size its name gives"
                )
                path.unlink()
        if not found:
            return None
        _, path, crc = max(found)
        return path, crc

    def tokens(self, key: str) -> list[int] | None:
        """The token ids of `key`'s saved state (read from its header alone), or None when there
        is none or it is damaged."""
        found = self.find(key)
        if found is None:
            return None
        path = found[0]
        try:
            with _open_regular(path) as handle:
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
        when it could not be loaded (sequence 0 is then empty). A state whose CRC-32 is not the
        one it was written with is deleted before llama.cpp sees it."""
        import llama_cpp

        found = self.find(key)
        if found is None:
            return None
        path, crc = found
        damage = _damage(path, crc)
        if damage is not None:
            self.note(f"ignoring KV state {path}: {damage}")
            with contextlib.suppress(OSError):
                path.unlink()
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
        """Save sequence 0 of `ctx` (holding `tokens`) as `key`'s state. It is copied to memory
        here (the context is free again at once), then written to its file by a thread of its
        own, or here when `in_background` is off; one state is in memory at a time, so a
        save first waits for the write before. False (and `problem` says why) when it is
        larger than the cap or could not be copied; a failed write is told in `problem`."""
        import llama_cpp

        self.wait()
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        head = HEADER.pack(MAGIC, VERSION, len(tokens)) + struct.pack(f"<{len(tokens)}i", *tokens)
        whole = len(head) + size - COPY_PREFIX  # the file's size
        if whole > self.cap_bytes:
            with contextlib.suppress(OSError):
                self._make_room(0, [])
            self.problem = (
                f"the conversation's KV state ({whole / 1e6:.0f} MB) is larger than the cap "
                f"({self.cap_bytes / 1e6:.0f} MB): not saved"
            )
            return False
        data = bytearray(size)
        buffer = (ctypes.c_uint8 * size).from_buffer(data)
        copied = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        del buffer  # the bytearray is not exported any more
        if copied <= COPY_PREFIX:
            self.problem = "could not save the conversation's KV state: llama.cpp could not copy it"
            self.note(self.problem)
            return False
        state = memoryview(data)[COPY_PREFIX:copied]
        if not self.in_background:
            return self._write(key, head, state)
        thread = threading.Thread(
            target=self._write_aside, args=(key, head, state), name="phichat-state-save"
        )
        self._writing = (key, thread)
        thread.start()
        return True

    def wait(self, key: str | None = None) -> None:
        """Until the state being written (`key`'s, or any) is in its file."""
        writing = self._writing
        if writing is not None and key in (None, writing[0]):
            writing[1].join()
            self._writing = None

    def _write_aside(self, key: str, head: bytes, data: memoryview) -> None:
        """`_write` on a thread of its own, at the lowest CPU priority where the system sets it
        per thread (Linux): writing a state is mostly the kernel's copy into fresh page cache,
        which otherwise takes a core from llama.cpp reading the next prompt."""
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        self._write(key, head, data)

    def _write(self, key: str, head: bytes, data: memoryview) -> bool:
        """Write `key`'s state (llama.cpp's state file: `head`, then the sequence's `data`) to
        a temporary file of its own, synced and renamed; `key`'s previous state is deleted
        only then, so a failed write keeps it. False (and `problem` says why) when it failed."""
        size = len(head) + len(data)
        temporary: Path | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            previous = self._saved(key)
            self._make_room(size, previous)
            handle, name = tempfile.mkstemp(
                prefix=f".{key}-{self.sig}-", suffix=f".{os.getpid()}{TEMPORARY}", dir=self.folder
            )
            temporary = Path(name)
            with os.fdopen(handle, "wb") as writer:
                writer.write(head)
                writer.write(data)
                writer.flush()
                os.fsync(writer.fileno())
            crc = zlib.crc32(data, zlib.crc32(head))
            state = self.folder / f"{key}-{self.sig}-{size}-{crc:08x}{SUFFIX}"
            os.replace(temporary, state)
        except OSError as exc:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    temporary.unlink()
            self.problem = f"could not save the conversation's KV state in {self.folder}: {exc}"
            self.note(self.problem)
            return False
        for old in previous:
            if old != state:
                with contextlib.suppress(OSError):
                    old.unlink()
        self.problem = None
        return True

    def share(self, key: str, other: str) -> None:
        """Let conversation `other`, which has no saved state, start from `key`'s (a fork):
        a hard link under its name (a copy where links cannot be made)."""
        found = self.find(key)
        if found is None or self.find(other) is not None:
            return
        path = found[0]
        target = path.with_name(f"{other}-{path.name.removeprefix(f'{key}-')}")
        try:
            try:
                os.link(path, target)
            except OSError:
                import shutil

                shutil.copyfile(path, target)
        except OSError as exc:
            self.note(f"could not share the KV state {path} with {other}: {exc}")

    def forget(self, key: str) -> None:
        """Delete every saved state of conversation `key` (of any setup)."""
        self.wait(key)
        for path in self.folder.glob(f"{key}-*{SUFFIX}"):
            with contextlib.suppress(OSError):
                path.unlink()

    def _make_room(self, incoming: int, replaced: list[Path]) -> None:
        """Delete the least recently used states (any setup) but the `replaced` ones until
        `incoming` more bytes fit under the cap. Temporary files do not count: one is its
        writer's until renamed. Those left by a process that died, or untouched for an hour
        (a pid reused), are deleted."""
        states, total = [], 0
        for path in self.folder.iterdir():
            with contextlib.suppress(OSError):
                info = path.stat()
                if path.name.endswith(TEMPORARY):
                    if not _writer_alive(path) or time.time() - info.st_mtime > LEFTOVER_S:
                        path.unlink()
                elif path.suffix == SUFFIX and path not in replaced:
                    states.append((info.st_mtime, info.st_size, path))
                    total += info.st_size
        for _, size, path in sorted(states):
            if total + incoming <= self.cap_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size


def _open_regular(path: Path) -> io.BufferedReader:
    """`path` opened for reading; OSError, never a wait, when it is not a regular file (a FIFO
    opened without O_NONBLOCK waits for a writer forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_crc32(reader: io.BufferedReader) -> int:
    """The CRC-32 of what is left to read (about 1 s for a 1.2 GB state: state_checksum.py)."""
    crc, buffer = 0, bytearray(CHUNK)
    view = memoryview(buffer)
    while read := reader.readinto(buffer):
        crc = zlib.crc32(view[:read], crc)
    return crc


def _damage(path: Path, crc: int) -> str | None:
    """Why the state file at `path` is not the one written with CRC-32 `crc`; None when it is."""
    try:
        with _open_regular(path) as reader:
            actual = file_crc32(reader)
    except OSError as exc:
        return f"could not read it: {exc}"
    return None if actual == crc else f"checksum {actual:08x}, written {crc:08x}: damaged"


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
