"""Recall chosen from a draft (issue 18, item 2): how much recall quality a read-ahead would cost
if the recall were chosen from the message while it is typed rather than from the whole of it.

    .venv/bin/python benchmarks/draft_recall.py ../shared/locomo/dev.json [--db PATH]
        [--conversations N]

On memory_recall.py's LoCoMo history (each conversation imported by `phichat import`), each
question with evidence is taken as the new message after its whole conversation, and the recall
into the prompt is chosen (`fit_context`, a 4,096-token window, Phi-3's tokenizer, 512 tokens
kept for the answer, `recall_tokens` 128 as the cpu config and 1024) from the question's first
50% and 75% of words (the draft the read-ahead sees) and from all of it (what Enter sees): the
share of the question's evidence turns recalled, how often the recalled set differs from the
whole question's, and how often its most relevant message (by the whole question) differs. R@5
of the ranking (`Memory.rank`) on the same prefixes is shown too.

The LoCoMo file is CC BY-NC: measure with it, never ship it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory_recall import (  # noqa: E402
    N_CTX,
    RESERVE,
    evidence_ids,
    load,
    share,
    token_counter,
)
from packaged import minilm_dir  # noqa: E402

from phichat.embed import Embedder  # noqa: E402
from phichat.memory import Memory, fit_context  # noqa: E402
from phichat.store import Store  # noqa: E402

PARTS = (0.5, 0.75, 1.0)
BUDGETS = (128, 1024)


def prefix(question: str, part: float) -> str:
    """The question's first `part` of words (at least one)."""
    words = question.split()
    return " ".join(words[: max(1, round(len(words) * part))])


def run(locomo: Path, db: Path, first: int | None = None) -> None:
    conversations = load(locomo, db)[:first]
    embedder = Embedder.from_dir(minilm_dir())
    count = token_counter()
    recalled: dict[tuple[int, float], list[float]] = defaultdict(list)
    changed: dict[tuple[int, float], list[bool]] = defaultdict(list)
    top_changed: dict[tuple[int, float], list[bool]] = defaultdict(list)
    at5: dict[float, list[float]] = defaultdict(list)
    with Store.open(db) as store:
        memory = Memory.open(store, embedder)
        for conversation, dia_ids, questions in conversations:
            history = store.messages(conversation)
            for qa in questions:
                question = qa["question"]
                wanted = [dia_ids[e] for e in evidence_ids(qa["evidence"]) if e in dia_ids]
                if not wanted:
                    continue
                whole = memory.relevance(question)
                for part in PARTS:
                    draft = prefix(question, part)
                    ranked = [int(i) for i in memory.rank(draft, conversation).ids]
                    at5[part].append(share(set(ranked[:5]), wanted))
                relevance = {part: memory.relevance(prefix(question, part)) for part in PARTS}
                for budget in BUDGETS:
                    chosen = {}
                    for part in PARTS:
                        fitted = fit_context(
                            "", history, question, count, N_CTX, RESERVE, relevance[part], budget
                        )
                        chosen[part] = fitted.recall
                        recalled[(budget, part)].append(share(set(fitted.recall), wanted))
                    final = chosen[1.0]
                    for part in PARTS:
                        ids = chosen[part]
                        changed[(budget, part)].append(set(ids) != set(final))
                        top_changed[(budget, part)].append(
                            top(ids, history, whole) != top(final, history, whole)
                        )
    print(f"\n{len(at5[1.0])} questions with evidence")
    print(
        f"{'chosen from':<24}{'R@5':>6}"
        + "".join(
            f"{'recalled@' + str(b):>13}{'set differs':>13}{'top differs':>13}" for b in BUDGETS
        )
    )
    for part in PARTS:
        line = f"{str(int(part * 100)) + '% of the words':<24}{100 * np.mean(at5[part]):>6.1f}"
        for budget in BUDGETS:
            key = (budget, part)
            line += f"{100 * np.mean(recalled[key]):>12.1f}%{100 * np.mean(changed[key]):>12.1f}%"
            line += f"{100 * np.mean(top_changed[key]):>12.1f}%"
        print(line)


def top(ids: tuple[int, ...], history: list, relevance) -> int | None:
    """The most relevant (by `relevance`) of the recalled message ids."""
    if not ids:
        return None
    by_id = {m.id: m for m in history}
    messages = [by_id[i] for i in ids]
    scores = relevance(messages)
    return max(zip(scores, ids, strict=True))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("locomo", type=Path, help="LoCoMo JSON (e.g. ../shared/locomo/dev.json)")
    parser.add_argument("--db", type=Path, help="reuse (or build) this history database")
    parser.add_argument("--conversations", type=int, help="only the first N conversations")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phichat-draft-recall-") as tmp:
        run(args.locomo, args.db or Path(tmp) / "history.db", args.conversations)


if __name__ == "__main__":
    main()
