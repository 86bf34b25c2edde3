"""A Phi-3-mini-shaped GGUF for benchmarks, and its speed with raw llama.cpp.

The file has Phi-3-mini-4k-instruct's exact architecture (`phi3`: fused attn_qkv, fused gate+up
ffn_up, 3072 wide, 32 layers, 32 heads, 8192 FFN, 32064 vocab, its rope and norm
hyperparameters), Phi-3's real tokenizer and chat template (from llama.cpp's vocab-only
ggml-vocab-phi-3.gguf, which carries the real model's hyperparameters too) and random K-quant
weights with small scales, so greedy decoding runs without NaN and produces random text. Only
the weights' values differ from the real file: llama.cpp does the same work per token.

Weight types (--mix): `q4_k_m` (the default) follows llama.cpp's Q4_K_M rules as in Microsoft's
Phi-3-mini-4k-instruct-q4.gguf (attn_qkv Q5_K, ffn_down Q6_K in 16 of 32 layers, output Q6_K,
the rest Q4_K: 2.39 GB, the real file's size). `q4_k` has every matrix in Q4_K but output
(2.18 GB), which llama.cpp repacks for its x86 kernels (CPU_REPACK, q4_K_8x8) as it does the
Q4_K part of the real mix; on this machine the two read and decode at similar speeds.

Written once into ${XDG_CACHE_HOME:-~/.cache}/phichat-bench/phi3-mini-shape-<mix>.gguf (under a
temporary name, renamed when complete, then checked); a valid file already there is kept.
Benchmarks only: never commit it; tests use the tiny models.

    python benchmarks/phi3_shape.py [--out PATH] [--mix q4_k_m|q4_k] [--force]
    python benchmarks/phi3_shape.py --measure [--threads 2] [--prompt-tokens 500]
        [--decode-tokens 64] [--rounds 3] [--kv-type f16|q8_0] [--flash-attn on|off]

--measure: raw llama-cpp-python (low-level API, n_ctx 4096, flash attention on unless
--flash-attn off): load time with the file dropped from the page cache and warm, prefill
tokens/s on a --prompt-tokens prompt, decode tokens/s after it, llama.cpp state bytes per token,
and llama_state_seq_save_file / load_file times, with the CPU other processes used meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VOCAB = ROOT / ".cache" / "ggml-vocab-phi-3.gguf"
LAYOUT_KEY = "phichat.bench.layout"
LAYOUT_VERSION = 1

# Phi-3-mini-4k-instruct; checked against the hyperparameters in the vocab file.
N_EMBD, N_FF, N_LAYER, N_HEAD, N_VOCAB, N_CTX_TRAIN = 3072, 8192, 32, 32, 32064, 4096
HPARAMS = {
    "phi3.embedding_length": N_EMBD,
    "phi3.feed_forward_length": N_FF,
    "phi3.block_count": N_LAYER,
    "phi3.attention.head_count": N_HEAD,
    "phi3.attention.head_count_kv": N_HEAD,
    "phi3.context_length": N_CTX_TRAIN,
}
MIXES = ("q4_k_m", "q4_k")
QK_K = 256  # weights per K-quant super-block
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
# A prompt for --measure: ordinary prose, repeated until it is long enough.
PROSE = (
    "The harbour town wakes before the sun. Fishing boats slip their moorings one by one, their "
    "engines coughing in the cold air, while the baker on the corner pulls the first trays of "
    "bread from an oven older than anyone can remember. By seven the market square fills with "
    "crates of mackerel, baskets of apples from the hill farms and a man who sells nothing but "
    "rope. Tourists arrive on the nine o'clock ferry, blinking at the gulls, and ask the same "
    "questions every summer: where the lighthouse path begins, whether the castle is open, and "
    "why the church bell rings eleven times at noon. "
)


def default_path(mix: str) -> Path:
    """${XDG_CACHE_HOME:-~/.cache}/phichat-bench/phi3-mini-shape-<mix>.gguf."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "phichat-bench" / f"phi3-mini-shape-{mix}.gguf"


def _more_bits(layer: int) -> bool:
    """llama.cpp's use_more_bits(): which layers' ffn_down Q4_K_M keeps in Q6_K."""
    eighth = N_LAYER // 8
    return layer < eighth or layer >= 7 * eighth or (layer - eighth) % 3 == 2


def tensors(mix: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape (rows, columns), ggml type) of every tensor, in file order."""
    m = mix == "q4_k_m"
    out: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (N_VOCAB, N_EMBD), "Q4_K")]
    for i in range(N_LAYER):
        out += [
            (f"blk.{i}.attn_norm.weight", (N_EMBD,), "F32"),
            (f"blk.{i}.attn_qkv.weight", (3 * N_EMBD, N_EMBD), "Q5_K" if m else "Q4_K"),
            (f"blk.{i}.attn_output.weight", (N_EMBD, N_EMBD), "Q4_K"),
            (f"blk.{i}.ffn_norm.weight", (N_EMBD,), "F32"),
            (f"blk.{i}.ffn_up.weight", (2 * N_FF, N_EMBD), "Q4_K"),
            (f"blk.{i}.ffn_down.weight", (N_EMBD, N_FF), "Q6_K" if m and _more_bits(i) else "Q4_K"),
        ]
    out += [("output_norm.weight", (N_EMBD,), "F32"), ("output.weight", (N_VOCAB, N_EMBD), "Q6_K")]
    return out


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    if kind == "F32":
        return 4 * shape[0]
    rows, columns = shape
    return rows * columns // QK_K * BLOCK_BYTES[kind]


def random_blocks(rng: Any, kind: str, n_blocks: int) -> Any:
    """n_blocks random K-quant super-blocks (uint8 [n, block bytes]) whose weights have a
    standard deviation near 0.03, like a trained model's, so activations stay finite.

    Q4_K/Q5_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, then the quants; a weight is
    d * scale * q - dmin * min. Q6_K: quants, 16 int8 scales, f16 d last; d * scale * (q - 32).
    """
    import numpy as np

    size = BLOCK_BYTES[kind]
    words = rng.integers(0, 2**64, (n_blocks * size + 7) // 8, dtype=np.uint64)
    blocks = words.view(np.uint8)[: n_blocks * size].reshape(n_blocks, size)
    jitter = rng.uniform(0.5, 1.5, n_blocks)
    if kind == "Q6_K":
        blocks[:, 192:208] = rng.integers(-16, 17, (n_blocks, 16), dtype=np.int8).view(np.uint8)
        blocks[:, 208:210] = (1.2e-4 * jitter).astype(np.float16).view(np.uint8).reshape(-1, 2)
        return blocks
    d, mean_q = (1.5e-4, 7.5) if kind == "Q4_K" else (0.75e-4, 15.5)
    blocks[:, 0:2] = (d * jitter).astype(np.float16).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:4] = (d * mean_q * jitter).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks


def _vocab_fields(vocab: Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, type, array item type) of the vocab file's metadata that the model keeps:
    tokenizer, chat template and the phi3.* hyperparameters (checked against Phi-3-mini's)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(vocab))
    fields = [
        (key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
        for key, field in reader.fields.items()
        if key.startswith(("tokenizer.", "phi3."))
    ]
    found = {key: value for key, value, *_ in fields}
    wrong = {k: found.get(k) for k, v in HPARAMS.items() if found.get(k) != v}
    if wrong or len(found["tokenizer.ggml.tokens"]) != N_VOCAB:
        sys.exit(f"{vocab}: not Phi-3-mini's vocab file ({wrong or 'vocab size'})")
    return fields


def layout(mix: str) -> str:
    """The marker a valid file of this script carries."""
    return f"phi3-mini-shape/{LAYOUT_VERSION}/{mix}"


def is_valid(path: Path, mix: str) -> bool:
    """Whether `path` is a complete file written by this script for `mix`."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError):
        return False
    marker = reader.fields.get(LAYOUT_KEY)
    expected = tensors(mix)
    if marker is None or marker.contents() != layout(mix) or len(reader.tensors) != len(expected):
        return False
    last = reader.tensors[-1]
    return last.data_offset + int(last.n_bytes) <= path.stat().st_size


def build(path: Path, mix: str, vocab: Path = VOCAB, seed: int = 3) -> Path:
    """Write the model to `path` (through a temporary name in the same folder)."""
    import gguf
    import numpy as np

    fields = _vocab_fields(vocab)
    layout_tensors = tensors(mix)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(str(partial), "phi3")
    writer.add_name(f"phi3-mini-shape-{mix} (random weights, phichat benchmarks)")
    file_type = (
        gguf.LlamaFileType.MOSTLY_Q4_K_M if mix == "q4_k_m" else gguf.LlamaFileType.MOSTLY_Q4_K_S
    )
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(LAYOUT_KEY, layout(mix))
    for key, value, vtype, sub_type in fields:
        writer.add_key_value(key, value, vtype, sub_type)
    for name, shape, kind in layout_tensors:
        if kind == "F32":
            writer.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, kind))
        else:
            raw = gguf.GGMLQuantizationType[kind]
            byte_shape = (shape[0], shape[1] // QK_K * BLOCK_BYTES[kind])
            writer.add_tensor_info(
                name, byte_shape, np.dtype(np.uint8), _nbytes(shape, kind), raw_dtype=raw
            )
    rng = np.random.default_rng(seed)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _name, shape, kind in layout_tensors:
            if kind == "F32":
                writer.write_tensor_data(np.ones(shape, dtype=np.float32))
            else:
                n_blocks = shape[0] * shape[1] // QK_K
                writer.write_tensor_data(random_blocks(rng, kind, n_blocks))
        writer.close()
        os.replace(partial, path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return path


def ensure(path: Path | None = None, mix: str = "q4_k_m", force: bool = False) -> Path:
    """The model at `path` (default: the cache folder), written and checked unless valid."""
    path = path or default_path(mix)
    if not force and is_valid(path, mix):
        return path
    if path.exists() and not force:
        sys.exit(f"{path} exists and is not a {layout(mix)} file: remove it, or pass --force")
    if not VOCAB.is_file():
        sys.exit(f"{VOCAB} is missing: copy ggml-vocab-phi-3.gguf there (see tests/tiny_phi3.py)")
    started = time.perf_counter()
    build(path, mix)
    took = time.perf_counter() - started
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {took:.0f} s", file=sys.stderr)
    text = check(path)
    print(f"greedy decode runs, logits finite; it says: {text!r}", file=sys.stderr)
    return path


# --- raw llama.cpp ------------------------------------------------------------------------------


@dataclass
class Raw:
    """A model and one context through llama-cpp-python's low-level API (nothing of phichat)."""

    model: Any
    ctx: Any
    sampler: Any

    @property
    def vocab(self) -> Any:
        import llama_cpp

        return llama_cpp.llama_model_get_vocab(self.model)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        import llama_cpp

        data = text.encode("utf-8")
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buffer, len(buffer), add_bos, True
        )
        return list(buffer[:n])

    def clear(self) -> None:
        """Empty the KV cache."""
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[int], batch: int = 512) -> None:
        """Evaluate `tokens` after what is in the cache, `batch` at a time."""
        import llama_cpp

        for start in range(0, len(tokens), batch):
            part = tokens[start : start + batch]
            array = (llama_cpp.llama_token * len(part))(*part)
            if llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(part))):
                raise RuntimeError("llama_decode failed")

    def logits(self) -> Any:
        """The last evaluated position's logits (numpy float32 view)."""
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(N_VOCAB,))

    def greedy(self, n_tokens: int) -> tuple[list[int], float]:
        """Decode n_tokens greedily after the evaluated prompt: (tokens, seconds after the
        first, which is sampled from the prompt's logits)."""
        import llama_cpp

        token = llama_cpp.llama_sampler_sample(self.sampler, self.ctx, -1)
        out = [token]
        started = time.perf_counter()
        for _ in range(n_tokens - 1):
            self.decode([token])
            token = llama_cpp.llama_sampler_sample(self.sampler, self.ctx, -1)
            out.append(token)
        return out, time.perf_counter() - started

    def text(self, tokens: list[int]) -> str:
        import llama_cpp

        out = b""
        buffer = ctypes.create_string_buffer(64)
        for token in tokens:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            out += buffer.raw[: max(n, 0)]
        return out.decode("utf-8", "replace")


def context_params(threads: int, kv_type: str = "f16", flash_attn: bool = True) -> Any:
    """phichat's cpu config as llama.cpp context params: n_ctx 4096, batch 512, flash
    attention on (unless `flash_attn` is False)."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = N_CTX_TRAIN, 512, 512
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    kv = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv_type]
    params.type_k = params.type_v = kv
    return params


@contextlib.contextmanager
def raw_context(
    model: Any, threads: int, kv_type: str = "f16", flash_attn: bool = True
) -> Iterator[Raw]:
    """A context with a greedy sampler on an already loaded llama_model."""
    import llama_cpp

    ctx = llama_cpp.llama_init_from_model(model, context_params(threads, kv_type, flash_attn))
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    try:
        yield Raw(model, ctx, sampler)
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_free(ctx)


@contextlib.contextmanager
def raw_model(path: Path) -> Iterator[Any]:
    """llama_model_load_from_file with default params (mmap), llama.cpp's log silenced."""
    import llama_cpp

    quiet()
    model = llama_cpp.llama_model_load_from_file(
        str(path).encode(), llama_cpp.llama_model_default_params()
    )
    if not model:
        raise RuntimeError(f"{path}: llama.cpp could not load it")
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


_QUIET: list[Any] = []
GGML_LOG_LEVEL_ERROR = 4  # ggml.h: none, debug, info, warn, error, cont


def quiet() -> None:
    """Keep llama.cpp's log off the terminal (errors still shown)."""
    import llama_cpp

    if _QUIET:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user: Any) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _QUIET.append(callback)
    llama_cpp.llama_log_set(callback, None)


def check(path: Path, threads: int = 2, n_tokens: int = 12) -> str:
    """Greedy-decode a few tokens, every step's logits finite (exit otherwise); the text."""
    import numpy as np

    with raw_model(path) as model, raw_context(model, threads) as raw:
        raw.decode(raw.tokenize("<|user|>\nWhat is a lighthouse?<|end|>\n<|assistant|>\n"))
        out = []
        for _ in range(n_tokens):
            if not np.isfinite(raw.logits()).all():
                sys.exit(f"{path}: NaN or inf logits: the weights' scales are too large")
            out += raw.greedy(1)[0]
            raw.decode(out[-1:])
        return raw.text(out)


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine has used, those of this process and its
    waited-for children); zeros where /proc/stat is missing."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(
                int, stat.readline().split()[1:9]
            )
    except OSError:
        return 0.0, 0.0
    busy = user + nice + system + irq + softirq + steal  # steal: the host ran something else
    return busy / os.sysconf("SC_CLK_TCK"), sum(os.times()[:4])


class Others:
    """How many CPU cores other processes kept busy while the block ran. The machine is shared:
    on 2 cores, anything else running stalls llama.cpp's two threads, so a figure measured with
    others above ~0.2 is suspect."""

    cores = 0.0

    def __enter__(self) -> Others:
        self._start, self._wall = _cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        (busy, own), (busy0, own0) = _cpu_seconds(), self._start
        wall = time.perf_counter() - self._wall
        self.cores = max(0.0, (busy - busy0) - (own - own0)) / wall if wall > 0 else 0.0


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (no root needed; written back first,
    as dirty pages would stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_load(path: Path, threads: int, cold: bool) -> float:
    """Seconds to load the model and make a context (the file dropped from the page cache
    first when `cold`), including the first one-token decode that touches every weight."""
    if cold:
        drop_from_page_cache(path)
    started = time.perf_counter()
    with raw_model(path) as model, raw_context(model, threads) as raw:
        raw.decode(raw.tokenize("Hello"))
        return time.perf_counter() - started


def measure(path: Path, args: argparse.Namespace) -> None:
    """Print load, prefill, decode and state figures of raw llama.cpp on `path`."""
    import llama_cpp

    threads, kv_type, rounds = args.threads, args.kv_type, args.rounds
    prompt_tokens, decode_tokens = args.prompt_tokens, args.decode_tokens
    cold = timed_load(path, threads, cold=True)
    warm = timed_load(path, threads, cold=False)
    prefill: list[float] = []
    decode: list[float] = []
    others: list[tuple[float, float]] = []
    flash_attn = args.flash_attn == "on"
    with raw_model(path) as model, raw_context(model, threads, kv_type, flash_attn) as raw:
        prompt = raw.tokenize(PROSE * (prompt_tokens // 100 + 2))[:prompt_tokens]
        for _ in range(rounds):
            raw.clear()
            with Others() as reading:
                started = time.perf_counter()
                raw.decode(prompt)
                prefill.append(len(prompt) / (time.perf_counter() - started))
            with Others() as decoding:
                _, seconds = raw.greedy(decode_tokens)
            decode.append((decode_tokens - 1) / seconds)
            others.append((reading.cores, decoding.cores))
        n_tokens = len(prompt) + decode_tokens - 1
        state = llama_cpp.llama_state_get_size(raw.ctx)
        seq_state = llama_cpp.llama_state_seq_get_size(raw.ctx, 0)
        tokens = (llama_cpp.llama_token * n_tokens)(*prompt, *([0] * (n_tokens - len(prompt))))
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            file = str(Path(scratch) / "seq0.state").encode()
            started = time.perf_counter()
            written = llama_cpp.llama_state_seq_save_file(raw.ctx, file, 0, tokens, n_tokens)
            save_s = time.perf_counter() - started
            raw.clear()
            count = ctypes.c_size_t()
            out = (llama_cpp.llama_token * n_tokens)()
            started = time.perf_counter()
            read = llama_cpp.llama_state_seq_load_file(
                raw.ctx, file, 0, out, n_tokens, ctypes.byref(count)
            )
            load_s = time.perf_counter() - started
        if not written or not read or count.value != n_tokens:
            sys.exit("llama_state_seq_save_file / load_file failed")
    size = path.stat().st_size
    print(
        f"model: {path.name} ({size / 1e9:.2f} GB), raw llama-cpp-python, threads {threads}, "
        f"flash attention {args.flash_attn}, n_ctx {N_CTX_TRAIN}, KV {kv_type}, "
        f"rounds {rounds} (medians)"
    )
    print(f"load + first token, file dropped from page cache: {cold:.1f} s; warm: {warm:.1f} s")
    for number, (p, d, (op, od)) in enumerate(zip(prefill, decode, others, strict=True), 1):
        print(
            f"round {number}: prefill {p:.1f} tokens/s, decode {d:.2f} tokens/s; other processes "
            f"used {op:.2f} and {od:.2f} cores meanwhile (above ~0.2: suspect)"
        )
    pf = statistics.median(prefill)
    print(f"prefill ({len(prompt)} tokens): {pf:.1f} tokens/s ({1000 / pf:.0f} ms a token)")
    print(f"decode ({decode_tokens} tokens after it): {statistics.median(decode):.2f} tokens/s")
    print(
        f"state at {n_tokens} tokens: llama_state_get_size {state / 1e6:.0f} MB "
        f"({state / n_tokens / 1e6:.3f} MB a token), seq 0 {seq_state / 1e6:.0f} MB "
        f"({seq_state / n_tokens / 1e6:.3f} MB a token)"
    )
    print(
        f"llama_state_seq_save_file {written / 1e6:.0f} MB: {save_s:.2f} s; "
        f"llama_state_seq_load_file: {load_s:.2f} s (page cache warm)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the GGUF")
    parser.add_argument("--mix", choices=MIXES, default="q4_k_m", help="weight types (see above)")
    parser.add_argument("--force", action="store_true", help="write it again even if valid")
    parser.add_argument("--measure", action="store_true", help="measure it with raw llama.cpp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-type", choices=["f16", "q8_0"], default="f16")
    parser.add_argument("--flash-attn", choices=["on", "off"], default="on")
    args = parser.parse_args()
    path = ensure(args.out, args.mix, args.force)
    print(path)
    if args.measure:
        measure(path, args)


if __name__ == "__main__":
    main()
