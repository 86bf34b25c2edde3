"""History search on real long conversations: LoCoMo (Maharana et al., ACL 2024).

    .venv/bin/python benchmarks/memory_recall.py ../shared/locomo/dev.json [--db PATH]

Each conversation becomes a phichat conversation, written in phichat's JSON export format and
loaded by `phichat import` (one message a turn, "Name: text", speaker_a as the user), so its
vectors are computed as an import computes them. Each question with evidence is then searched
within its conversation, and R@k is the share of its evidence turns in the top k, averaged over
questions (the paper's metric), for phichat's ranking (`Memory.rank`), BM25 alone (FTS5, as
phichat queries it) and cosine alone (all-MiniLM-L6-v2), overall and per category. Then the
recall into the prompt: each question as the new message after the whole conversation, fitted
into a 4,096-token window (Phi-3's tokenizer, 512 tokens kept for the answer) as the session
fits it, with `recall_tokens` 128 and 1024: the share of evidence turns among the messages
recalled, and in the prompt at all (recalled or in the kept recent turns). Last, the latency of
`phichat search --conversation`'s search (`Memory.search`, k=10, query embedding included).

The LoCoMo file is CC BY-NC: measure with it, never ship it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
VOCAB = HERE.parent / ".cache" / "ggml-vocab-phi-3.gguf"

from packaged import minilm_dir  # noqa: E402

from phichat import cli  # noqa: E402
from phichat.embed import Embedder  # noqa: E402
from phichat.memory import Memory, fit_context  # noqa: E402
from phichat.store import Store  # noqa: E402

KS = (5, 10, 25)
RECALL_BUDGETS = (128, 1024)
N_CTX, RESERVE = 4096, 512
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}


def evidence_ids(evidence: list[str]) -> list[str]:
    """Evidence ids normalised to D<session>:<turn> ("D:11:26", "D30:05", "D8:6; D9:17")."""
    found = re.findall(r"D\s*:?\s*(\d+)\s*:\s*0*(\d+)", " ".join(evidence))
    return [f"D{a}:{int(b)}" for a, b in found]


def session_time(text: str) -> float:
    """LoCoMo's "1:56 pm on 8 May, 2023" as Unix seconds (UTC)."""
    when = datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y")
    return when.replace(tzinfo=timezone.utc).timestamp()


def as_export(sample: dict) -> tuple[dict, list[str]]:
    """A LoCoMo sample as phichat's JSON export, and the dia_id of each message in order."""
    talk = sample["conversation"]
    messages, dia_ids = [], []
    session = 1
    while f"session_{session}" in talk:
        start = session_time(talk[f"session_{session}_date_time"])
        for n, turn in enumerate(talk[f"session_{session}"]):
            text = f"{turn['speaker']}: {turn['text']}"
            if turn.get("blip_caption"):
                text += f" [shares a photo: {turn['blip_caption']}]"
            when = datetime.fromtimestamp(start + 30 * n, timezone.utc).isoformat()
            role = "user" if turn["speaker"] == talk["speaker_a"] else "assistant"
            messages.append({"role": role, "content": text, "created": when})
            dia_ids.append(turn["dia_id"])
        session += 1
    title = f"LoCoMo {sample['sample_id']}: {talk['speaker_a']} and {talk['speaker_b']}"
    conversation = {"title": title, "created": messages[0]["created"]}
    return {"conversation": conversation, "messages": messages}, dia_ids


def load(path: Path, db: Path) -> list[tuple[int, dict[str, int], list[dict]]]:
    """Import every conversation of the LoCoMo file into the history at `db` with `phichat
    import`; per conversation: its id, its message ids by dia_id, its questions with evidence."""
    samples = json.loads(path.read_text())
    exports, dia = zip(*(as_export(sample) for sample in samples), strict=True)
    export_file = db.with_suffix(".import.json")
    export_file.write_text(json.dumps(list(exports)))
    if not db.exists():
        config = db.with_suffix(".toml")
        config.write_text(f"[store]\npath = {json.dumps(str(db))}\n")
        started = time.perf_counter()
        flags = ["--config", str(config), "--embedder-dir", str(minilm_dir())]
        code = cli.main(["import", str(export_file), *flags])
        if code:
            sys.exit(f"phichat import failed ({code})")
        turns = sum(len(d) for d in dia)
        print(f"imported {turns} turns in {time.perf_counter() - started:.1f} s")
    loaded = []
    with Store.open(db) as store:
        by_title = {c.title: c.id for c in store.conversations()}
        for export, dia_ids, sample in zip(exports, dia, samples, strict=True):
            conversation = by_title[export["conversation"]["title"]]
            ids = dict(zip(dia_ids, store.message_ids(conversation), strict=True))
            questions = [q for q in sample["qa"] if evidence_ids(q.get("evidence", []))]
            loaded.append((conversation, ids, questions))
    return loaded


def share(found: set[int], wanted: list[int]) -> float:
    return len(found & set(wanted)) / len(wanted)


def token_counter():
    """Phi-3's tokenizer (llama.cpp's vocab-only GGUF, extracted by .ci/run), memoized."""
    from llama_cpp import Llama

    from phichat.llama_engine import install_log_callback

    install_log_callback()
    vocab = Llama(str(VOCAB), vocab_only=True, verbose=False)
    counts: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in counts:
            counts[text] = len(vocab.tokenize(text.encode(), add_bos=False, special=False))
        return counts[text]

    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("locomo", type=Path, help="LoCoMo JSON (e.g. ../shared/locomo/dev.json)")
    parser.add_argument("--db", type=Path, help="reuse (or build) this history database")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phichat-recall-") as tmp:
        db = args.db or Path(tmp) / "history.db"
        run(args.locomo, db)


def run(locomo: Path, db: Path) -> None:
    conversations = load(locomo, db)
    embedder = Embedder.from_dir(minilm_dir())
    count = token_counter()
    recall: dict[str, list[list[float]]] = defaultdict(list)
    by_category: dict[tuple[str, int], list[float]] = defaultdict(list)
    prompt: dict[str, list[float]] = defaultdict(list)
    latency: list[float] = []
    with Store.open(db) as store:
        memory = Memory.open(store, embedder)
        for conversation, dia_ids, questions in conversations:
            history = store.messages(conversation)
            ids = store.message_ids(conversation)
            rows = memory.index.rows(ids)
            for qa in questions:
                question, category = qa["question"], qa["category"]
                wanted = [dia_ids[e] for e in evidence_ids(qa["evidence"]) if e in dia_ids]
                if not wanted:
                    continue
                query = embedder.encode([question])[0]
                words = store.keyword_search(question, len(ids), conversation)
                rankings = {
                    "phichat": [int(i) for i in memory.rank(question, conversation).ids],
                    "BM25 alone": [i for i, _ in words],
                    "cosine alone": [i for i, _ in memory.index.search(query, max(KS), rows)],
                }
                for name, ranked in rankings.items():
                    scores = [share(set(ranked[:k]), wanted) for k in KS]
                    recall[name].append(scores)
                    by_category[(name, category)].append(scores[0])
                started = time.perf_counter()
                memory.search(question, 10, conversation)
                latency.append((time.perf_counter() - started) * 1000)
                relevance = memory.relevance(question)
                for budget in RECALL_BUDGETS:
                    fitted = fit_context(
                        "", history, question, count, N_CTX, RESERVE, relevance, budget
                    )
                    shown = {m["content"] for m in fitted.messages[:-1]}
                    kept = {m.id for m in history if m.content in shown}
                    recalled = set(fitted.recall)
                    prompt[f"recalled at {budget}"].append(share(recalled, wanted))
                    prompt[f"in prompt at {budget}"].append(share(kept | recalled, wanted))
    report(recall, by_category, prompt, latency)


def report(recall, by_category, prompt, latency) -> None:
    questions = len(next(iter(recall.values())))
    print(f"\n{questions} questions with evidence; R@k in % (share of evidence turns in the top k)")
    head = "".join(f"{'R@' + str(k):>8}" for k in KS)
    cats = "".join(f"{CATEGORIES[c][:11]:>12}" for c in sorted(CATEGORIES))
    print(f"{'retriever':<14}{head}   R@5 by category:{cats}")
    for name, rows in recall.items():
        means = np.mean(rows, axis=0) * 100
        per = "".join(f"{100 * np.mean(by_category[(name, c)]):>12.1f}" for c in sorted(CATEGORIES))
        print(f"{name:<14}" + "".join(f"{m:>8.1f}" for m in means) + " " * 19 + per)
    print("\nevidence turns in the prompt (4,096-token window, the question as the new message):")
    for name, values in prompt.items():
        print(f"  {name:<20} {100 * np.mean(values):5.1f}%")
    p95 = statistics.quantiles(latency, n=20)[-1]
    print(
        f"\nsearch within a conversation (k=10, query embedding included): median "
        f"{statistics.median(latency):.1f} ms, p95 {p95:.1f} ms"
    )


if __name__ == "__main__":
    main()
