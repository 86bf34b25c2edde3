"""The numpy embedder gives sentence-transformers' vectors, for any text, in any batching."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from phichat import embed
from phichat.config import EmbedderSettings
from phichat.embed import Embedder
from phichat.errors import PhichatError

REFERENCE = ROOT / "tests" / "data" / "minilm"
# Words that are one wordpiece each, so a text of n of them is n + 2 tokens long.
ONE_PIECE = ("alpha", "river", "stone", "cloud", "green", "table", "music", "light")


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path) -> Embedder:
    """The default embedder, loaded through the real hub code from the offline HF cache."""
    return Embedder.load(EmbedderSettings())


def unit_rows(vectors: np.ndarray) -> bool:
    return bool(np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1))


@pytest.mark.slow
def test_reproduces_sentence_transformers(embedder: Embedder) -> None:
    sentences = json.loads((REFERENCE / "sentences.json").read_text(encoding="utf-8"))
    expected = np.load(REFERENCE / "embeddings.npy")
    vectors = embedder.encode(sentences)
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape == (32, 384)
    assert np.abs(vectors - expected).max() <= 1e-5
    assert (vectors * expected).sum(axis=1).min() >= 0.99999


def test_identity(embedder: Embedder, minilm_dir: Path) -> None:
    local = Embedder.from_dir(minilm_dir, threads=1)
    assert embedder.dim == local.dim == 384
    assert embedder.model_id == local.model_id
    assert embedder.model_id.startswith("all-MiniLM-L6-v2@")
    assert np.array_equal(local.encode(["same files"]), embedder.encode(["same files"]))


def test_settings_path_loads_that_directory(minilm_dir: Path) -> None:
    loaded = Embedder.load(EmbedderSettings(repo="nobody/missing-model", path=str(minilm_dir)))
    assert loaded.dim == 384


@pytest.mark.slow
def test_batching_keeps_order_and_values(embedder: Embedder) -> None:
    texts = [" ".join(ONE_PIECE[: 1 + (i * 7) % 10] * (1 + i % 4)) for i in range(40)]
    texts += ["short", "a much longer message " * 30, ""]
    one_by_one = np.concatenate([embedder.encode([text]) for text in texts])
    for batch_size in (1, 3, 32):
        assert np.abs(embedder.encode(texts, batch_size=batch_size) - one_by_one).max() <= 1e-5
    reordered = [texts[i] for i in range(len(texts) - 1, -1, -1)]
    assert np.abs(embedder.encode(reordered)[::-1] - one_by_one).max() <= 1e-5


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "\n\t \r\n",
        "\x00\x01",
        "emoji test 🏒🥅❄️ 👩‍👩‍👧‍👦",
        "日本語の文も埋め込めますか",
        "مرحبا بالعالم",
        "e\u0301\u0301\u0301 combining",
        "lone surrogate \ud800 here",
        "x" * 5000,
        "word " * 3000,
    ],
)
def test_any_text_gives_a_unit_vector(embedder: Embedder, text: str) -> None:
    vectors = embedder.encode([text, "context"])
    assert vectors.shape == (2, 384) and unit_rows(vectors)


def test_empty_text_is_cls_sep_only(embedder: Embedder) -> None:
    assert embedder.tokenizer.encode("").ids == [101, 102]
    assert np.abs(embedder.encode([""]) - embedder.encode(["   "])).max() <= 1e-6


@pytest.mark.slow
def test_long_text_is_cut_at_256_wordpieces(embedder: Embedder) -> None:
    words = [ONE_PIECE[(i * 3 + i // 10) % len(ONE_PIECE)] for i in range(400)]
    assert len(embedder.tokenizer.encode(" ".join(words[:254])).ids) == 256  # one piece each
    assert len(embedder.tokenizer.encode(" ".join(words)).ids) == 256
    cut = embedder.encode([" ".join(words[:254])])
    assert np.abs(embedder.encode([" ".join(words)]) - cut).max() <= 1e-6
    assert np.abs(embedder.encode([" ".join(words[:126])]) - cut).max() > 1e-3


@pytest.mark.slow
def test_unshifted_and_shifted_softmax_agree(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["padding in a batch", "of several lengths, " * 9, "x", "long " * 200]
    fast = embedder.encode(texts)
    monkeypatch.setattr(embed, "EXP_SAFE", 0.0)  # every score "too big": the shifted path
    assert np.abs(embedder.encode(texts) - fast).max() <= 1e-6


@pytest.mark.slow
def test_concurrent_calls_and_blas_threads_restored(embedder: Embedder) -> None:
    texts = [f"message number {i} " * (1 + i % 40) for i in range(80)]  # several batches
    from threadpoolctl import threadpool_info

    before = threadpool_info()
    expected = embedder.encode(texts)
    results: list[np.ndarray] = []

    def run() -> None:
        results.append(embedder.encode(texts))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    for result in results:
        assert np.abs(result - expected).max() <= 1e-6
    assert threadpool_info() == before
    with embed.single_threaded_blas() as found, embed.single_threaded_blas():
        blas = [info for info in threadpool_info() if info["user_api"] == "blas"]
        assert found and blas and all(info["num_threads"] == 1 for info in blas)
    assert threadpool_info() == before


def test_bad_input(embedder: Embedder) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        embedder.encode(["fine", 3])
    with pytest.raises(TypeError, match="not a str"):
        embedder.encode("a string, not a list")  # type: ignore[arg-type]
    assert embedder.encode([]).shape == (0, 384)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PhichatError, match=f"{tmp_path / 'nope'} does not exist"):
        Embedder.from_dir(tmp_path / "nope")


def test_missing_file(tmp_path: Path, minilm_dir: Path) -> None:
    for name in embed.MODEL_FILES:
        if name != "tokenizer.json":
            (tmp_path / name).symlink_to(minilm_dir / name)
    with pytest.raises(PhichatError, match=f"{tmp_path} has no tokenizer.json"):
        Embedder.from_dir(tmp_path)


def test_offline_and_not_cached(minilm_dir: Path) -> None:
    with pytest.raises(PhichatError, match="nobody/missing-model"):
        Embedder.load(EmbedderSettings(repo="nobody/missing-model"))


def test_gelu_is_exact_erf_gelu() -> None:
    x = np.concatenate([np.linspace(-12, 12, 240_001), [-1e30, -1e9, 1e9, 1e30]])
    x = x.astype(np.float32)
    wide = x.astype(np.float64)
    exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in wide])
    got = embed.gelu(x.copy()).astype(np.float64)
    assert np.isfinite(got).all()
    assert np.abs(got - exact).max() <= 2.5e-7  # float32 rounding of the result: 2.4e-7
    inner = np.abs(wide) >= 1e-3
    erf = 2 * got[inner] / wide[inner] - 1
    erf_exact = np.array([math.erf(v / math.sqrt(2)) for v in wide[inner]])
    assert np.abs(erf - erf_exact)[np.abs(wide[inner]) < 12].max() <= 3e-7
