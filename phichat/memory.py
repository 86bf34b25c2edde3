"""Memory: finding past messages by meaning and by exact words, and fitting a conversation into
the model's context window.

Search ranks by two signals: cosine similarity over every stored message's unit float32 vector
(one contiguous matrix, appended to as messages arrive), and BM25 over message text (SQLite FTS5,
stemmed, any of the query's content words). Each is put on one scale, standard deviations above
the mean of the messages searched (z-scores), and the two are added; a message is scored alone
and, the better of the two, joined with the message before or after it, since what a question
asks for often sits in the reply to it, or in the question a reply answers. The embedder is any
object with `model_id` and `encode(texts)`; the tokenizer is a plain `count_tokens` callable,
so this module never imports llama.cpp.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from phichat.errors import PhichatError, UsageError
from phichat.store import Message, Role, Store, check_search_text

if TYPE_CHECKING:
    import numpy as np

    from phichat.config import EmbedderSettings

SEARCH_DEPTH = 50  # across conversations: the best this many by each signal, and neighbours
# Recalled into a prompt only above this cosine to the new message (alone or averaged over an
# exchange with a neighbour): all-MiniLM-L6-v2 puts unrelated chat near 0.1-0.2 and related
# turns above 0.3. Without an embedder, only messages sharing a word are recalled.
RECALL_MIN_SIMILARITY = 0.25
TRUNCATION_MARK = "\n[…truncated]"
MIN_TRUNCATED_TOKENS = 16  # a message cut shorter than this is dropped instead
GRID_PARTS = 2  # the cut into old history moves in steps of 1/GRID_PARTS of the window
# room kept for the next message however short it is (at most 1/8 of the window): the cut then
# depends on the history alone for messages up to this size, so it is known, and read ahead,
# as soon as an answer ends
MESSAGE_ALLOWANCE = 256
RECALL_OPEN = "[Earlier in this conversation, recalled for the message below]"
RECALL_CLOSE = "[End of the earlier messages]"


class Encoder(Protocol):
    """What memory needs from an embedder (phichat.embed.Embedder fits)."""

    model_id: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 rows, one per text."""
        ...


class VectorIndex:
    """Message ids and their unit vectors in one contiguous float32 matrix; capacity doubles
    when full, so appending never reloads and memory stays under twice the vectors' size."""

    def __init__(self, dim: int, capacity: int = 0) -> None:
        import numpy as np

        self.dim = dim
        self._ids = np.empty(capacity, dtype=np.int64)
        self._matrix = np.empty((capacity, dim), dtype=np.float32)
        self._size = 0
        self._ascending = True  # ids were added in increasing order (the usual case)
        self._order: np.ndarray | None = None  # cached argsort of ids otherwise

    def __len__(self) -> int:
        return self._size

    @property
    def ids(self) -> np.ndarray:
        """Message ids, in the order their vectors were added."""
        return self._ids[: self._size]

    @property
    def nbytes(self) -> int:
        """Memory held by the index, spare capacity included."""
        return self._ids.nbytes + self._matrix.nbytes

    def _reserve(self, size: int) -> None:
        import numpy as np

        if size <= len(self._ids):
            return
        capacity = max(size, 2 * len(self._ids), 16)
        ids = np.empty(capacity, dtype=np.int64)
        matrix = np.empty((capacity, self.dim), dtype=np.float32)
        ids[: self._size] = self.ids
        matrix[: self._size] = self._matrix[: self._size]
        self._ids, self._matrix = ids, matrix

    def add(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Append vectors (shape [n, dim]) for these message ids."""
        import numpy as np

        n = len(ids)
        if vectors.shape != (n, self.dim):
            raise ValueError(f"expected vectors of shape ({n}, {self.dim}), got {vectors.shape}")
        if n == 0:
            return
        self._reserve(self._size + n)
        new = self._ids[self._size : self._size + n]
        new[:] = ids
        self._matrix[self._size : self._size + n] = vectors
        if self._ascending:
            after_last = self._size == 0 or new[0] > self._ids[self._size - 1]
            self._ascending = bool(after_last and np.all(new[1:] > new[:-1]))
        self._size += n
        self._order = None

    def rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions of these message ids in the index (-1 where absent)."""
        import numpy as np

        wanted = np.asarray(ids, dtype=np.int64)
        if self._size == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        if self._ascending:
            sorted_ids = self.ids
        else:
            if self._order is None:
                self._order = np.argsort(self.ids, kind="stable")
            sorted_ids = self.ids[self._order]
        at = np.searchsorted(sorted_ids, wanted).clip(0, self._size - 1)
        rows = at if self._order is None else self._order[at]
        return np.where(sorted_ids[at] == wanted, rows, -1)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The vectors at these row positions."""
        return self._matrix[rows]

    def search(
        self, query: np.ndarray, k: int, rows: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """The k (message id, cosine) pairs nearest `query`, best first; among `rows` if given."""
        import numpy as np

        matrix = self._matrix[: self._size] if rows is None else self._matrix[rows]
        scores = matrix @ query
        k = min(k, len(scores))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        where = top if rows is None else rows[top]
        return [(int(i), float(s)) for i, s in zip(self._ids[where], scores[top], strict=True)]


@dataclass(frozen=True)
class Hit:
    """One search result: the message, its ranking score (a sum of z-scores: it orders results
    within one search, it is not a similarity), its cosine similarity to the query (None
    without an embedder or vector) and whether it holds the query's exact words."""

    message: Message
    score: float
    similarity: float | None
    keyword: bool


@dataclass(frozen=True)
class Ranking:
    """Messages scored for one query, best first: ids, scores, cosine similarities (NaN where
    a message has no vector), BM25 scores (0 where no word matched) and, for the recall floor,
    each message's best similarity alone or averaged with a neighbour."""

    ids: np.ndarray
    scores: np.ndarray
    similarity: np.ndarray
    words: np.ndarray
    related: np.ndarray


def _z(values: np.ndarray) -> np.ndarray:
    """`values` in standard deviations from their mean (zeros where they do not vary)."""
    std = float(values.std()) if len(values) else 0.0
    return (values - values.mean()) / std if std > 0 else values * 0.0


def rank(
    similarity: np.ndarray, words: np.ndarray, before: np.ndarray, after: np.ndarray
) -> np.ndarray:
    """The score of each message of a pool from its cosine `similarity` to the query (NaN: no
    vector, counted as average) and BM25 `words` score (0: no match), where `before[i]` and
    `after[i]` are the pool positions of its neighbours in its conversation (i itself at an
    end): both signals as z-scores over the pool, the message alone plus the better of it
    joined with the message before or after it."""
    import numpy as np

    known = ~np.isnan(similarity)
    similarity = np.where(known, similarity, similarity[known].mean() if known.any() else 0.0)

    def together(other: np.ndarray) -> np.ndarray:
        return _z(similarity + similarity[other]) + _z(words + words[other])

    return _z(similarity) + _z(words) + np.maximum(together(before), together(after))


def similarity_text(hit: Hit) -> str:
    """How a result matched, in 5 characters: its cosine similarity, or "words" where only its
    exact words matched (no vector for it, or no embedder)."""
    return "words" if hit.similarity is None else f"{hit.similarity:5.3f}"


WORDS_ONLY = "search matches exact words only"  # what search does without the embedder


def load_embedder(
    settings: EmbedderSettings, threads: int = 0, without: str = WORDS_ONLY
) -> tuple[Encoder | None, str | None]:
    """The embedder search ranks by meaning with, for the app and the command line alike;
    or, where it cannot load (not downloaded, offline), None and the line that says so:
    "{without}: {why}", `without` saying what the caller does instead."""
    from phichat.embed import Embedder

    try:
        return Embedder.load(settings, threads=threads), None
    except PhichatError as exc:
        return None, f"{without}: {exc}"


class Memory:
    """Search over a store's messages; keeps its vector index in step with the store.

    Without an embedder (not downloaded, offline) search falls back to exact words only, and
    messages saved meanwhile are embedded later by `backfill()`.
    """

    def __init__(self, store: Store, embedder: Encoder | None, index: VectorIndex) -> None:
        self.store = store
        self.embedder = embedder
        self.index = index
        self._seen = 0  # highest vector row id loaded from the store
        self._lock = threading.Lock()

    @classmethod
    def open(cls, store: Store, embedder: Encoder | None) -> Memory:
        """Load every vector `embedder` has in the store, ready to search."""
        if embedder is None:
            return cls(store, None, VectorIndex(0))
        count = store.vector_count(embedder.model_id)
        memory = cls(store, embedder, VectorIndex(embedder.dim, count + max(count // 16, 64)))
        memory.refresh()
        return memory

    def refresh(self) -> int:
        """Load vectors stored since the last look (by other processes too); returns how many."""
        if self.embedder is None:
            return 0
        import numpy as np

        added = 0
        with self._lock:
            for last, ids, blob in self.store.vector_chunks(self.embedder.model_id, self._seen):
                vectors = np.frombuffer(blob, dtype=np.float32).reshape(len(ids), -1)
                new = self.index.rows(ids) < 0  # remember() added ours already
                if new.all():
                    self.index.add(ids, vectors)
                else:
                    self.index.add(np.asarray(ids)[new], vectors[new])
                self._seen = last
                added += int(new.sum())
        return added

    def remember(self, messages: Sequence[Message]) -> int:
        """Embed these messages, store their vectors and add them to the index; returns how
        many (0 without an embedder: `backfill()` catches up later)."""
        if self.embedder is None or not messages:
            return 0
        import numpy as np

        model_id = self.embedder.model_id
        vectors = np.asarray(self.embedder.encode([m.content for m in messages]), np.float32)
        with self._lock:  # so a concurrent refresh() cannot load them a second time
            new = self.index.rows([m.id for m in messages]) < 0
            fresh = [m.id for m, is_new in zip(messages, new, strict=True) if is_new]
            self.store.add_vectors(model_id, zip(fresh, map(bytes, vectors[new]), strict=True))
            self.index.add(fresh, vectors[new])
        return len(fresh)

    def backfill(self, batch: int = 64, pause: Callable[[], None] | None = None) -> int:
        """Embed every stored message that has no vector for this embedder yet (none on a
        read-only store, where nothing can be saved), `batch` at a time, calling `pause()`
        before each batch (it may wait)."""
        if self.embedder is None or self.store.read_only:
            return 0
        done = 0
        while True:
            if pause is not None:
                pause()
            missing = self.store.missing_vectors(self.embedder.model_id, batch)
            if not missing:
                return done
            done += self.remember(missing)

    def _similarities(self, ids: Sequence[int], query: np.ndarray | None) -> np.ndarray:
        """Cosine of each message to `query` (NaN where it has no vector, or no query)."""
        import numpy as np

        if query is None:
            return np.full(len(ids), np.nan, dtype=np.float32)
        with self._lock:
            rows = self.index.rows(ids)
            vectors = self.index.vectors(rows.clip(0))
        return np.where(rows >= 0, vectors @ query, np.nan)

    def rank(self, text: str, conversation_id: int | None = None) -> Ranking:
        """Messages scored for `text` (see `rank`), best first: every message of one
        conversation, or across conversations the best SEARCH_DEPTH by meaning and by words,
        with the messages beside them."""
        import numpy as np

        query = None if self.embedder is None else self.embedder.encode([text])[0]
        if conversation_id is not None:
            ids = self.store.message_ids(conversation_id)
            matched = dict(self.store.keyword_search(text, max(len(ids), 1), conversation_id))
            before = np.maximum(np.arange(len(ids)) - 1, 0)
            after = np.minimum(np.arange(len(ids)) + 1, max(len(ids) - 1, 0))
        else:
            matched = dict(self.store.keyword_search(text, SEARCH_DEPTH))
            with self._lock:
                near = [] if query is None else self.index.search(query, SEARCH_DEPTH)
            found = {*matched, *(i for i, _ in near)}
            beside = {i for pair in self.store.neighbours(found).values() for i in pair if i}
            ids = sorted(found | beside)
            links = self.store.neighbours(ids)
            at = {message_id: position for position, message_id in enumerate(ids)}
            ends = [links.get(i, (None, None)) for i in ids]
            before = np.array([at.get(b or 0, p) for p, (b, _) in enumerate(ends)], dtype=int)
            after = np.array([at.get(a or 0, p) for p, (_, a) in enumerate(ends)], dtype=int)
        similarity = self._similarities(ids, query)
        words = np.array([matched.get(i, 0.0) for i in ids], dtype=np.float64)
        scores = rank(similarity, words, before, after)
        related = np.fmax(
            similarity, np.fmax(similarity + similarity[before], similarity + similarity[after]) / 2
        )
        order = np.argsort(-scores, kind="stable")
        return Ranking(
            np.asarray(ids, dtype=np.int64)[order],
            scores[order],
            similarity[order],
            words[order],
            related[order],
        )

    def search(self, text: str, k: int = 10, conversation_id: int | None = None) -> list[Hit]:
        """The k messages that best match `text` by meaning and exact words, best first;
        only within one conversation if `conversation_id` is given. UsageError for a query
        with no word in it (it would match everything)."""
        import numpy as np

        check_search_text(text)
        self.refresh()
        ranking = self.rank(text, conversation_id)
        # a hit matches by meaning (it has a vector) or by words; a neighbour alone is none
        matching = np.flatnonzero(~np.isnan(ranking.similarity) | (ranking.words > 0))[:k]
        found = self.store.messages_by_id(int(ranking.ids[n]) for n in matching)
        return [
            Hit(
                found[int(ranking.ids[n])],
                float(ranking.scores[n]),
                None if np.isnan(ranking.similarity[n]) else float(ranking.similarity[n]),
                bool(ranking.words[n] > 0),
            )
            for n in matching
            if int(ranking.ids[n]) in found
        ]

    def relevance(self, text: str) -> Callable[[list[Message]], list[float]]:
        """A relevance function for fit_context: for messages of one conversation, a positive
        score in the order of that conversation's ranking for `text`, or 0 for a message
        not to recall: under RECALL_MIN_SIMILARITY (alone and with either neighbour), or
        without an embedder one that shares no word with `text`. Messages not indexed yet
        are embedded (and stored) first."""

        def score(messages: list[Message]) -> list[float]:
            if not messages:
                return []
            if self.embedder is not None and not self.store.read_only:
                with self._lock:
                    unindexed = self.index.rows([m.id for m in messages]) < 0
                self.remember([m for m, new in zip(messages, unindexed, strict=True) if new])
            ranking = self.rank(text, messages[0].conversation)
            if self.embedder is None:
                eligible = ranking.words > 0
            else:
                eligible = ranking.related >= RECALL_MIN_SIMILARITY
            lowest = float(ranking.scores.min()) if len(ranking.scores) else 0.0
            scores = {
                int(i): float(s) - lowest + 1.0 if ok else 0.0
                for i, s, ok in zip(ranking.ids, ranking.scores, eligible, strict=True)
            }
            return [scores.get(m.id, 0.0) for m in messages]

        return score


# --- fitting a conversation into the context window ----------------------------------------


@dataclass(frozen=True)
class FittedContext:
    """What the model sees this turn: `messages` (role/content dicts: system, history, the new
    user message), with `dropped` history messages left out, `recalled` older ones brought
    back by relevance into the new message (their ids in `recall`, to be kept with it),
    `truncated` ones cut short (marked), and an estimate of its `tokens`."""

    messages: list[dict[str, str]]
    dropped: int
    recalled: int
    truncated: int
    tokens: int
    recall: tuple[int, ...] = ()


def with_recall(text: str, recalled: Sequence[Message]) -> str:
    """A user message as the model sees it: the older messages recalled for it first, marked
    as earlier context, in the same user turn (Phi-3's template keeps user turns, where it
    drops system messages, and a user turn of its own would get an answer of its own)."""
    if not recalled:
        return text
    lines = [f"{str(m.role).capitalize()}: {m.content}" for m in recalled]
    return "\n\n".join([RECALL_OPEN, *lines, RECALL_CLOSE, text])


def _turns(history: Sequence[Message]) -> list[range]:
    """Index ranges of turns: a user message and the answers after it."""
    starts = [i for i, m in enumerate(history) if m.role == Role.USER or i == 0]
    return [range(a, b) for a, b in zip(starts, [*starts[1:], len(history)], strict=True)]


def _cut_head(text: str, limit: int, count_tokens: Callable[[str], int]) -> str:
    """The longest head of `text`, ended at a space where possible, that with the truncation
    mark counts at most `limit` tokens."""
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if count_tokens(text[:mid] + TRUNCATION_MARK) <= limit:
            low = mid
        else:
            high = mid - 1
    space = text.rfind(" ", 0, low + 1)
    end = space if space > low // 2 else low
    return text[:end].rstrip() + TRUNCATION_MARK


def fit_context(
    system: str,
    history: Sequence[Message],
    new_text: str,
    count_tokens: Callable[[str], int],
    n_ctx: int,
    reserve: int,
    relevance: Callable[[list[Message]], list[float]] | None = None,
    recall_tokens: int = 0,
    recall: Sequence[int] | None = None,
    per_message_overhead: int = 8,
    allowance: int = 0,
) -> FittedContext:
    """Fit system + history + the new user message into n_ctx tokens, leaving `reserve` for
    the answer.

    The prompt serves llama.cpp's cache: what stays the same between turns comes first, so
    each turn is read from where the last one ended. While everything fits the result is
    exactly system + all history + new. Otherwise whole turns (a user message and its
    answers) are kept newest first, and the cut into old history snaps forward to a grid of
    1/GRID_PARTS window, measured from the conversation's start, so it stays put for several
    turns. With `relevance` (scores for older messages, e.g. cosine to the new message), up
    to `recall_tokens` of the most relevant older messages are recalled into the new message,
    before its text and marked as earlier context (`with_recall`); their ids are returned in
    `recall`, to be saved with the message (Message.recalled), so each later prompt shows
    the message exactly as it was sent and only grows by appending until the cut moves.
    `recall` given (an answer given again) recalls those ids instead of choosing. The history
    is fitted as if the new message took at least `allowance` tokens (at most 1/8 of the
    budget), so that where the cut goes does not depend on a message up to that size. If even
    the newest turn does not fit, its longest message is cut and marked with TRUNCATION_MARK.
    Raises UsageError (bad input: exit 2) when the new message itself cannot fit.
    `count_tokens` is called on every message; memoize it for long conversations.
    """

    def cost(text: str) -> int:
        return count_tokens(text) + per_message_overhead

    by_id = {m.id: m for m in history}

    def as_sent(message: Message) -> str:
        return with_recall(message.content, [by_id[i] for i in message.recalled if i in by_id])

    budget = n_ctx - reserve
    system_cost = cost(system) if system else 0
    new_cost = cost(new_text)
    head = [{"role": "system", "content": system}] if system else []
    if system_cost + new_cost > budget:
        room = max(0, budget - system_cost - per_message_overhead)
        raise UsageError(
            f"the message is {new_cost - per_message_overhead} tokens, but the {n_ctx}-token "
            f"context has room for {room} (after the system prompt and {reserve} tokens kept "
            "for the answer): shorten it or raise --ctx"
        )
    whole = [{"role": m.role, "content": as_sent(m)} for m in history]
    costs = [cost(m["content"]) for m in whole]
    room = budget - system_cost - new_cost
    room -= min(max(0, min(allowance, budget // 8) - new_cost), room // 2)
    if sum(costs) <= room:
        tail = [{"role": "user", "content": new_text}]
        return FittedContext(head + whole + tail, 0, 0, 0, system_cost + sum(costs) + new_cost)

    turns = _turns(history)
    turn_costs = [sum(costs[i] for i in turn) for turn in turns]
    starts = [0]  # starts[t]: tokens in the turns before turn t
    for c in turn_costs:
        starts.append(starts[-1] + c)
    recalls = relevance is not None or recall is not None
    recall_room = min(recall_tokens, room // 2) if recalls else 0
    recent_room = room - recall_room
    first = next(t for t in range(len(turns) + 1) if starts[-1] - starts[t] <= recent_room)
    grid = max(1, (budget - system_cost) // GRID_PARTS)
    snapped = math.ceil(starts[first] / grid) * grid
    cut = next((t for t in range(first, len(turns)) if starts[t] >= snapped), first)

    kept: list[dict[str, str]] = [whole[i] for turn in turns[cut:] for i in turn]
    kept_count, truncated, used = len(kept), 0, starts[-1] - starts[cut]
    if cut == len(turns):  # not even the newest turn fits whole: cut its longest message
        last = list(turns[-1])
        longest = max(last, key=lambda i: costs[i])
        others = sum(costs[i] for i in last) - costs[longest]
        limit = recent_room - others - per_message_overhead
        if limit >= MIN_TRUNCATED_TOKENS:
            cut_text = _cut_head(history[longest].content, limit, count_tokens)
            kept = [
                {"role": history[i].role, "content": cut_text} if i == longest else whole[i]
                for i in last
            ]
            kept_count, truncated = len(kept), 1
            used = others + cost(cut_text)

    old = len(turns) - 1 if truncated else cut  # turns before the kept ones
    marks = count_tokens(f"{RECALL_OPEN}\n\n{RECALL_CLOSE}\n\n")
    free = min(recall_room, room - used) - marks
    chosen = _recall(history, turns[:old], cost, free, relevance, recall) if recalls else []
    recalled = [history[i] for i in chosen]
    text = with_recall(new_text, recalled)
    while recalled and cost(text) - new_cost > free + marks:  # estimates were short: drop one
        recalled.pop()
        text = with_recall(new_text, recalled)
    messages = [*head, *kept, {"role": "user", "content": text}]
    dropped = len(history) - kept_count - len(recalled)
    tokens = system_cost + used + cost(text)
    return FittedContext(
        messages, dropped, len(recalled), truncated, tokens, tuple(m.id for m in recalled)
    )


def _recall(
    history: Sequence[Message],
    old: Sequence[range],
    cost: Callable[[str], int],
    free: int,
    relevance: Callable[[list[Message]], list[float]] | None,
    recall: Sequence[int] | None,
) -> list[int]:
    """Indexes (in `history`, oldest first) of the messages of the `old` turns to recall in
    `free` tokens: the most relevant ones with a score above 0 (single messages, not whole
    turns: a long answer would leave no room for the short question that holds the fact),
    or those with the ids in `recall` when given. A message already recalled for one the
    prompt keeps is not recalled again."""
    if not old or free <= 0:
        return []
    flat = [i for turn in old for i in turn]
    if recall is not None:
        wanted = set(recall)
        found = [i for i in flat if history[i].id in wanted]
        while found and sum(cost(history[i].content) for i in found) > free:
            found.pop()
        return found
    assert relevance is not None
    shown = {i for m in history[old[-1].stop :] for i in m.recalled}
    flat = [i for i in flat if history[i].id not in shown]
    if not flat:
        return []
    scores = relevance([history[i] for i in flat])
    chosen = []
    for score, i in sorted(zip(scores, flat, strict=True), key=lambda pair: (-pair[0], -pair[1])):
        if score > 0 and cost(history[i].content) <= free:
            chosen.append(i)
            free -= cost(history[i].content)
    return sorted(chosen)
