"""all-MiniLM-L6-v2 in numpy + tokenizers: texts -> float32 [n, 384] unit rows.

Gives the vectors sentence-transformers gives (Transformer -> mean Pooling -> Normalize) with no
torch: the tokenizer is set up as sentence-transformers sets it up (truncation at
max_seq_length, padding per batch only) and the BERT forward pass runs in float32 numpy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phichat.config import EmbedderSettings
from phichat.errors import PhichatError

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Encoding, Tokenizer

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_FILES = ("config.json", "sentence_bert_config.json", "tokenizer.json", "model.safetensors")
BATCH_SIZE = 32
MASKED = -1e9  # added to attention scores of padding keys: exp() makes them exactly 0

# GELU(x) = max(x, 0) - |x| * h(|x|), h(a) = Phi(-a) = exp(-a^2 / 2) * P(a) / Q(a).
# P/Q is a rational fit of Phi(-a) * exp(a^2 / 2) on [0, GELU_CLAMP], relative error < 7e-8;
# evaluated in float32 it gives erf to within 2.2e-7 (torch's own float32 erf: 5.5e-7). Past
# the clamp h is below 1e-23, so clamping |x| changes nothing a float32 can hold.
GELU_CLAMP = 10.0
GELU_P = (
    0.49999999892580377,
    0.3007218674367258,
    0.08823730940714232,
    0.010295130370120953,
    1.4027928525121164e-06,
)
GELU_Q = (1.0, 1.399328109399806, 0.7929795236081336, 0.21957967228891873, 0.025919803188259503)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU of a float32 array, in place: x * Phi(x)."""
    import numpy as np

    f32 = np.float32
    a = np.abs(x)
    np.minimum(a, f32(GELU_CLAMP), out=a)
    h = np.multiply(a, f32(-0.5))
    h *= a
    np.exp(h, out=h)
    p = np.multiply(a, f32(GELU_P[-1]))
    for c in GELU_P[-2:0:-1]:
        p += f32(c)
        p *= a
    p += f32(GELU_P[0])
    q = np.multiply(a, f32(GELU_Q[-1]))
    for c in GELU_Q[-2:0:-1]:
        q += f32(c)
        q *= a
    q += f32(GELU_Q[0])
    p /= q
    h *= p
    h *= a
    np.maximum(x, f32(0), out=x)
    x -= h
    return x


def layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis of a 2-D float32 array, in place."""
    import numpy as np

    x -= x.mean(axis=1, keepdims=True)
    var = np.einsum("ij,ij->i", x, x)[:, None]
    var *= 1 / x.shape[1]
    var += eps
    np.sqrt(var, out=var)
    x /= var
    x *= gain
    x += bias
    return x


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

    def __init__(self, model_dir: Path) -> None:
        """Load a model directory holding MODEL_FILES (see from_dir for the checked version)."""
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

    @classmethod
    def from_dir(cls, path: str | Path) -> Embedder:
        """Load a local model directory (config.json, tokenizer.json, model.safetensors, ...)."""
        model_dir = Path(path).expanduser()
        if not model_dir.is_dir():
            raise PhichatError(f"embedder directory {model_dir} does not exist")
        for name in MODEL_FILES:
            if not (model_dir / name).is_file():
                raise PhichatError(f"embedder directory {model_dir} has no {name}")
        return cls(model_dir)

    @classmethod
    def load(cls, settings: EmbedderSettings, tqdm_class: Any = None) -> Embedder:
        """The configured local directory, or the pinned Hub snapshot (cached, offline after)."""
        if settings.path:
            return cls.from_dir(settings.path)
        from phichat.hub import resolve_snapshot

        snapshot = resolve_snapshot(
            settings.repo, settings.revision, list(MODEL_FILES), tqdm_class=tqdm_class
        )
        return cls.from_dir(snapshot)

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
        encodings = self._tokenize(texts)
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(texts), batch_size):
            batch = order[start : start + batch_size]
            vectors[batch] = self._embed([encodings[i].ids for i in batch])
        return vectors

    def _tokenize(self, texts: list[str]) -> list[Encoding]:
        if len(texts) == 1:
            try:
                return [self.tokenizer.encode(texts[0])]
            except Exception:  # noqa: BLE001 - lone surrogates: cleaned below
                pass
        else:
            try:
                return self.tokenizer.encode_batch(texts)
            except Exception:  # noqa: BLE001 - lone surrogates: cleaned below
                pass
        clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        return self.tokenizer.encode_batch(clean)

    def _embed(self, batch: list[list[int]]) -> np.ndarray:
        """Unit vectors for one batch of token id lists (sorted by length, shortest first)."""
        import numpy as np

        n, width = len(batch), max(len(ids) for ids in batch)
        ids = np.zeros((n, width), dtype=np.int64)
        lengths = np.array([len(row) for row in batch])
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
        padded = bool((lengths < width).any())
        mask = np.arange(width)[None, :] < lengths[:, None]
        x = self._forward(
            ids, np.where(mask, np.float32(0), np.float32(MASKED)) if padded else None
        )
        hidden = x.reshape(n, width, self.dim)
        if padded:
            pooled = np.matmul(mask.astype(np.float32)[:, None, :], hidden)[:, 0]
        else:
            pooled = hidden.sum(axis=1)
        pooled /= np.maximum(lengths, 1e-9).astype(np.float32)[:, None]
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
        return pooled

    def _forward(self, ids: np.ndarray, key_mask: np.ndarray | None) -> np.ndarray:
        """Last hidden states [n * width, dim] for token ids [n, width]."""
        import numpy as np

        n, width = ids.shape
        heads, head_dim = self.heads, self.dim // self.heads
        x = self.word[ids.ravel()]
        x.reshape(n, width, self.dim)[:] += self.position[:width]
        layer_norm(x, *self.norm0, self.eps)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        context = np.empty((n, width, heads, head_dim), dtype=np.float32)
        for layer in self.layers:
            qkv = np.matmul(x, layer.qkv)
            qkv += layer.qkv_bias
            qkv5 = qkv.reshape(n, width, 3, heads, head_dim)
            scores = np.matmul(
                qkv5[:, :, 0].transpose(0, 2, 1, 3), qkv5[:, :, 1].transpose(0, 2, 3, 1)
            )
            if mask is not None:
                scores += mask
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            np.matmul(
                scores, qkv5[:, :, 2].transpose(0, 2, 1, 3), out=context.transpose(0, 2, 1, 3)
            )
            attended = np.matmul(context.reshape(n * width, self.dim), layer.out)
            attended += layer.out_bias
            attended += x
            x = layer_norm(attended, *layer.norm1, self.eps)
            hidden = np.matmul(x, layer.up)
            hidden += layer.up_bias
            gelu(hidden)
            out = np.matmul(hidden, layer.down)
            out += layer.down_bias
            out += x
            x = layer_norm(out, *layer.norm2, self.eps)
        return x


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
