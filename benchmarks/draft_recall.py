"""Recall chosen from a draft (issue 18, item 2): what a read-ahead costs and gains under each
layout of the recall, recall quality and the tokens read after Enter.

    .venv/bin/python benchmarks/draft_recall.py ../shared/locomo/dev.json [--db PATH]
        [--conversations N]

On memory_recall.py's LoCoMo history (each conversation imported by `phichat import`), each
question with evidence is taken as the new message after its whole conversation, and the recall
into the prompt is chosen (`fit_context` as the session calls it: a 4,096-token window, Phi-3's
tokenizer, 512 tokens kept for the answer, the message allowance, `recall_tokens` 128 as the cpu
config and 1024) from a draft of it, the last one a read-ahead would read before Enter: its first
50% and 75% of words, all but its last two words, all but its last word (each typed with the space
after it), and from the whole question (what Enter chooses from); for the tokens read after
Enter, also the whole question typed with no space after it (a pause before Enter: its last word
is not settled yet, the recall is chosen from all of it).

Quality: the share of the question's evidence turns recalled, how often the recalled set differs
from the whole question's, and how often its most relevant message (by the whole question)
differs. R@5 of the ranking (`Memory.rank`) on the same drafts is shown too.

Tokens read after Enter: each prompt is rendered exactly, with the Phi-3 GGUF's chat template and
tokenizer (the whole prompt read inline with special=True, as the engine reads one whose messages
hold no control token's text); the read-ahead reads the draft prompt's settled tokens
(`engine.settled_tokens`: up to the draft's settled text, less the margin), and Enter reads the
final prompt's tokens past those it shares with them. Three rules:
- "recall before, chosen again" (today): the draft's prompt holds the recall chosen from the
  draft before its text; Enter chooses again from the whole question, so a differing choice is
  read again from its first differing token on, through the end of the message;
- "recall after" (the alternative layout: the message's text, then the recall, marked as recalled
  for the message above): the recall is never read ahead, so Enter reads the message's unsettled
  tail and the whole final recall with its marks;
- "recall before, kept from the draft": Enter keeps the draft's choice (the recall quality is the
  draft's): only the unsettled tail is read.
Their mean, median, p95 and max per draft and recall budget are printed.

The LoCoMo file is CC BY-NC: measure with it, never ship it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from memory_recall import (  # noqa: E402
    N_CTX,
    RESERVE,
    VOCAB,
    evidence_ids,
    load,
    share,
    token_counter,
)
from packaged import minilm_dir  # noqa: E402

from phichat.embed import Embedder  # noqa: E402
from phichat.engine import settled_tokens, shared_prefix  # noqa: E402
from phichat.memory import (  # noqa: E402
    MESSAGE_ALLOWANCE,
    RECALL_CLOSE,
    RECALL_OPEN,
    FittedContext,
    Memory,
    fit_context,
)
from phichat.session import settled_text  # noqa: E402
from phichat.store import Message, Store  # noqa: E402

WHOLE = "the whole question"
PAUSED = "whole, before Enter"
DRAFTS: dict[str, Callable[[int], int]] = {  # words kept of a question of n words
    "50% of the words": lambda n: round(n * 0.5),
    "75% of the words": lambda n: round(n * 0.75),
    "all but the last two words": lambda n: n - 2,
    "all but the last word": lambda n: n - 1,
}
BUDGETS = (128, 1024)
RULES = ("recall before, chosen again", "recall after", "recall before, kept from the draft")
RECALL_AFTER_OPEN = RECALL_OPEN.replace("below", "above")
LAST_TURN = "<|user|>"  # Phi-3's control token that opens a user turn

Messages = list[dict[str, str]]


def typed(question: str, draft: str) -> str:
    """What is in the prompt box at `draft`: the question's first words, each with the space
    typed after it; the whole question for PAUSED and WHOLE."""
    words = question.split()
    if draft not in DRAFTS:
        return " ".join(words)
    return " ".join(words[: max(1, DRAFTS[draft](len(words)))]) + " "


def prompt_tokenizer() -> Callable[[Messages], list[int]]:
    """A prompt's token ids as the engine reads it with Phi-3's GGUF (its chat template and
    tokenizer, the whole rendered prompt inline). llama.cpp tokenizes the text between two
    control tokens on its own, so the prompt up to its last user turn is tokenized once for
    all the prompts that share it."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    vocab = Llama(str(VOCAB), vocab_only=True, verbose=False)
    bos, eos = (
        vocab.detokenize([token], special=True).decode()
        for token in (vocab.token_bos(), vocab.token_eos())
    )
    template = Jinja2ChatFormatter(
        template=vocab.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos
    )
    heads: dict[str, list[int]] = {}

    def tokens(messages: Messages) -> list[int]:
        rendered = template(messages=messages)
        prompt, add_bos = rendered.prompt, not rendered.added_special
        cut = prompt.rfind(LAST_TURN)
        head = prompt[:cut]
        if head not in heads:
            heads[head] = vocab.tokenize(head.encode(), add_bos=add_bos, special=True)
        return heads[head] + vocab.tokenize(prompt[cut:].encode(), add_bos=False, special=True)

    return tokens


def fit(
    history: list[Message], text: str, count: Callable[[str], int], budget: int, **how
) -> FittedContext:
    """`text` fitted after `history` as the session fits a message (the message allowance
    included), with `recall_tokens` `budget`; `how`: relevance or recall."""
    return fit_context(
        "", history, text, count, N_CTX, RESERVE, recall_tokens=budget,
        allowance=MESSAGE_ALLOWANCE, **how,
    )  # fmt: skip


def read_ahead(
    fitted: FittedContext, draft: str, tokens: Callable[[Messages], list[int]]
) -> list[int]:
    """The tokens a read-ahead of `draft` reads from its fitted prompt (as the session's
    _draft_prompt cuts it and the engine settles it)."""
    *head, last = fitted.messages
    content = last["content"][: len(last["content"]) - len(draft)] + settled_text(draft)
    return settled_tokens([*head, {**last, "content": content}], tokens)


def recall_after(fitted: FittedContext, text: str, by_id: dict[int, Message]) -> Messages:
    """`fitted`'s prompt in the other layout: the message's text first, then its recall."""
    *head, last = fitted.messages
    lines = [f"{str(by_id[i].role).capitalize()}: {by_id[i].content}" for i in fitted.recall]
    content = "\n\n".join([text, RECALL_AFTER_OPEN, *lines, RECALL_CLOSE]) if lines else text
    return [*head, {**last, "content": content}]


def after_enter(final: list[int], ahead: list[int]) -> int:
    """Tokens of the `final` prompt read after Enter, with `ahead` in the cache."""
    return len(final) - shared_prefix(final, ahead)


def run(locomo: Path, db: Path, first: int | None = None) -> None:
    conversations = load(locomo, db)[:first]
    embedder = Embedder.from_dir(minilm_dir())
    with Store.open(db) as store:
        measures = Measures(Memory.open(store, embedder), token_counter(), prompt_tokenizer())
        for conversation, dia_ids, questions in conversations:
            history = store.messages(conversation)
            for qa in questions:
                wanted = [dia_ids[e] for e in evidence_ids(qa["evidence"]) if e in dia_ids]
                if wanted:
                    measures.add(conversation, history, typed(qa["question"], WHOLE), wanted)
    measures.report()


class Measures:
    """Recall quality and tokens read after Enter, gathered question by question."""

    def __init__(
        self, memory: Memory, count: Callable[[str], int], tokens: Callable[[Messages], list[int]]
    ) -> None:
        self.memory, self.count, self.tokens = memory, count, tokens
        self.at5: dict[str, list[float]] = defaultdict(list)
        self.recalled: dict[tuple[int, str], list[float]] = defaultdict(list)
        self.changed: dict[tuple[int, str], list[bool]] = defaultdict(list)
        self.top_changed: dict[tuple[int, str], list[bool]] = defaultdict(list)
        self.reread: dict[tuple[int, str, str], list[int]] = defaultdict(list)

    def add(
        self, conversation: int, history: list[Message], question: str, wanted: list[int]
    ) -> None:
        """Measure `question` after `history`, `wanted` the ids of its evidence turns."""
        memory, by_id = self.memory, {m.id: m for m in history}
        texts = {draft: typed(question, draft) for draft in (*DRAFTS, WHOLE)}
        whole = memory.relevance(question)
        for draft, text in texts.items():
            ranked = [int(i) for i in memory.rank(text, conversation).ids]
            self.at5[draft].append(share(set(ranked[:5]), wanted))
        relevance = {draft: memory.relevance(text) for draft, text in texts.items()}
        for budget in BUDGETS:
            fits = {
                draft: fit(history, text, self.count, budget, relevance=relevance[draft])
                for draft, text in texts.items()
            }
            final = fits[WHOLE].recall
            for draft, fitted in fits.items():
                key = (budget, draft)
                self.recalled[key].append(share(set(fitted.recall), wanted))
                self.changed[key].append(set(fitted.recall) != set(final))
                self.top_changed[key].append(
                    top(fitted.recall, by_id, whole) != top(final, by_id, whole)
                )
            self.add_reread(history, texts, fits, budget)

    def add_reread(
        self,
        history: list[Message],
        texts: dict[str, str],
        fits: dict[str, FittedContext],
        budget: int,
    ) -> None:
        """The tokens read after Enter under each rule, the last read-ahead at each draft."""
        tokens, question, final = self.tokens, texts[WHOLE], fits[WHOLE]
        by_id = {m.id: m for m in history}
        chosen_again = tokens(final.messages)
        after = tokens(recall_after(final, question, by_id))
        drafts = [(draft, texts[draft], fits[draft]) for draft in DRAFTS]
        for draft, text, fitted in [*drafts, (PAUSED, question, final)]:
            ahead = read_ahead(fitted, text, tokens)
            unrecalled = fit(history, text, self.count, budget, recall=())
            kept = fit(history, question, self.count, budget, recall=fitted.recall)
            for rule, enter, cached in (
                (RULES[0], chosen_again, ahead),
                (RULES[1], after, read_ahead(unrecalled, text, tokens)),
                (RULES[2], tokens(kept.messages), ahead),
            ):
                self.reread[(budget, draft, rule)].append(after_enter(enter, cached))

    def report(self) -> None:
        print(f"\n{len(self.at5[WHOLE])} questions with evidence")
        print(
            f"{'chosen from':<28}{'R@5':>6}"
            + "".join(
                f"  {'recalled@' + str(b):>13}{'set differs':>13}{'top differs':>13}"
                for b in BUDGETS
            )
        )
        for draft in (*DRAFTS, WHOLE):
            line = f"{draft:<28}{100 * np.mean(self.at5[draft]):>6.1f}"
            for budget in BUDGETS:
                key, line = (budget, draft), line + "  "
                for values in (self.recalled, self.changed, self.top_changed):
                    line += f"{100 * np.mean(values[key]):>12.1f}%"
            print(line)
        for budget in BUDGETS:
            print(f"\ntokens read after Enter, recall_tokens {budget}: mean / median / p95 / max")
            print(f"{'last read-ahead at':<28}" + "".join(f"{rule:>36}" for rule in RULES))
            for draft in (*DRAFTS, PAUSED):
                cells = [spread(self.reread[(budget, draft, rule)]) for rule in RULES]
                print(f"{draft:<28}" + "".join(f"{cell:>36}" for cell in cells))


def spread(values: list[int]) -> str:
    """Mean / median / p95 / max of `values`."""
    stats = (np.mean(values), np.median(values), np.percentile(values, 95), max(values))
    return " / ".join(f"{value:.0f}" for value in stats)


def top(
    ids: tuple[int, ...],
    by_id: dict[int, Message],
    relevance: Callable[[list[Message]], list[float]],
) -> int | None:
    """The most relevant (by `relevance`) of the recalled message ids."""
    if not ids:
        return None
    scores = relevance([by_id[i] for i in ids])
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
