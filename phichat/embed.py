"""all-MiniLM-L6-v2 in numpy + tokenizers: texts -> float32 [n, 384] unit rows.

Gives the vectors sentence-transformers gives (Transformer -> mean Pooling -> Normalize) with no
torch: the tokenizer is set up as sentence-transformers sets it up (truncation at
max_seq_length, padding per batch only) and the BERT forward pass runs in float32 numpy.

Speed: texts are sorted by token count and cut into batches of similar length, so little work
goes into padding. Matrix products run on BLAS; the rest (GELU, softmax, LayerNorm) goes through
the data in cache-sized chunks with few temporaries. Several batches run at once on a pool of
threads, each with single-threaded BLAS (single_threaded_blas); one batch runs on all of BLAS.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phichat.config import EmbedderSettings, expand_path, usable_cores
from phichat.errors import PhichatError

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Encoding, Tokenizer

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_FILES = ("config.json", "sentence_bert_config.json", "tokenizer.json", "model.safetensors")
BATCH_SIZE = 32  # most texts in one batch
BATCH_TOKENS = 1024  # most tokens (padding included) in one batch, unless one text is longer
CHUNK = 131072  # elements per elementwise step: big enough to amortise numpy's per-call cost
ATTENTION_CHUNK = 65536  # attention scores per step
BLAS_SMALL = 262144  # m * n * k up to which OpenBLAS runs a product on the calling thread
EXP_SAFE = 80.0  # scores within +-EXP_SAFE can go through exp() unshifted: no overflow, no 0

# GELU(x) = max(x, 0) - |x| * Phi(-|x|), with Phi(-a) = exp(-a^2 / 2) * P(a) / Q(a): a rational
# fit (coefficients ascending; Q monic, its leading 1 left out) of Phi(-a) * exp(a^2 / 2) on
# [0, GELU_CLAMP], within 3.5e-9 of Phi(-a). Evaluated in float32: erf within 2.7e-7, GELU within
# float32 rounding (2.4e-7 absolute). Past the clamp Phi(-a) < 1e-22, so clamping changes nothing
# a float32 holds, and it keeps exp() out of subnormals.
GELU_CLAMP = 10.0
GELU_P = (16.515821886604183, 10.60557240361625, 3.21332280259699, 0.39856601007513626)
GELU_Q = (33.03164400671476, 47.566564968011264, 27.86369015874413, 8.029820979937687)


def gelu(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """Exact (erf) GELU of a float32 array, in place; scratch: 3 arrays shaped like x."""
    import numpy as np

    f32 = np.float32
    a, h, q = np.empty((3, *x.shape), dtype=np.float32) if scratch is None else scratch
    np.abs(x, out=a)
    x += a
    x *= f32(0.5)  # max(x, 0)
    np.minimum(a, f32(GELU_CLAMP), out=a)
    np.multiply(a, f32(-0.5), out=h)
    h *= a
    np.exp(h, out=h)
    h *= a  # |x| * exp(-x^2 / 2)
    np.multiply(a, f32(GELU_P[-1]), out=q)
    for c in GELU_P[-2:0:-1]:
        q += f32(c)
        q *= a
    q += f32(GELU_P[0])
    q *= h
    np.add(a, f32(GELU_Q[-1]), out=h)
    for c in GELU_Q[-2::-1]:
        h *= a
        h += f32(c)
    q /= h
    x -= q
    return x


def layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis of a 2-D float32 array, in place."""
    import numpy as np

    width = x.shape[1]
    x -= np.dot(x, np.full(width, 1 / width, dtype=np.float32))[:, None]  # row means (gemv)
    var = np.einsum("ij,ij->i", x, x)[:, None]
    var *= np.float32(1 / width)
    var += np.float32(eps)
    np.sqrt(var, out=var)
    x /= var
    x *= gain
    x += bias
    return x


def softmax_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, keep: np.ndarray | None, out: np.ndarray
) -> None:
    """out = softmax(q @ k) @ v over the last two axes; keep: 1 for real keys, 0 for padding.

    Softmax is shift-invariant, so the usual subtraction of each row's max is only needed when
    a score is big enough for exp() to overflow or underflow; the division by the row sums is
    done on the (narrower) output.
    """
    import numpy as np

    scores = np.matmul(q, k)
    if scores.max() > EXP_SAFE or scores.min() < -EXP_SAFE:
        if keep is not None:
            scores = np.where(keep > 0, scores, np.float32(-np.inf))
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
    else:
        np.exp(scores, out=scores)
        if keep is not None:
            scores *= keep
    sums = scores.sum(axis=-1, keepdims=True)
    np.matmul(scores, v, out=out)
    out /= sums


@dataclass(frozen=True)
class Layer:
    """One encoder layer's weights, laid out for x @ W (pre-transposed, contiguous)."""

    qkv: np.ndarray  # [H, 3H]: Wq (scaled by 1/sqrt(head_dim)) | Wk | Wv
    qkv_bias: np.ndarray
    out: np.ndarray  # [H, H]
    out_bias: np.ndarray
    norm1: tuple[np.ndarray, np.ndarray]
    up: np.ndarray  # [H, I]
    up_bias: np.ndarray
    down: np.ndarray  # [I, H]
    down_bias: np.ndarray
    norm2: tuple[np.ndarray, np.ndarray]


class Embedder:
    """Sentence vectors from all-MiniLM-L6-v2, as sentence-transformers computes them."""

    def __init__(self, model_dir: Path, threads: int = 0) -> None:
        """Load a model directory holding MODEL_FILES (from_dir checks that they are there).

        threads: how many batches to embed at once (0: one per usable core).
        """
        config = _read_json(model_dir / "config.json")
        max_seq_length = int(_read_json(model_dir / "sentence_bert_config.json")["max_seq_length"])
        if config.get("hidden_act") != "gelu" or config.get("model_type") != "bert":
            raise PhichatError(f"{model_dir}: config.json is not a BERT model with GELU")
        self.dim: int = config["hidden_size"]
        self.heads: int = config["num_attention_heads"]
        self.eps: float = config["layer_norm_eps"]
        self.max_seq_length = min(max_seq_length, config["max_position_embeddings"])
        self.tokenizer = _load_tokenizer(model_dir / "tokenizer.json", self.max_seq_length)
        self._load_weights(model_dir / "model.safetensors", config["num_hidden_layers"])
        self.model_id: str = _model_id(model_dir)
        from concurrent.futures import ThreadPoolExecutor

        self.threads = threads if threads > 0 else usable_cores()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="phichat-embed")

    @classmethod
    def from_dir(cls, path: str | Path, threads: int = 0) -> Embedder:
        """Load a local model directory (config.json, tokenizer.json, model.safetensors, ...)."""
        model_dir = expand_path(str(path))
        if not model_dir.is_dir():
            raise PhichatError(f"embedder directory {model_dir} does not exist")
        for name in MODEL_FILES:
            if not (model_dir / name).is_file():
                raise PhichatError(f"embedder directory {model_dir} has no {name}")
        return cls(model_dir, threads)

    @classmethod
    def load(cls, settings: EmbedderSettings, tqdm_class: Any = None, threads: int = 0) -> Embedder:
        """The configured local directory, or the pinned Hub snapshot (cached, offline after)."""
        if settings.path:
            return cls.from_dir(settings.path, threads)
        from phichat.hub import resolve_snapshot

        snapshot = resolve_snapshot(
            settings.repo, settings.revision, list(MODEL_FILES), tqdm_class=tqdm_class
        )
        return cls.from_dir(snapshot, threads)

    def _load_weights(self, path: Path, n_layers: int) -> None:
        import numpy as np
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file: one clear line
            raise PhichatError(f"{path}: cannot read weights: {exc}") from None

        def get(name: str) -> np.ndarray:
            if name not in tensors:
                raise PhichatError(f"{path}: no tensor {name}")
            return np.ascontiguousarray(tensors[name], dtype=np.float32)

        def linear(name: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
            return get(f"{name}.weight").T * np.float32(scale), get(f"{name}.bias") * scale

        def norm(name: str) -> tuple[np.ndarray, np.ndarray]:
            return get(f"{name}.weight"), get(f"{name}.bias")

        self.word = get("embeddings.word_embeddings.weight")
        self.position = get("embeddings.position_embeddings.weight")[: self.max_seq_length]
        self.position += get("embeddings.token_type_embeddings.weight")[0]  # all type ids are 0
        self.norm0 = norm("embeddings.LayerNorm")
        self.layers: list[Layer] = []
        for i in range(n_layers):
            prefix = f"encoder.layer.{i}"
            q = linear(f"{prefix}.attention.self.query", (self.dim // self.heads) ** -0.5)
            k = linear(f"{prefix}.attention.self.key")
            v = linear(f"{prefix}.attention.self.value")
            out, out_bias = linear(f"{prefix}.attention.output.dense")
            up, up_bias = linear(f"{prefix}.intermediate.dense")
            down, down_bias = linear(f"{prefix}.output.dense")
            self.layers.append(
                Layer(
                    qkv=np.ascontiguousarray(np.concatenate([q[0], k[0], v[0]], axis=1)),
                    qkv_bias=np.concatenate([q[1], k[1], v[1]]),
                    out=np.ascontiguousarray(out),
                    out_bias=out_bias,
                    norm1=norm(f"{prefix}.attention.output.LayerNorm"),
                    up=np.ascontiguousarray(up),
                    up_bias=up_bias,
                    down=np.ascontiguousarray(down),
                    down_bias=down_bias,
                    norm2=norm(f"{prefix}.output.LayerNorm"),
                )
            )

    def encode(self, texts: list[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Unit-length float32 vectors [len(texts), dim], one row per text, in input order."""
        import numpy as np

        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a str")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return vectors
        ids = [encoding.ids for encoding in self._tokenize(texts)]

        def embed(batch: list[int]) -> None:
            vectors[batch] = self._embed([ids[i] for i in batch])

        batches = _batches([len(row) for row in ids], batch_size)
        if len(batches) > 1 and self.threads > 1:
            with single_threaded_blas() as found:
                if found:  # batches side by side, each on one thread
                    list(self._pool.map(embed, batches))
                    return vectors
        for batch in batches:  # one after another, each on all of BLAS's threads
            embed(batch)
        return vectors

    def _tokenize(self, texts: list[str]) -> list[Encoding]:
        try:
            return self._encode_texts(texts)
        except Exception:  # noqa: BLE001 - lone surrogates (not UTF-8 encodable): replace them
            return self._encode_texts([t.encode("utf-8", "replace").decode("utf-8") for t in texts])

    def _encode_texts(self, texts: list[str]) -> list[Encoding]:
        """Token encodings; one text skips encode_batch's thread pool (a wake-up costs more)."""
        if len(texts) == 1:
            return [self.tokenizer.encode(texts[0])]
        return self.tokenizer.encode_batch(texts)

    def _embed(self, batch: list[list[int]]) -> np.ndarray:
        """Unit vectors for one batch of token id lists, padded to the longest."""
        import numpy as np

        n, width = len(batch), max(len(ids) for ids in batch)
        ids = np.zeros((n, width), dtype=np.int64)
        lengths = np.array([len(row) for row in batch])
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
        hidden = self._forward(ids, lengths).reshape(n, width, self.dim)
        if lengths.min() < width:
            mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
            pooled = np.matmul(mask[:, None, :], hidden)[:, 0]
        else:
            pooled = hidden.sum(axis=1)
        pooled /= np.maximum(lengths, 1e-9).astype(np.float32)[:, None]
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
        return pooled

    def _forward(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Last hidden states [n * width, dim] for token ids [n, width] (right-padded)."""
        import numpy as np

        n, width = ids.shape
        x = self.word[ids.ravel()]
        x.reshape(n, width, self.dim)[:] += self.position[:width]
        layer_norm(x, *self.norm0, self.eps)
        context = np.zeros((n, width, self.dim), dtype=np.float32)
        inner = self.layers[0].up.shape[1]
        step = CHUNK // inner  # rows of the FFN's inner layer per GELU step
        scratch = np.empty((3, min(step, n * width), inner), dtype=np.float32)
        for layer in self.layers:
            qkv = np.matmul(x, layer.qkv)
            qkv += layer.qkv_bias
            self._attend(qkv, lengths, context)
            attended = np.matmul(context.reshape(n * width, self.dim), layer.out)
            _add_norm(attended, layer.out_bias, x, layer.norm1, self.eps)
            hidden = np.matmul(attended, layer.up)
            for first in range(0, n * width, step):
                part = hidden[first : first + step]
                part += layer.up_bias
                gelu(part, scratch[:, : len(part)])
            x = np.matmul(hidden, layer.down)
            _add_norm(x, layer.down_bias, attended, layer.norm2, self.eps)
        return x

    def _attend(self, qkv: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
        """Multi-head self-attention: qkv [n * width, 3 * dim] -> out [n, width, dim].

        Short sequences go a few at a time (padding keys masked); a long one goes alone, cut to
        its length, a block of queries at a time. Each step stays in cache and its products
        small enough for OpenBLAS to run them on this thread (its threads cost more than they
        save on products this small). Rows of padding in out are left as they are.
        """
        import numpy as np

        n, width = out.shape[:2]
        heads = self.heads
        split = qkv.reshape(n, width, 3, heads, -1)
        q = split[:, :, 0].transpose(0, 2, 1, 3)  # [n, heads, width, head_dim]
        k = split[:, :, 1].transpose(0, 2, 3, 1)  # [n, heads, head_dim, width]
        v = split[:, :, 2].transpose(0, 2, 1, 3)
        context = out.reshape(n, width, heads, -1).transpose(0, 2, 1, 3)
        group = ATTENTION_CHUNK // (heads * width * width)
        if group > 1:
            keep = None
            if lengths.min() < width:
                keep = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
            for i in range(0, n, group):
                seqs = slice(i, i + group)
                mask = None if keep is None else keep[seqs, None, None, :]
                softmax_attention(q[seqs], k[seqs], v[seqs], mask, context[seqs])
            return
        block = max(1, BLAS_SMALL // (width * q.shape[-1]))
        for i, length in enumerate(lengths.tolist()):
            for first in range(0, length, block):
                rows = slice(first, min(first + block, length))
                softmax_attention(
                    q[i, :, rows], k[i, :, :, :length], v[i, :, :length], None, context[i, :, rows]
                )


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[bool]:
    """While inside, numpy's BLAS runs each product on the calling thread (process-wide).

    For batches embedded on several threads at once: BLAS's own threads would fight them for
    the cores (and spin for a while after each product). Nested and concurrent users share one
    limit, lifted when the last leaves. Yields False, changing nothing, where threadpoolctl
    finds no BLAS it can limit.
    """
    with _blas["lock"]:
        if "controller" not in _blas:
            from threadpoolctl import ThreadpoolController

            _blas["controller"] = ThreadpoolController().select(user_api="blas")
        controller = _blas["controller"]
        found = bool(controller.lib_controllers)
        if found:
            if _blas["users"] == 0:
                _blas["limit"] = controller.limit(limits=1)
            _blas["users"] += 1
    try:
        yield found
    finally:
        if found:
            with _blas["lock"]:
                _blas["users"] -= 1
                if _blas["users"] == 0:
                    _blas.pop("limit").restore_original_limits()


_blas: dict[str, Any] = {"lock": threading.Lock(), "users": 0}


def _add_norm(
    x: np.ndarray, bias: np.ndarray, residual: np.ndarray, norm: tuple[Any, Any], eps: float
) -> None:
    """x = LayerNorm(x + bias + residual), in place, a chunk of rows at a time."""
    step = CHUNK // x.shape[1]
    for first in range(0, x.shape[0], step):
        part = x[first : first + step]
        part += bias
        part += residual[first : first + step]
        layer_norm(part, *norm, eps)


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (BATCH_TOKENS, batch_size)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size:
            width = lengths[batches[-1][0]]
            if (len(batches[-1]) + 1) * width <= max(BATCH_TOKENS, width):
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PhichatError(f"{path}: cannot read: {exc}") from None


def _load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    """tokenizer.json with sentence-transformers' settings: truncate at max_length, no padding."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a malformed tokenizer.json: one clear line
        raise PhichatError(f"{path}: cannot load tokenizer: {exc}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def _model_id(model_dir: Path) -> str:
    """all-MiniLM-L6-v2@<12 hex>: a hash of the configs, tokenizer and safetensors header."""
    digest = hashlib.sha256()
    for name in MODEL_FILES[:-1]:
        digest.update((model_dir / name).read_bytes())
    with (model_dir / "model.safetensors").open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        digest.update(f.read(size))
    return f"{MODEL_NAME}@{digest.hexdigest()[:12]}"
