"""Tokens read per turn after the window overflows, for each grid step and recall budget.

Counts, not timings: long_chat.py's 40-turn conversation (same messages, 32-token answers) is
fitted turn by turn with phichat.memory.fit_context as the session does (recalled ids kept with
each message; relevance by shared words, so every turn recalls something) and rendered with
Phi-3's tokenizer and chat template (the tiny Phi-3 of tests/tiny_phi3.py, so no big model is
needed). A turn reads what its prompt does not share with the previous prompt and answer. Prints
the median read of turns 2-10 and of turns 20-40, the mean of turns 20-40 (moves of the cut
included) and how many of those turns moved the cut. With read-ahead (issue 18) the app reads,
right after each answer, the next prompt up to its new message as fitted for an empty draft:
`after Enter` is the most any of turns 20-40 still reads after Enter when that read-ahead had the
time to finish, and `idle` the most it had to read; the message allowance (`--allowances`,
fit_context's `allowance`) is what makes the two fits keep the same history. A few minutes:

    .venv/bin/python benchmarks/overflow_reads.py [--grids 4,3,2] [--recalls 0,128,256,512]
        [--allowances 0,256]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB = HERE.parent / ".cache" / "ggml-vocab-phi-3.gguf"
sys.path.insert(0, str(HERE.parent / "tests"))

import long_chat  # noqa: E402
from tiny_phi3 import build_tiny_phi3  # noqa: E402

from phichat import memory  # noqa: E402
from phichat.config import EngineSettings  # noqa: E402
from phichat.llama_engine import LlamaEngine  # noqa: E402
from phichat.store import Message  # noqa: E402

HEADER = (
    f"{'grid':<7}{'recall':>7}{'allow':>7}{'turns 2-10':>12}{'20-40':>7}{'mean 20-40':>12}"
    f"{'moves':>7}{'after Enter':>13}{'idle':>7}"
)


def shared_words(text: str) -> Callable[[list[Message]], list[float]]:
    words = set(re.findall(r"\w+", text.lower()))
    return lambda found: [len(words & set(re.findall(r"\w+", m.content.lower()))) for m in found]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reads(
    engine: LlamaEngine, grid_parts: int, recall_tokens: int, allowance: int, turns: int
) -> tuple[list[int], list[int], list[int]]:
    """Tokens read at each turn of long_chat.py's overflow conversation: in all, after Enter
    once the read-ahead of an empty draft has read its prompt, and by that read-ahead."""
    memory.GRID_PARTS = grid_parts
    counts: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in counts:
            counts[text] = engine.count_tokens(text)
        return counts[text]

    rng = random.Random(1)
    history: list[Message] = []
    before: list[int] = []
    read, after_enter, idle = [], [], []
    for turn in range(turns):
        text = long_chat.user_message(rng)
        fitted = memory.fit_context(
            "",
            history,
            text,
            count,
            4096,
            512,
            shared_words(text),
            recall_tokens,
            None,
            8,
            allowance,
        )
        tokens = engine.prompt_tokens(fitted.messages)
        read.append(len(tokens) - common_prefix(before, tokens))
        draft = memory.fit_context(  # recalling nothing yet, as for a draft without a word
            "", history, "", count, 4096, 512, None, recall_tokens, (), 8, allowance
        )
        ahead = engine.prompt_tokens(draft.messages)
        ahead = ahead[: common_prefix(ahead, engine.prompt_tokens([*draft.messages[:-1]]))]
        idle.append(max(0, len(ahead) - common_prefix(before, ahead)))
        cached = max(common_prefix(before, tokens), common_prefix(ahead, tokens))
        after_enter.append(len(tokens) - cached)
        answer = " ".join(long_chat.assistant_message(rng).split()[:24])  # ~32 tokens
        before = tokens + engine.llama.tokenize(answer.encode(), add_bos=False)
        history += [
            Message(2 * turn + 1, 1, "user", text, 0.0, recalled=fitted.recall),
            Message(2 * turn + 2, 1, "assistant", answer, 0.0),
        ]
    return read, after_enter, idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="4,3,2", help="GRID_PARTS values")
    parser.add_argument("--recalls", default="0,128,256,512", help="recall_tokens values")
    parser.add_argument("--allowances", default="0,256", help="message allowances, in tokens")
    parser.add_argument("--turns", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = build_tiny_phi3(VOCAB, Path(scratch) / "tiny-phi3.gguf")
        engine = LlamaEngine.load(model, "cpu", EngineSettings(n_ctx=4096, threads=1))
        print(HEADER)
        for grid in map(int, args.grids.split(",")):
            for recall in map(int, args.recalls.split(",")):
                for allowance in map(int, args.allowances.split(",")):
                    read, after_enter, idle = reads(engine, grid, recall, allowance, args.turns)
                    late = read[19:40]
                    print(
                        f"1/{grid:<5}{recall:>7}{allowance:>7}"
                        f"{statistics.median(read[1:10]):>12.0f}{statistics.median(late):>7.0f}"
                        f"{statistics.mean(late):>12.0f}{sum(r > 1000 for r in late):>7}"
                        f"{max(after_enter[19:40]):>13}{max(idle[19:40]):>7}",
                        flush=True,
                    )
        engine.close()


if __name__ == "__main__":
    main()
