"""Time to first token of a fork's first answer and of a continued answer, against the same
prompt read from an empty KV cache, on the Phi-3-mini shape (benchmarks/phi3_shape.py).

Through ChatSession (history in a temporary SQLite file, no saved states: the KV cache held in
the context is what is reused), greedy: a conversation of --turns turns; a fork at its last
message answers one more message (anchor: the same message in another fork at the same point,
after the context was emptied); then an answer cut at --answer-tokens is continued twice, once
from an empty context (the anchor: all of it read again) and once with the context holding it.
Targets: the fork reads only its new message, a continuation reads one token.

    python benchmarks/fork_continue.py [--model PATH] [--turns 4] [--threads 2]
        [--answer-tokens 24]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from phi3_shape import ensure

from phichat.config import load_settings
from phichat.session import ChatSession


def emptied(session: ChatSession) -> None:
    """The context holds nothing: the next answer reads its whole prompt."""
    with session.engine.lock:  # type: ignore[attr-defined]
        session.engine.llama.reset()  # type: ignore[attr-defined]


def row(name: str, session: ChatSession, answer: Iterator[str]) -> tuple[int, int, float]:
    """Stream `answer` to its end; print and return its prompt tokens, tokens read and time to
    first token."""
    "".join(answer)
    stats = session.last_stats
    assert stats is not None
    print(
        f"{name:<34} {stats.prompt_tokens:>7} {stats.prompt_tokens - stats.cached_tokens:>6}"
        f" {stats.ttft_s * 1000:>10.0f}"
    )
    return stats.prompt_tokens, stats.prompt_tokens - stats.cached_tokens, stats.ttft_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=24)
    args = parser.parse_args()
    path = args.model or ensure()
    with tempfile.TemporaryDirectory() as home:
        os.environ["PHICHAT_HOME"] = home
        overrides = {
            "model": {"path": str(path)},
            "engine": {"threads": args.threads, "state_cache_mb": 0},
            "sampling": {"temperature": 0.0, "max_tokens": args.answer_tokens},
        }
        session = ChatSession.open(load_settings("cpu", overrides=overrides), remember=False)
        for turn in range(args.turns):
            "".join(
                session.send(f"Tell me about lighthouse number {turn}, its keeper, its storms.")
            )
        print(f"model: {path.name}, threads: {args.threads}, {args.turns} turns of history")
        print(f"{'':<34} {'prompt':>7} {'read':>6} {'first ms':>10}")
        question = "And which of them would you visit first, and why?"
        parent = session.conversation_id
        session.fork()
        session.prepare()
        fork = row("fork at the current point", session, session.send(question))
        assert parent is not None
        session.switch(parent)
        session.fork()
        session.prepare()
        emptied(session)
        cold = row("  anchor: same prompt, empty cache", session, session.send(question))
        "".join(session.send("Now describe the storm in detail, hour by hour."))
        emptied(session)
        anchor = row("  anchor: continue, empty cache", session, session.continue_answer())
        warm = row("continue, the context holds it", session, session.continue_answer())
        session.close()
    print(
        f"fork, first token: {fork[2] / cold[2]:.3f} of the anchor's; read {fork[1]} of {fork[0]}"
    )
    print(f"continue: {warm[2] / anchor[2]:.3f} of the anchor's; read {warm[1]} of {warm[0]}")


if __name__ == "__main__":
    main()
