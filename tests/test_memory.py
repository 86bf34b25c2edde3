"""Memory: vector index, blended search and context fitting, on real SQLite files."""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from phichat.config import EmbedderSettings
from phichat.errors import PhichatError
from phichat.memory import (
    GRID_PARTS,
    MESSAGE_ALLOWANCE,
    RECALL_CLOSE,
    RECALL_OPEN,
    TRUNCATION_MARK,
    Memory,
    VectorIndex,
    fit_context,
    rank,
    with_recall,
)
from phichat.store import Message, Store

DIM = 384


class WordEncoder:
    """A deterministic stand-in embedder: hashed bag of words, unit length."""

    model_id = "hashed-words@test"
    dim = DIM

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, zlib.crc32(word.encode()) % DIM] += 1.0
            out[row, 0] += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def embedder(minilm_dir: Path):
    """The real all-MiniLM-L6-v2 (phichat.embed), from the offline HF cache."""
    from phichat.embed import Embedder

    return Embedder.load(EmbedderSettings())


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "history.db") as opened:
        yield opened


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def contents(hits) -> list[str]:
    return [hit.message.content for hit in hits]


# --- the vector index --------------------------------------------------------------------


def test_index_appends_and_searches_like_brute_force() -> None:
    index = VectorIndex(DIM)
    vectors = unit_rows(1000)
    for start in range(0, 1000, 100):
        index.add(range(start + 1, start + 101), vectors[start : start + 100])
        assert index.nbytes <= 2 * len(index) * (DIM * 4 + 8) + 16 * (DIM * 4 + 8)
    query = vectors[123]
    hits = index.search(query, 5)
    expected = np.argsort(-(vectors @ query))[:5] + 1
    assert [i for i, _ in hits] == expected.tolist()
    assert hits[0] == (124, pytest.approx(1.0))
    assert index.search(query, 5000)[-1][0] == int(np.argmin(vectors @ query)) + 1


def test_index_finds_rows_in_any_order() -> None:
    index = VectorIndex(DIM)
    index.add([10, 20, 30], unit_rows(3))
    assert index.rows([30, 10, 99]).tolist() == [2, 0, -1]
    index.add([5, 15], unit_rows(2, seed=1))  # backfilled older messages: ids out of order
    assert index.rows([5, 30, 15, 7]).tolist() == [3, 2, 4, -1]
    rows = index.rows([15, 20])
    assert {i for i, _ in index.search(unit_rows(1, seed=2)[0], 10, rows)} == {15, 20}


def test_index_rejects_vectors_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        VectorIndex(DIM).add([1], np.zeros((1, 3), dtype=np.float32))


# --- memory over a store -----------------------------------------------------------------


def test_remembered_vectors_persist_and_reload(store: Store) -> None:
    encoder = WordEncoder()
    memory = Memory.open(store, encoder)
    chat = store.create_conversation()
    messages = [
        store.add_message(chat.id, "user", f"note number {i} about apples") for i in range(5)
    ]
    assert memory.remember(messages) == 5
    assert store.vector_count(encoder.model_id) == 5
    assert len(memory.index) == 5
    assert memory.refresh() == 0  # its own vectors are not loaded twice
    assert memory.remember(messages[:2]) == 0  # nor embedded twice

    reopened = Memory.open(store, encoder)
    assert reopened.index.ids.tolist() == [m.id for m in messages]
    np.testing.assert_array_equal(
        reopened.index.vectors(np.arange(5)), memory.index.vectors(np.arange(5))
    )


def test_search_sees_what_another_process_stored(tmp_path: Path) -> None:
    encoder = WordEncoder()
    with Store.open(tmp_path / "h.db") as mine, Store.open(tmp_path / "h.db") as theirs:
        memory = Memory.open(mine, encoder)
        chat = theirs.create_conversation()
        message = theirs.add_message(chat.id, "user", "the lighthouse keeper logbook")
        vector = encoder.encode([message.content])[0].tobytes()
        theirs.add_vectors(encoder.model_id, [(message.id, vector)])
        hits = memory.search("the lighthouse keeper logbook")
        assert hits[0].message == message
        assert hits[0].similarity == pytest.approx(1.0)
        assert len(memory.index) == 1


def test_messages_saved_without_an_embedder_are_embedded_later(store: Store) -> None:
    offline = Memory.open(store, None)
    chat = store.create_conversation()
    saved = [
        store.add_message(chat.id, "user", f"offline thought {i} on rivers") for i in range(70)
    ]
    assert offline.remember(saved) == 0
    hits = offline.search("rivers")  # exact words still work
    assert hits and all(h.keyword and h.similarity is None for h in hits)
    # offline, recall goes by exact words: a message sharing none is not recalled
    assert all(score > 0 for score in offline.relevance("rivers")(saved[:3]))
    assert offline.relevance("lakes")(saved[:3]) == [0.0, 0.0, 0.0]

    encoder = WordEncoder()
    memory = Memory.open(store, encoder)
    assert len(memory.index) == 0
    assert memory.backfill(batch=32) == 70
    assert store.missing_vectors(encoder.model_id) == []
    assert memory.search("offline thought 42 on rivers")[0].message == saved[42]


def test_search_can_stay_within_one_conversation(store: Store) -> None:
    encoder = WordEncoder()
    memory = Memory.open(store, encoder)
    first, second = store.create_conversation(), store.create_conversation()
    a = store.add_message(first.id, "user", "blue whales sing")
    b = store.add_message(second.id, "user", "blue whales sing loudly")
    memory.remember([a, b])
    assert {h.message.id for h in memory.search("blue whales sing")} == {a.id, b.id}
    assert [h.message.id for h in memory.search("blue whales sing", conversation_id=second.id)] == [
        b.id
    ]


def test_a_rare_token_is_found_first(store: Store) -> None:
    memory = Memory.open(store, WordEncoder())
    chat = store.create_conversation()
    noise = [
        "the build failed with an error again",
        "error in the build, failed to link",
        "another error code showed up in the logs",
        "the compiler printed an error and a warning",
    ]
    saved = [store.add_message(chat.id, "user", text) for text in noise * 10]
    target = store.add_message(chat.id, "assistant", "that one is ERR_4711, a stale lock file")
    memory.remember([*saved, target])
    hits = memory.search("ERR_4711", k=5)
    assert hits[0].message == target
    assert hits[0].keyword
    assert not any(h.keyword for h in hits[1:])


# --- the real embedder -------------------------------------------------------------------

TOPICS = {
    "The train to Berlin was delayed by two hours because of a signal failure.": (
        "why was my rail journey to Germany late"
    ),
    "I adopted a kitten from the shelter last week and she sleeps on my keyboard.": (
        "new pet at home that naps on the computer"
    ),
    "Our quarterly revenue dropped 12 percent after the product recall.": (
        "sales went down following the defective item withdrawal"
    ),
    "Remember to water the tomato plants every morning during the heatwave.": (
        "garden vegetables need irrigation when it is hot"
    ),
    "The Python script crashes with a segmentation fault when loading the shared library.": (
        "program dies with a memory access violation importing a native module"
    ),
    "We are planning a hiking trip in the Alps next August.": (
        "mountain walking holiday this summer"
    ),
}
DISTRACTORS = [
    "Can you recommend a good book about the history of Rome?",
    "How many tablespoons are in a cup?",
    "Write a haiku about ice hockey.",
    "What is the difference between a list and a tuple?",
    "My favourite colour is green.",
    "Translate 'good morning' into Spanish.",
]


def test_paraphrased_queries_find_the_on_topic_message_first(store: Store, embedder) -> None:
    memory = Memory.open(store, embedder)
    chat = store.create_conversation()
    saved = [store.add_message(chat.id, "user", text) for text in [*TOPICS, *DISTRACTORS]]
    memory.remember(saved)
    for text, query in TOPICS.items():
        hits = memory.search(query, k=3)
        assert hits[0].message.content == text, (query, contents(hits))
        assert not hits[0].keyword  # found by meaning: the words differ


def test_a_rare_token_is_found_first_with_the_real_embedder(store: Store, embedder) -> None:
    memory = Memory.open(store, embedder)
    chat = store.create_conversation()
    texts = [
        *TOPICS,
        "The build failed with error E1234 in the linker.",
        "Compilation error: undefined reference to main.",
        "Error code 500 from the server after deploy.",
        "Deploy failed: ERR_4711 stale lock file in /var/run.",
    ]
    memory.remember([store.add_message(chat.id, "user", text) for text in texts])
    hits = memory.search("ERR_4711", k=3)
    assert hits[0].message.content == texts[-1]
    assert hits[0].keyword


# --- fitting the context window ----------------------------------------------------------


def count_words(text: str) -> int:
    return math.ceil(len(text.split()) * 1.3)


def conversation(turns: int, fact_at: int | None = None, answer_words: int = 30) -> list[Message]:
    """A chat of `turns` question/answer pairs; the cat fact is the question of turn `fact_at`."""
    history = []
    for t in range(turns):
        question = f"Turn {t}: tell me something about subject {t} and its history please."
        if t == fact_at:
            question = "By the way, my cat is named Pixel and she is three years old."
        answer = f"Here is an answer about subject {t}: " + " ".join(
            f"word{t}x{w}" for w in range(answer_words)
        )
        history.append(Message(2 * t + 1, 1, "user", question, 0.0))
        history.append(Message(2 * t + 2, 1, "assistant", answer, 0.0))
    return history


def overlap_relevance(new_text: str):
    words = set(re.findall(r"\w+", new_text.lower()))

    def score(messages: list[Message]) -> list[float]:
        return [len(words & set(re.findall(r"\w+", m.content.lower()))) / 10 for m in messages]

    return score


def prompt_cost(fitted, overhead: int = 8) -> int:
    return sum(count_words(m["content"]) + overhead for m in fitted.messages)


def test_everything_is_kept_while_it_fits() -> None:
    history = conversation(5)
    fitted = fit_context("Be brief.", history, "And now?", count_words, 4096, 512)
    expected = [{"role": "system", "content": "Be brief."}]
    expected += [{"role": m.role, "content": m.content} for m in history]
    assert fitted.messages == [*expected, {"role": "user", "content": "And now?"}]
    assert (fitted.dropped, fitted.recalled, fitted.truncated) == (0, 0, 0)
    assert fitted.tokens == prompt_cost(fitted)
    no_system = fit_context("", history, "And now?", count_words, 4096, 512)
    assert no_system.messages == fitted.messages[1:]


def test_long_conversation_fits_and_recalls_an_early_fact() -> None:
    history = conversation(200, fact_at=3)
    new = "What is the name of my cat?"
    fitted = fit_context(
        "You are helpful.", history, new, count_words, 2048, 512, overlap_relevance(new), 200
    )
    assert fitted.tokens == prompt_cost(fitted) <= 2048 - 512
    assert fitted.dropped > 300
    assert fitted.recall[0] == history[6].id  # the fact (the oldest recalled message)
    assert list(fitted.recall) == sorted(fitted.recall)  # in the order they were written
    assert fitted.recalled == len(fitted.recall)
    by_id = {m.id: m for m in history}
    texts = [m["content"] for m in fitted.messages]
    assert texts[0] == "You are helpful."
    # recalled turns come last, in the new message, before its text and marked as earlier
    assert texts[-1] == with_recall(new, [by_id[i] for i in fitted.recall])
    assert texts[-1].startswith(RECALL_OPEN) and texts[-1].endswith(f"{RECALL_CLOSE}\n\n{new}")
    assert history[6].content in texts[-1]
    assert texts[-3:-1] == [history[-2].content, history[-1].content]  # the newest turn is kept
    kept = [m.content for m in history if m.content in texts]
    assert texts[1:-1] == kept  # the kept turns, in order, right after the system message
    assert len(kept) + fitted.recalled == len(history) - fitted.dropped


def test_recall_stays_within_its_budget() -> None:
    history = conversation(200, fact_at=3)
    new = "What is the name of my cat?"
    relevance = overlap_relevance(new)
    none = fit_context("", history, new, count_words, 2048, 512, relevance, recall_tokens=0)
    assert none.recall == () and none.messages[-1]["content"] == new
    small = fit_context("", history, new, count_words, 2048, 512, relevance, recall_tokens=40)
    assert small.recall == ()  # the fact's turn costs more than 40 tokens: nothing recalled
    for budget in (100, 300, 600):
        fitted = fit_context("", history, new, count_words, 2048, 512, relevance, budget)
        block = count_words(fitted.messages[-1]["content"]) - count_words(new)
        assert 0 < block <= budget
        assert fitted.tokens <= 2048 - 512


@pytest.mark.slow
def test_long_conversation_recalls_by_meaning_with_the_real_embedder(
    store: Store, embedder
) -> None:
    chat = store.create_conversation()
    turns = conversation(200, fact_at=3, answer_words=2)  # short: embedding is the slow part
    history = [store.add_message(chat.id, m.role, m.content) for m in turns]
    new = "Do you remember what my kitty is called?"
    memory = Memory.open(store, embedder)
    fitted = fit_context("", history, new, count_words, 1024, 256, memory.relevance(new), 128)
    texts = [m["content"] for m in fitted.messages]
    assert history[6].id in fitted.recall
    assert history[6].content in texts[-1] and texts[-1].endswith(new)
    assert history[-2].content in texts
    assert fitted.dropped > 200
    assert fitted.tokens <= 1024 - 256


def chat_along(history_all: list[Message], recall_tokens: int, keep_recall: bool = True):
    """Send the questions of `history_all` one by one (its answers as the answers), as a
    session does: each question saved with the ids recalled for it (unless not
    `keep_recall`). Yields (the fitted prompt, the previous one with its answer appended)."""
    history: list[Message] = []
    grown = None
    for t in range(len(history_all) // 2):
        question, answer = history_all[2 * t], history_all[2 * t + 1]
        fitted = fit_context(
            "System.",
            history,
            question.content,
            count_words,
            2048,
            512,
            overlap_relevance(question.content),
            recall_tokens,
        )
        yield fitted, grown
        history += [replace(question, recalled=fitted.recall if keep_recall else ()), answer]
        grown = [*fitted.messages, {"role": "assistant", "content": answer.content}]


def test_the_prompt_prefix_stays_stable_from_turn_to_turn() -> None:
    history_all = conversation(200)
    kept_prefix = moved = overflowed = recalled = 0
    for fitted, grown in chat_along(history_all, recall_tokens=150):
        if fitted.dropped == 0:
            assert [m["content"] for m in fitted.messages[1:-1]] == [
                m.content for m in history_all[: len(fitted.messages) - 2]
            ]
            continue
        overflowed += 1
        recalled += fitted.recalled > 0
        if fitted.messages[: len(grown)] == grown:  # only the answer and the new message added
            kept_prefix += 1
        else:
            moved += 1
    assert overflowed > 150
    assert recalled >= 0.9 * overflowed  # every question shares words with older ones
    assert kept_prefix >= 0.7 * overflowed  # a cut that followed each turn would keep none
    # the cut jumps a fraction of the window at a time, never one turn at a time
    turn_cost = count_words(history_all[0].content) + count_words(history_all[1].content) + 16
    grid = (2048 - 512 - count_words("System.") - 8) // GRID_PARTS
    assert moved <= math.ceil(overflowed * (turn_cost + 150) / (grid - turn_cost - 150)) + 1


def test_recall_that_is_not_kept_with_its_message_moves_the_prefix_every_turn() -> None:
    """The trap the stored recall avoids: a recall block chosen anew, and dropped at the next
    turn, changes the prompt right after the kept turns every time."""
    history_all = conversation(200)
    kept = [
        fitted.messages[: len(grown)] == grown
        for fitted, grown in chat_along(history_all, recall_tokens=150, keep_recall=False)
        if fitted.dropped
    ]
    assert sum(kept) <= 0.1 * len(kept)


def test_a_message_too_long_for_the_window_is_a_clear_error() -> None:
    huge = "word " * 2000
    with pytest.raises(PhichatError, match="2048-token context") as caught:
        fit_context("System.", conversation(3), huge, count_words, 2048, 512)
    assert "\n" not in str(caught.value)


def test_a_huge_last_answer_is_cut_and_marked() -> None:
    history = conversation(3)
    history[-1] = Message(6, 1, "assistant", "long " * 3000, 0.0)
    fitted = fit_context("", history, "Summarize that.", count_words, 2048, 512)
    assert fitted.truncated == 1
    assert fitted.tokens == prompt_cost(fitted) <= 2048 - 512
    assert fitted.messages[-3]["content"] == history[-2].content  # the question, whole
    cut = fitted.messages[-2]["content"]
    assert cut.endswith(TRUNCATION_MARK) and cut.startswith("long long")
    assert fitted.dropped == 4


def test_per_message_overhead_counts() -> None:
    history = conversation(20)
    lean = fit_context("", history, "next", count_words, 2048, 512, per_message_overhead=0)
    heavy = fit_context("", history, "next", count_words, 2048, 512, per_message_overhead=60)
    assert lean.dropped == 0
    assert heavy.dropped > 0
    assert heavy.tokens == prompt_cost(heavy, overhead=60) <= 2048 - 512


# --- the ranking, on real words and the real embedder -----------------------------------------

CHATTER = [
    "Sam: I went to the market this morning and bought some bread.",
    "Alex: Nice, was it busy at this hour?",
    "Sam: Not really, most stalls were still setting up.",
    "Alex: I spent the weekend fixing my bike's brakes.",
    "Sam: Did you manage to get the parts you needed?",
    "Alex: Yes, the shop down the road had everything.",
    "Sam: My sister is visiting next month with her kids.",
    "Alex: That sounds like a lot of fun, where will they stay?",
    "Sam: With us, we have a spare room now that the office moved.",
    "Alex: The weather has been so grey lately, I miss the sun.",
]


def chat_with(store: Store, memory: Memory, turns: list[str]) -> list[Message]:
    chat = store.create_conversation()
    saved = [
        store.add_message(chat.id, ("user", "assistant")[i % 2], text)
        for i, text in enumerate(turns)
    ]
    memory.remember(saved)
    return saved


def test_a_reply_ranks_with_the_question_before_it() -> None:
    # message 2 matches the query; 3 replies to it; 6 is as plain as 3 but beside nothing
    similarity = np.array([0.1, 0.2, 0.8, 0.2, 0.1, 0.2, 0.2, 0.1])
    words = np.array([0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    positions = np.arange(len(words))
    before, after = np.maximum(positions - 1, 0), np.minimum(positions + 1, len(words) - 1)
    scores = rank(similarity, words, before, after)
    assert set(np.argsort(-scores)[:3]) == {1, 2, 3}  # it and the messages beside it
    assert scores[3] > scores[6] and scores[1] > scores[5]
    # no vector (NaN) counts as average, not as a match
    assert rank(np.where(positions == 2, np.nan, similarity), words, before, after)[2] < scores[2]


def test_words_are_stemmed_and_any_of_them_ranks(store: Store, embedder) -> None:
    memory = Memory.open(store, embedder)
    saved = chat_with(store, memory, [*CHATTER, "Sam: The script reverses every line it reads."])
    hits = memory.search("which tool reversed the lines", 1, saved[0].conversation)
    assert hits[0].message.id == saved[-1].id and hits[0].keyword


@pytest.mark.slow
def test_nothing_unrelated_is_recalled_into_the_prompt(store: Store, embedder) -> None:
    memory = Memory.open(store, embedder)
    facts = ["Sam: My cat is called Pixel and she is three years old.", "Alex: Pixel, lovely!"]
    saved = chat_with(store, memory, [*facts, *CHATTER * 8])
    related = "What is the name of Sam's cat?"
    unrelated = "How do I reverse a linked list in Python?"
    for new, wanted in ((related, saved[0].id), (unrelated, None)):
        fitted = fit_context("", saved, new, count_words, 512, 128, memory.relevance(new), 64)
        assert fitted.dropped > 0
        assert (wanted in fitted.recall) if wanted else fitted.recall == ()


def test_where_the_cut_goes_is_known_before_a_short_message_is_written() -> None:
    """With an allowance, an empty draft (what is read right after an answer) and any message
    up to the allowance keep the same history, turn after turn as the conversation grows; a
    longer message may move the cut further."""
    words = " ".join(f"w{i}" for i in range(150))  # 195 tokens by count_words

    def kept(history: list[Message], text: str, allowance: int) -> list[dict[str, str]]:
        fitted = fit_context("Sys.", history, text, count_words, 2048, 512, allowance=allowance)
        return fitted.messages[:-1]

    firsts, differ_without = [], 0
    for turns in range(20, 60):
        history = conversation(turns)
        after_answer = kept(history, "", MESSAGE_ALLOWANCE)
        assert kept(history, "Why?", MESSAGE_ALLOWANCE) == after_answer
        assert kept(history, words, MESSAGE_ALLOWANCE) == after_answer
        differ_without += kept(history, "", 0) != kept(history, words, 0)
        firsts.append(after_answer[1]["content"])  # the oldest message kept
    assert len(set(firsts)) >= 3  # the cut did move over these turns
    assert differ_without >= 3  # without the allowance, a message's length moves it
    long_message = " ".join(f"w{i}" for i in range(800))
    fitted = fit_context(
        "Sys.", conversation(40), long_message, count_words, 2048, 512, allowance=MESSAGE_ALLOWANCE
    )
    assert fitted.tokens <= 2048 - 512  # a longer message still fits, with less history
