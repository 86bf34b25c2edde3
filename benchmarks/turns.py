"""Time to first token, turn after turn: llama.cpp's KV cache keeps the conversation's prefix.

Ten turns of a conversation through ChatSession (history in a temporary SQLite file), new
messages of the same length, greedy, while the conversation still fits the window. Target: the
10th turn's first token within 1.5x of the 1st turn's.

    python benchmarks/turns.py [--model PATH] [--turns 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from packaged import smollm_path

from phichat.config import load_settings
from phichat.session import ChatSession

TOPICS = [
    "lighthouses",
    "volcanoes",
    "glaciers",
    "comets",
    "coral reefs",
    "deserts",
    "auroras",
    "tides",
    "rainforests",
    "canyons",
    "geysers",
    "monsoons",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()
    path = args.model or smollm_path()
    with tempfile.TemporaryDirectory() as home:
        os.environ["PHICHAT_HOME"] = home
        overrides = {
            "model": {"path": str(path)},
            "engine": {"threads": args.threads},
            "sampling": {"temperature": 0.0, "max_tokens": args.answer_tokens},
        }
        settings = load_settings("cpu", overrides=overrides)
        session = ChatSession.open(settings, remember=False)
        rows = []
        for turn in range(args.turns):
            text = f"Tell me one surprising fact about {TOPICS[turn % len(TOPICS)]}, please."
            for _ in session.send(text):
                pass
            stats = session.last_stats
            assert stats is not None
            rows.append((turn + 1, stats.prompt_tokens, stats.cached_tokens, stats.ttft_s))
        n_ctx = session.engine.n_ctx
        session.close()
    print(f"model: {path.name}, threads: {args.threads}, n_ctx: {n_ctx}")
    print(f"{'turn':>4} {'prompt tokens':>14} {'reused from cache':>18} {'first token ms':>15}")
    for turn, prompt, cached, ttft in rows:
        print(f"{turn:>4} {prompt:>14} {cached:>18} {ttft * 1000:>15.1f}")
    ratio = rows[-1][3] / rows[0][3]
    print(f"first-token time, turn {rows[-1][0]} / turn 1: {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
