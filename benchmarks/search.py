"""Search benchmark: 100,000 stored messages, against the anchors of issue 4.

    .venv/bin/python benchmarks/search.py [--messages 100000] [--queries 50] [--db PATH]

Builds a history database of synthetic messages (random words, random unit vectors: embedding
100k texts would take too long and is the embedding benchmark's business), then measures:
opening it and being ready to search (anchor <= 1 s), one query over every message, vector-only
and blended with FTS5, and one within a 700-message conversation (anchors <= 30 ms), and the
index's memory against the raw float32 vectors (anchor <= 2x). Query embedding is not timed (a
stand-in encoder returns a random unit vector).
Run it on a quiet machine: it prints the load average it started with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from phichat.memory import Memory
from phichat.store import Store

DIM = 384
VOCABULARY = 20_000
RARE_TOKENS = [f"ERR_{n}" for n in range(1000, 1100)]
PER_CONVERSATION = 700  # messages in each synthetic conversation (a long one: LoCoMo's size)


class RandomEncoder:
    """Stands in for the embedder: a random unit vector per text."""

    model_id = "random-unit@bench"
    dim = DIM

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def encode(self, texts: list[str]) -> np.ndarray:
        return unit_rows(self.rng, len(texts))


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, DIM), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pseudo-words drawn with a Zipf-like spread: a few very common, most rare."""
    return np.minimum(rng.zipf(1.3, n), VOCABULARY) - 1


def build(path: Path, messages: int, seed: int) -> None:
    """Write `messages` synthetic messages with vectors, PER_CONVERSATION per conversation."""
    rng = np.random.default_rng(seed)
    lexicon = [f"w{i}" for i in range(VOCABULARY)]
    with Store.open(path) as store:
        for start in range(0, messages, PER_CONVERSATION):
            n = min(PER_CONVERSATION, messages - start)
            lengths = rng.integers(5, 40, n)
            drawn = words(rng, int(lengths.sum()))
            ends = np.cumsum(lengths)
            texts = [
                " ".join(lexicon[w] for w in drawn[e - k : e])
                for e, k in zip(ends, lengths, strict=True)
            ]
            for i in rng.choice(n, 2, replace=False):
                texts[i] += " " + RARE_TOKENS[int(rng.integers(len(RARE_TOKENS)))]
            vectors = unit_rows(rng, n)
            chat = store.create_conversation(title=f"synthetic {start // PER_CONVERSATION}")
            rows = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]
            store.add_messages(
                chat.id, rows, RandomEncoder.model_id, [v.tobytes() for v in vectors]
            )


def anon_rss_mib() -> float:
    """This process's anonymous resident memory (the database's mmap'd pages are not in it)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return kib / 1024


def timed_ms(run, queries) -> list[float]:
    times = []
    for query in queries:
        start = time.perf_counter()
        run(query)
        times.append((time.perf_counter() - start) * 1000)
    return times


def summary(times: list[float]) -> str:
    p95 = statistics.quantiles(times, n=20)[-1]
    return f"median {statistics.median(times):6.2f} ms   p95 {p95:6.2f} ms"


def measure(path: Path, queries: int, seed: int) -> None:
    """Open the database, then time searches and weigh the index."""
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"database: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    encoder = RandomEncoder(seed + 1)
    rss_before = anon_rss_mib()
    start = time.perf_counter()
    store = Store.open(path)
    memory = Memory.open(store, encoder)
    ready = time.perf_counter() - start
    rss_after = anon_rss_mib()
    n = len(memory.index)
    print(f"open + ready to search: {ready * 1000:.0f} ms for {n:,} vectors   (anchor 1000 ms)")

    rng = np.random.default_rng(seed + 2)
    vectors = list(unit_rows(rng, queries))
    timed_ms(lambda q: memory.index.search(q, 10), vectors[:5])  # warm-up
    vector_ms = timed_ms(lambda q: memory.index.search(q, 10), vectors)
    print(f"vector-only top-10:      {summary(vector_ms)}   (anchor 30 ms)")

    lexicon = [f"w{i}" for i in words(rng, 2 * queries)]
    texts = [
        " ".join(lexicon[2 * i : 2 * i + 1 + i % 2]) if i % 3 else RARE_TOKENS[i % 100]
        for i in range(queries)
    ]
    first = timed_ms(lambda t: memory.search(t, 10), texts[:1])[0]
    blended_ms = timed_ms(lambda t: memory.search(t, 10), texts)
    print(f"blended (vector + FTS5): {summary(blended_ms)}   (anchor 30 ms; first {first:.1f} ms)")
    chats = [c.id for c in store.conversations()]
    within_ms = timed_ms(lambda t: memory.search(t, 10, chats[len(t) % len(chats)]), texts)
    print(f"within one conversation: {summary(within_ms)}   (anchor 30 ms)")

    raw = n * DIM * 4
    print(
        f"index memory: {memory.index.nbytes / 2**20:.1f} MiB = "
        f"{memory.index.nbytes / raw:.2f}x the raw vectors ({raw / 2**20:.1f} MiB)   (anchor 2x)"
    )
    print(f"process anonymous RSS: +{rss_after - rss_before:.0f} MiB on open")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--db", type=Path, help="reuse (or build) this database file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phichat-bench-") as tmp:
        path = args.db or Path(tmp) / "history.db"
        if path.exists():
            measure(path, args.queries, args.seed)
            return
        start = time.perf_counter()
        build(path, args.messages, args.seed)
        print(f"built {args.messages:,} messages in {time.perf_counter() - start:.1f} s")
        # measure in a fresh process, so its memory figures are not the build's
        command = [sys.executable, __file__, "--db", str(path), "--queries", str(args.queries)]
        subprocess.run([*command, "--seed", str(args.seed)], check=True)


if __name__ == "__main__":
    main()
