"""Checks before llama.cpp allocates anything: the model file, the context's memory, threads.

Every setting is range-checked by the schema (config.py) so nothing wraps on its way into C;
what depends on the model and the machine is checked here. llama.cpp allocates (and clears) the
whole KV cache when it creates a context, so a context too big for the machine is refused
before that, from the model's sizes in its GGUF header. The header is read in pure Python: a
few milliseconds (2 ms for Phi-3-mini's, whose 2.4 GB of tensors are never touched), against
~50 ms for llama.cpp's vocab-only load and 1-2 s for the `gguf` package's reader.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phichat.config import THREADS_PER_CORE, EngineSettings, usable_cores
from phichat.errors import PhichatError, UsageError

GGUF_MAGIC = b"GGUF"
CTX_PADDING = 256  # llama.cpp rounds the context up to a multiple of this
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32}  # per K or V value: q8_0 keeps 32 bytes + a scale

# GGUF value types: struct format of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_KEPT_ARRAY = 4096  # arrays longer than this (the vocabulary) are skipped, not read


def check_gguf(path: Path) -> None:
    """Fail early, in one line, on a missing, unreadable, special or non-GGUF model file."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(f"{path}: is a directory, not a GGUF model file")
        if not stat.S_ISREG(mode):
            raise UsageError(f"{path}: not a regular file, so not a GGUF model file")
        with path.open("rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise UsageError(f"{path}: model file not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read model file ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise UsageError(f"{path}: not a GGUF model file")


@dataclass(frozen=True)
class ModelShape:
    """What the memory check needs to know about a model."""

    architecture: str
    n_layer: int
    n_ctx_train: int  # the context length it was trained with (0: not stated)
    kv_width: int  # K and V values per token, summed over all layers

    def kv_bytes(self, n_ctx: int, layers: int | None = None, kv_type: str = "f16") -> int:
        """Bytes of the KV cache for `n_ctx` tokens (on `layers` of the layers; all by
        default), as llama.cpp allocates it."""
        cells = -(-n_ctx // CTX_PADDING) * CTX_PADDING
        share = self.n_layer if layers is None else layers
        values = cells * self.kv_width * share // max(1, self.n_layer)
        return int(values * KV_BYTES[kv_type])

    def max_ctx(self, memory: int, layers: int | None = None, kv_type: str = "f16") -> int:
        """The largest context (a multiple of CTX_PADDING) whose KV cache fits in `memory`."""
        per_cell = self.kv_bytes(CTX_PADDING, layers, kv_type) // CTX_PADDING
        return max(0, memory // max(1, per_cell)) // CTX_PADDING * CTX_PADDING


def check_load(path: Path, device: str, settings: EngineSettings) -> list[str]:
    """Refuse, in one line, settings this model and machine cannot run; return warnings."""
    check_gguf(path)
    check_threads(settings)
    shape = read_shape(path)
    if shape is None:
        return []
    check_memory(shape, path.stat().st_size, device, settings)
    if shape.n_ctx_train and settings.n_ctx > shape.n_ctx_train:
        return [
            f"--ctx {settings.n_ctx} is above the {shape.n_ctx_train} tokens {path.name} was "
            f"trained on; its answers may lose track past {shape.n_ctx_train}"
        ]
    return []


def check_threads(settings: EngineSettings) -> None:
    """More threads than cores only makes llama.cpp's threads wait for each other; far more
    (thousands) never answers."""
    cores = usable_cores()
    bound = THREADS_PER_CORE * cores
    if settings.threads > bound:
        raise UsageError(
            f"engine.threads must be <= {bound} on this machine ({THREADS_PER_CORE}x its {cores} "
            f"usable cores), not {settings.threads}"
        )


def check_memory(
    shape: ModelShape, model_bytes: int, device: str, settings: EngineSettings
) -> None:
    """Refuse a context whose KV cache, with the model's weights, exceeds the memory available.

    On CUDA, layers offloaded to the GPU keep their weights and cache there (llama.cpp reports
    a GPU that is too small itself); on the CPU and Metal (unified memory) all of it counts.
    """
    available = available_memory()
    if available is None:
        return
    host_layers = shape.n_layer
    if device == "cuda":
        offloaded = shape.n_layer if settings.n_gpu_layers < 0 else settings.n_gpu_layers
        host_layers = max(0, shape.n_layer - offloaded)
    weights = model_bytes * host_layers // max(1, shape.n_layer)
    cache = shape.kv_bytes(settings.n_ctx, host_layers, settings.kv_type)
    if weights + cache <= available:
        return
    fits = shape.max_ctx(available - weights, host_layers, settings.kv_type)
    hint = (
        f"at most about --ctx {fits} fits" if fits >= CTX_PADDING else "not even a small one fits"
    )
    raise UsageError(
        f"--ctx {settings.n_ctx} needs {_gib(cache)} of memory for its KV cache besides "
        f"{_gib(weights)} for the model, but {_gib(available)} is available ({hint})"
    )


def available_memory() -> int | None:
    """Bytes of memory this process can still use: Linux's MemAvailable, capped by the
    container's (cgroup) limit; the physical memory elsewhere; None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            found = [line.split()[1] for line in meminfo if line.startswith("MemAvailable:")]
        available = int(found[0]) * 1024
    except (OSError, IndexError, ValueError):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file, encoding="ascii") as limit:
                available = min(available, int(limit.read()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return available


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def read_shape(path: Path) -> ModelShape | None:
    """The model's shape from its GGUF header (None for an architecture without the usual
    attention keys, whose memory llama.cpp is left to judge); PhichatError for a header that
    does not parse."""
    meta = read_metadata(path)
    arch = meta.get("general.architecture")

    def number(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        return value if isinstance(value, (int, list)) and not isinstance(value, bool) else None

    n_layer, n_embd = number("block_count"), number("embedding_length")
    n_head = number("attention.head_count")
    n_head_kv = number("attention.head_count_kv", n_head)
    if not isinstance(arch, str) or not isinstance(n_layer, int) or not isinstance(n_embd, int):
        return None
    heads = max(n_head) if isinstance(n_head, list) and n_head else n_head
    if not isinstance(heads, int) or heads <= 0 or n_head_kv is None:
        return None
    per_layer = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * n_layer
    k_dim = number("attention.key_length", n_embd // heads)
    v_dim = number("attention.value_length", n_embd // heads)
    if not isinstance(k_dim, int) or not isinstance(v_dim, int):
        return None
    n_ctx_train = number("context_length", 0)
    return ModelShape(
        architecture=arch,
        n_layer=n_layer,
        n_ctx_train=n_ctx_train if isinstance(n_ctx_train, int) else 0,
        kv_width=sum(per_layer[:n_layer]) * (k_dim + v_dim),
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """The scalar (and short array) metadata of a GGUF file; the vocabulary is skipped."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _Header(data, size).metadata()
    except (OSError, ValueError, struct.error, UnicodeDecodeError, RecursionError) as exc:
        raise PhichatError(
            f"{path}: its GGUF header does not parse ({exc}); the file may be truncated or damaged"
        ) from None


class _Header:
    """A cursor over a GGUF header in memory."""

    def __init__(self, data: mmap.mmap, size: int) -> None:
        self.data, self.size, self.at = data, size, 0

    def metadata(self) -> dict[str, Any]:
        magic, version, _n_tensors, n_kv = self.unpack("<4sIQQ")
        if magic != GGUF_MAGIC or version < 2:
            raise ValueError(f"not a GGUF v2+ header (version {version})")
        self.room(n_kv, 12)  # each entry is at least a key length and a type
        meta = {}
        for _ in range(n_kv):
            key = self.string()
            (kind,) = self.unpack("<I")
            value = self.value(kind, keep=not key.startswith("tokenizer."))
            if value is not None:
                meta[key] = value
        return meta

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return values

    def room(self, count: int, each: int) -> None:
        if count * each > self.size - self.at:
            raise ValueError(f"{count} entries cannot fit in the rest of the file")

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        self.room(length, 1)
        self.at += length
        return bytes(self.data[self.at - length : self.at]).decode("utf-8")

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.unpack("<" + _SCALARS[kind])[0]
        if kind == _STRING:
            return self.string() if keep else self.skip_string()
        if kind != _ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, count = self.unpack("<IQ")
        if item in _SCALARS:
            width = struct.calcsize(_SCALARS[item])
            self.room(count, width)
            if keep and count <= _KEPT_ARRAY:
                return list(self.unpack(f"<{count}{_SCALARS[item]}"))
            self.at += count * width
            return None
        self.room(count, 8)
        if item == _STRING:  # the vocabulary: skipped in a tight loop (32k-150k strings)
            at, data, length_at = self.at, self.data, _U64.unpack_from
            for _ in range(count):
                at += 8 + length_at(data, at)[0]
            if at > self.size:
                raise ValueError("a string array runs past the end of the file")
            self.at = at
            return None
        for _ in range(count):
            self.value(item, keep=False)
        return None

    def skip_string(self) -> None:
        (length,) = self.unpack("<Q")
        self.room(length, 1)
        self.at += length
