"""Store benchmark: saving an answer as it streams (issue 13, "Lost answers").

    .venv/bin/python benchmarks/store.py [--history 10000] [--tokens 2000] [--answers 10]

A session saves the answer being written about once a second, so that even SIGKILL loses at
most about a second of text: `add_message(..., status=STREAMING)`, then `update_message()` with
the whole text so far, then a last update with the final status. At 20 tokens/s a 2,000-token
answer (about 1,500 words, 9 kB) is saved 100 times, each time with more text. This times every
one of those calls on a database that already holds `--history` messages (with their word
index), WAL checkpoints included, against the anchor of 1 ms per save (at one save per second:
0.1% of the time). In the same run: the last update (the answer joins the word index) and one
add_message() of the whole answer, which is what saving only at the end costs.
Run it on a quiet machine: it prints the load average it started with.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from phichat.store import Role, Status, Store

ANCHOR_MS = 1.0
TOKENS_PER_S = 20
WORDS_PER_TOKEN = 0.75
VOCABULARY = 20_000
WORDS: list[str] = []


def lexicon(rng: random.Random) -> list[str]:
    """Made-up words of 1-11 letters (about 5 on average, as in English prose)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        "".join(rng.choices(letters, k=min(11, 1 + int(rng.expovariate(0.25)))))
        for _ in range(VOCABULARY)
    ]


def text(rng: random.Random, words: int) -> str:
    """`words` words drawn evenly from the lexicon (many distinct words: the word index's
    worst case)."""
    return " ".join(rng.choices(WORDS, k=words))


def build(store: Store, history: int, rng: random.Random) -> None:
    """`history` finished messages of 5-60 words, 1,000 per conversation."""
    for start in range(0, history, 1000):
        chat = store.create_conversation(title=f"synthetic {start // 1000}")
        rows = [
            (Role.USER if i % 2 == 0 else Role.ASSISTANT, text(rng, rng.randint(5, 60)))
            for i in range(min(1000, history - start))
        ]
        store.add_messages(chat.id, rows)


def summary(times_ms: list[float]) -> str:
    p95 = statistics.quantiles(times_ms, n=20, method="inclusive")[-1]
    return (
        f"median {statistics.median(times_ms):.3f} ms  mean {statistics.fmean(times_ms):.3f} ms"
        f"  p95 {p95:.3f} ms  max {max(times_ms):.3f} ms"
    )


def timed_ms(call, *args, **kwargs) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=10_000, help="messages already stored")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens in each answer")
    parser.add_argument("--answers", type=int, default=10, help="answers streamed and saved")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rng = random.Random(7)
    WORDS[:] = lexicon(rng)
    saves = args.tokens // TOKENS_PER_S
    words = int(args.tokens * WORDS_PER_TOKEN)
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp) / "history.db") as store:
        build(store, args.history, rng)
        chat = store.create_conversation(title="streamed")
        updates: list[float] = []
        finals: list[float] = []
        whole: list[float] = []
        for _ in range(args.answers):
            answer = text(rng, words)
            cuts = [round(len(answer) * (i + 1) / saves) for i in range(saves)]
            store.add_message(chat.id, Role.USER, "a question")
            message = store.add_message(chat.id, Role.ASSISTANT, "", status=Status.STREAMING)
            updates += [timed_ms(store.update_message, message.id, answer[:cut]) for cut in cuts]
            finals.append(
                timed_ms(
                    store.update_message,
                    message.id,
                    answer,
                    status=Status.FINISHED,
                    tokens=args.tokens,
                    tokens_per_s=float(TOKENS_PER_S),
                )
            )
            whole.append(timed_ms(store.add_message, chat.id, Role.ASSISTANT, answer))
        size_kb = len(answer.encode()) / 1000
    median = statistics.median(updates)
    print(
        f"{args.history:,} messages stored; {args.answers} answers of {args.tokens:,} tokens"
        f" ({size_kb:.1f} kB), each saved {saves} times as it grew"
    )
    print(f"update_message while streaming: {summary(updates)}   (anchor {ANCHOR_MS:.0f} ms)")
    over = sum(t > ANCHOR_MS for t in updates)
    print(
        f"  = {median / ANCHOR_MS:.3f}x the anchor (median); {over} of {len(updates)} calls"
        " over it (those that ran a WAL checkpoint)"
    )
    print(f"last update (joins the word index): {summary(finals)}")
    print(f"add_message of the whole answer:    {summary(whole)}")


if __name__ == "__main__":
    main()
