"""Files as knowledge: chunk retrieval on LoCoMo against the turn search, and indexing speed.

    .venv/bin/python benchmarks/file_recall.py ../shared/locomo/dev.json [--tree DIR] [--mb 10]

Recall: each session of each LoCoMo conversation becomes a text file (one `Name: text` line a
turn, as memory_recall.py writes turns), each conversation's folder is indexed (phichat.files:
chunks, words, vectors), and each question with evidence takes the chunks the attachment code
takes (`ChunkSearch.within`) within 1,024 tokens (Phi-3's tokenizer), among that
conversation's files: the share of its evidence turns inside them, averaged over questions. In
the same run, the anchor: issue 14's turn search (`Memory.rank`, memory_recall.py's loader) on
the same questions, R@10 (with the tokens its ten turns take).

Speed: ~`--mb` MB of Python source copied from this venv's site-packages (or `--tree`) into a
temporary folder, indexed fresh (chunks and words), the vectors of its first `--vector-mb` MB
(their rate gives the whole tree's), then indexed again unchanged, then with one ~5 kB file
changed (words, then its vectors), then what a message costs with the tree as a conversation's
knowledge (`/use DIR`: the index checked, the best chunks within 1,024 tokens ranked among all
of the tree's), with the chunk vectors read for each message and with those a session keeps
from one message to the next (`ChunkVectors`); the anchor is reading and hashing the same files
(what any incremental indexer must do at least once).

The LoCoMo file is CC BY-NC: measure with it, never ship it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory_recall import evidence_ids, load, share, token_counter  # noqa: E402
from packaged import minilm_dir  # noqa: E402

from phichat.embed import Embedder  # noqa: E402
from phichat.files import (  # noqa: E402
    ChunkSearch,
    ChunkVectors,
    attach_text,
    embed_chunks,
    folder_parts,
    index_folder,
)
from phichat.memory import Memory  # noqa: E402
from phichat.store import Store  # noqa: E402

BUDGET = 1024


def write_sessions(sample: dict, folder: Path) -> dict[str, tuple[str, int]]:
    """Each session of a LoCoMo sample as a text file in `folder`; where each turn is, by
    dia_id: (file path, 1-based line)."""
    folder.mkdir(parents=True, exist_ok=True)
    talk = sample["conversation"]
    where: dict[str, tuple[str, int]] = {}
    session = 1
    while f"session_{session}" in talk:
        path = folder / f"session_{session:02d}.txt"
        lines = []
        for n, turn in enumerate(talk[f"session_{session}"], start=1):
            text = f"{turn['speaker']}: {turn['text']}"
            if turn.get("blip_caption"):
                text += f" [shares a photo: {turn['blip_caption']}]"
            lines.append(" ".join(text.split()))  # one turn, one line
            where[turn["dia_id"]] = (str(path.absolute()), n)
        path.write_text("\n".join(lines) + "\n")
        session += 1
    return where


TURNS = "turn search, top 10 turns"
CHUNKS = f"file chunks within {BUDGET:,} tokens"


def recall(locomo: Path, tmp: Path, jobs: int) -> None:
    samples = json.loads(locomo.read_text())
    embedder = Embedder.from_dir(minilm_dir())
    conversations = load(locomo, tmp / "history.db")  # the turn search's history
    started = time.perf_counter()
    places, roots = [], []
    with Store.open(tmp / "files.db") as chunk_store:
        for sample in samples:
            folder = tmp / "locomo" / sample["sample_id"]
            places.append(write_sessions(sample, folder))
            index_folder(chunk_store, folder, lambda exc: print(exc, file=sys.stderr))
            roots.append(str(folder.absolute()))
        words_s = time.perf_counter() - started
        embed_chunks(chunk_store, embedder)
        chunks = len(chunk_store.chunk_ids())
    print(
        f"indexed {len(samples)} conversations as {sum(len(p) for p in places)} turns in "
        f"{chunks} chunks: words {words_s:.1f} s, "
        f"with vectors {time.perf_counter() - started:.1f} s"
    )
    work = [
        (tmp, *c, where, root) for c, where, root in zip(conversations, places, roots, strict=True)
    ]
    with multiprocessing.get_context("spawn").Pool(
        jobs
    ) as pool:  # the questions of each conversation, side by side
        found = pool.starmap(evaluate, work)
    results = {name: [v for r, _ in found for v in r[name]] for name in (TURNS, CHUNKS)}
    tokens = {name: [v for _, t in found for v in t[name]] for name in (TURNS, CHUNKS)}
    questions = len(results[TURNS])
    print(f"\n{questions} questions with evidence: share of evidence turns found, tokens taken")
    for name, values in results.items():
        print(
            f"  {name:<32} {100 * np.mean(values):5.1f}%   median {np.median(tokens[name]):.0f}"
            " tokens"
        )


def evaluate(
    tmp: Path,
    conversation: int,
    dia_ids: dict[str, int],
    questions: list[dict],
    where: dict[str, tuple[str, int]],
    root: str,
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """For each question of one conversation: the share of its evidence turns in the turn
    search's top 10 and in the chunks within BUDGET, and the tokens each takes."""
    count = token_counter()
    embedder = Embedder.from_dir(minilm_dir(), threads=1)
    results: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, list[int]] = defaultdict(list)
    with Store.open(tmp / "history.db") as store, Store.open(tmp / "files.db") as chunk_store:
        memory = Memory.open(store, embedder)
        file_ids = [f.id for f in chunk_store.indexed_files(root).values()]
        finder = ChunkSearch(chunk_store, embedder, file_ids)
        by_id = {m.id: m for m in store.messages(conversation)}
        for qa in questions:
            wanted = [e for e in evidence_ids(qa["evidence"]) if e in dia_ids and e in where]
            if not wanted:
                continue
            top = [int(i) for i in memory.rank(qa["question"], conversation).ids[:10]]
            results[TURNS].append(share(set(top), [dia_ids[e] for e in wanted]))
            tokens[TURNS].append(sum(count(by_id[i].content) for i in top))
            parts = finder.within(qa["question"], BUDGET, count)
            covered = {
                e
                for e in wanted
                for p in parts
                if p.source.path == where[e][0]
                and p.source.first_line <= where[e][1] <= p.source.last_line
            }
            results[CHUNKS].append(len(covered) / len(wanted))
            tokens[CHUNKS].append(count(attach_text(parts)) if parts else 0)
    return results, tokens


def source_tree(mb: float, tree: Path | None, into: Path) -> int:
    """Copy about `mb` MB of .py files into `into` (from `tree`, else site-packages); bytes."""
    if tree is None:
        import textual

        tree = Path(textual.__file__).parent.parent  # site-packages
    total = 0
    for path in sorted(tree.rglob("*.py")):
        if total >= mb * 1e6:
            break
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        target = into / path.relative_to(tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        total += target.stat().st_size
    return total


def speed(mb: float, tree: Path | None, tmp: Path, vector_mb: float) -> None:
    folder = tmp / "tree"
    size = source_tree(mb, tree, folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    started = time.perf_counter()
    for path in files:
        hashlib.sha256(path.read_bytes()).hexdigest()
    anchor = time.perf_counter() - started
    print(f"\n{size / 1e6:.1f} MB in {len(files)} files; reading and hashing them: {anchor:.2f} s")
    with Store.open(tmp / "speed.db") as store:

        def timed(what: str) -> float:
            started = time.perf_counter()
            report = index_folder(store, folder, lambda exc: None)
            took = time.perf_counter() - started
            print(f"  {what:<26} {took:7.2f} s ({took / anchor:5.1f}x the anchor): {report}")
            return took

        timed("fresh (chunks and words)")
        embedder = Embedder.from_dir(minilm_dir())
        indexed = sorted(store.indexed_files(str(folder)).values(), key=lambda f: f.path)
        sample, sampled = [], 0
        for file in indexed:  # the first `vector_mb` MB of files, for the vectors' speed
            if sampled >= vector_mb * 1e6:
                break
            sample.append(file.id)
            sampled += file.size
        started = time.perf_counter()
        chunks = embed_chunks(store, embedder, file_ids=sample)
        took = time.perf_counter() - started
        print(
            f"  {'vectors of ' + f'{sampled / 1e6:.1f} MB':<26} {took:7.2f} s: {chunks} chunks,"
            f" {sampled / took / 1e3:.1f} kB/s (all {size / 1e6:.1f} MB at that rate:"
            f" {size / (sampled / took) / 60:.0f} min)"
        )
        timed("unchanged")
        changed = min(files, key=lambda p: abs(p.stat().st_size - 5000))  # a ~5 kB file
        changed.write_text(changed.read_text() + "\n# one more line\n")
        started = time.perf_counter()
        timed(f"one file changed ({changed.stat().st_size / 1e3:.0f} kB)")
        entry = store.indexed_file(str(changed.absolute()))
        assert entry is not None
        again = embed_chunks(store, embedder, file_ids=[entry.id])
        print(
            f"  {'... with its vectors':<26} {time.perf_counter() - started:7.2f} s"
            f" ({again} chunks)"
        )
        knowledge(store, folder, embedder, anchor)


def knowledge(store: Store, folder: Path, embedder: Embedder, anchor: float) -> None:
    """What a message costs with the tree as its conversation's knowledge (`/use DIR`): the
    index brought up to date (nothing changed), then its best chunks within BUDGET tokens, with
    the vectors read for the message, and with those a session keeps (read by its first
    message, then only what changed). The chunks the run did not embed get random unit vectors
    first, so that every chunk has one: loading and ranking them costs the same whatever their
    values."""
    missing = 0
    rng = np.random.default_rng(0)
    while batch := store.chunks_without_vectors(embedder.model_id, 4096):
        vectors = rng.standard_normal((len(batch), embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.add_chunk_vectors(
            embedder.model_id, ((i, v.tobytes()) for (i, _), v in zip(batch, vectors, strict=True))
        )
        missing += len(batch)
    count = token_counter()
    root = str(folder.absolute())
    kept = ChunkVectors(store, embedder)
    for question in ("how are the rows of a table sorted", "where is the retry logic"):
        for vectors, how in ((None, "vectors read for it"), (kept, "vectors kept")):
            started = time.perf_counter()
            index_folder(store, folder, lambda exc: None)
            indexed = time.perf_counter() - started
            parts = folder_parts(store, root, question, BUDGET, count, embedder, vectors)
            took = time.perf_counter() - started
            print(
                f"  {'a message with /use, ' + how:<40} {took:7.2f} s ({took / anchor:5.1f}x"
                f" the anchor): index checked {indexed:.2f} s, {len(parts)} chunks ranked among"
                f" {len(store.chunk_ids())} ({missing} random vectors)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("locomo", type=Path, help="LoCoMo JSON (e.g. ../shared/locomo/dev.json)")
    parser.add_argument("--tree", type=Path, help="a source tree to index (default: site-packages)")
    parser.add_argument("--mb", type=float, default=10.0, help="MB of it to index (default 10)")
    parser.add_argument(
        "--vector-mb", type=float, default=0.5, help="MB of it to embed for the vectors' speed"
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes for the questions")
    parser.add_argument("--keep", type=Path, help="work in this folder, reused by the next run")
    parser.add_argument("--skip-recall", action="store_true", help="the speed part only")
    parser.add_argument("--skip-speed", action="store_true", help="the recall part only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phichat-files-") as tmp:
        if not args.skip_recall:
            recall(args.locomo, args.keep or Path(tmp), args.jobs)
        if not args.skip_speed:
            speed(args.mb, args.tree, Path(tmp), args.vector_mb)


if __name__ == "__main__":
    main()
