"""ChatSession: the one chat flow both front ends drive.

user text -> store.save(user) -> memory.fit(history, budget) -> engine.stream(messages, sampling)
-> chunks to the front end -> store.save(assistant, stats) -> embedder (background) -> index
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from phichat.config import Settings
from phichat.engine import ChatEngine, Finish, GenerationStats, open_engine
from phichat.errors import PhichatError, UsageError, describe
from phichat.memory import FittedContext, Hit, Memory, fit_context
from phichat.store import Conversation, Message, Role, Status, Store, store_path

if TYPE_CHECKING:
    from phichat.config import Sampling

EMBEDDER_WAIT_S = 10.0  # how long recall may wait for the embedder still loading
SAVE_EVERY_S = 1.0  # an answer being written is saved at least this often


class BackgroundMemory:
    """Loads the embedder off the hot path, then embeds messages as they are saved.

    Messages saved before the embedder is ready (or while it cannot be had) keep no vector;
    `Memory.backfill` embeds them once it is. What goes wrong here is kept, in one line, in
    `problem` for the front ends to show; it never stops history being saved.
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.problem: str | None = None
        self._memory: Memory | None = None
        self._ready = threading.Event()
        self._queue: queue.SimpleQueue[Sequence[Message] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="phichat-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from phichat.embed import Embedder

        try:
            embedder: Embedder | None = Embedder.load(self.settings.embedder, threads=1)
        except PhichatError as exc:
            self.problem, embedder = f"search matches exact words only: {exc}", None
        try:
            self._memory = Memory.open(self.store, embedder)
        except Exception as exc:  # noqa: BLE001 - kept for the front ends; history goes on
            self.problem = f"search is off: {describe(exc)}"
        finally:
            self._ready.set()
        self._guarded(lambda memory: memory.backfill())
        while (messages := self._queue.get()) is not None:
            self._guarded(lambda memory, batch=messages: memory.remember(batch))

    def _guarded(self, work: Callable[[Memory], object]) -> None:
        """Run `work` on the memory; a failure is kept in `problem` and the thread carries on
        (history is saved by the session whatever happens here)."""
        if self._memory is None:
            return
        try:
            work(self._memory)
        except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
            self.problem = f"a message could not be indexed for search: {describe(exc)}"

    def add(self, messages: Sequence[Message]) -> None:
        """Embed and index these messages in the background."""
        self._queue.put(messages)

    def get(self, timeout: float | None = None) -> Memory | None:
        """The memory once the embedder is loaded (None if not within `timeout` seconds)."""
        self._ready.wait(timeout)
        return self._memory

    def close(self) -> None:
        """Finish the messages already queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=30)


class ChatSession:
    """One conversation at a time with one loaded engine; history is saved as it happens.

    Sampling and the system prompt can change between answers. Without a store (--no-history),
    nothing is saved and there is no search.
    """

    def __init__(
        self,
        settings: Settings,
        engine: ChatEngine,
        store: Store | None = None,
        kind: str = "chat",
        remember: bool = True,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.kind = kind
        self.sampling: Sampling = settings.sampling
        self.system: str = settings.chat.system
        self.conversation_id: int | None = None
        self.history: list[Message] = []
        self.last_stats: GenerationStats | None = None
        self.memory = BackgroundMemory(settings, store) if store and remember else None
        self._token_counts: dict[str, int] = {}
        self._owned_engine: ChatEngine | None = None  # opened by open(), so closed by close()

    @classmethod
    def open(
        cls,
        settings: Settings,
        engine: ChatEngine | None = None,
        *,
        continue_id: int | None = None,
        history: bool = True,
        kind: str = "chat",
        remember: bool = True,
        verbose: bool = False,
        tqdm_class: Any = None,
    ) -> ChatSession:
        """A session as the settings describe it: the history database (none with
        history=False) is opened and `continue_id` found first, so a bad database or id fails
        at once; then the engine the settings ask for is opened, unless one is given (a model
        download draws its progress with `tqdm_class`)."""
        store = Store.open(store_path(settings.store)) if history else None
        try:
            if store is not None and continue_id is not None:
                store.conversation(continue_id)
            owned = None
            if engine is None:
                engine = owned = open_engine(settings, verbose, tqdm_class)
        except BaseException:
            if store is not None:
                store.close()
            raise
        session = cls(settings, engine, store, kind, remember)
        session._owned_engine = owned
        if continue_id is not None:
            session.switch(continue_id)
        return session

    def close(self) -> None:
        """Let background embedding finish, then close the database (and free the engine if the
        session opened it)."""
        if self.memory is not None:
            self.memory.close()
        if self.store is not None:
            self.store.close()
        if self._owned_engine is not None:
            self._owned_engine.close()

    # --- settings ------------------------------------------------------------------------

    def update_sampling(self, **changes: object) -> None:
        """Change sampling for the next answers (UsageError for values out of range)."""
        self.sampling = replace(self.sampling, **changes).validate()

    @property
    def problem(self) -> str | None:
        """What keeps search or recall from working fully, in one line (None when all is well)."""
        return self.memory.problem if self.memory is not None else None

    def take_notices(self) -> list[str]:
        """One line for each sampling setting the engine cannot honour (a server that takes no
        repeat penalty, say), each said once per session; for the front ends to show before an
        answer."""
        take = getattr(self.engine, "take_notices", None)
        return take(self.sampling) if take is not None else []

    @property
    def context_used(self) -> int:
        """Tokens in the last prompt and its answer."""
        stats = self.last_stats
        return stats.prompt_tokens + stats.generated_tokens if stats else 0

    # --- conversations -------------------------------------------------------------------

    def _require_store(self) -> Store:
        if self.store is None:
            raise PhichatError("history is off in this session (--no-history)")
        return self.store

    def new_conversation(self) -> None:
        """Start afresh; the conversation is created with its first message."""
        self.conversation_id, self.history = None, []

    def switch(self, conversation_id: int) -> None:
        """Carry on conversation `conversation_id` (PhichatError if there is none)."""
        store = self._require_store()
        store.conversation(conversation_id)
        self.conversation_id = conversation_id
        self.history = store.messages(conversation_id)

    def conversations(self) -> list[Conversation]:
        """All conversations, most recently active first."""
        return self._require_store().conversations()

    def messages(self, conversation_id: int) -> list[Message]:
        """The messages of one conversation, oldest first."""
        return self._require_store().messages(conversation_id)

    def rename(self, conversation_id: int, title: str) -> None:
        """Give a conversation a new title."""
        self._require_store().set_title(conversation_id, title.strip())

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and its messages."""
        self._require_store().delete_conversation(conversation_id)
        if conversation_id == self.conversation_id:
            self.new_conversation()

    def search(self, query: str, k: int = 10, conversation_id: int | None = None) -> list[Hit]:
        """Past messages that match `query` by meaning and exact words, best first."""
        self._require_store()
        memory = self.memory.get() if self.memory else None
        if memory is None:
            raise PhichatError("search is not available in this session")
        return memory.search(query, k, conversation_id)

    # --- one exchange --------------------------------------------------------------------

    def _count(self, text: str) -> int:
        count = self._token_counts.get(text)
        if count is None:
            count = self._token_counts[text] = self.engine.count_tokens(text)
        return count

    def fit(self, text: str) -> FittedContext:
        """The messages the engine sees for a new user text, within the context window."""
        scorer = None

        def relevance(messages: list[Message]) -> list[float]:
            """Cosine to `text`, asked for only when the history overflows the window."""
            nonlocal scorer
            if scorer is None:
                memory = self.memory.get(timeout=EMBEDDER_WAIT_S) if self.memory else None
                scorer = (memory.relevance(text) if memory else None) or (
                    lambda found: [0.0] * len(found)
                )
            return scorer(messages)

        n_ctx = self.engine.n_ctx
        reserve = min(self.sampling.max_tokens, n_ctx // 2)
        return fit_context(self.system, self.history, text, self._count, n_ctx, reserve, relevance)

    def _ensure_conversation(self) -> int | None:
        if self.store is None:
            return None
        if self.conversation_id is None:
            conversation = self.store.create_conversation(
                model=self.engine.model_label, device=self.engine.device, kind=self.kind
            )
            self.conversation_id = conversation.id
        return self.conversation_id

    def _save(self, role: str, content: str, **details: Any) -> Message:
        conversation_id = self._ensure_conversation()
        if self.store is None or conversation_id is None:
            message = Message(0, 0, role, content, 0.0)
        else:
            message = self.store.add_message(conversation_id, role, content, **details)
            if self.memory is not None:
                self.memory.add([message])
        self.history.append(message)
        return message

    def send(self, text: str, cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the answer to `text`, saving the question first and the answer as it grows.

        The answer is saved at its first text and again at most every SAVE_EVERY_S seconds,
        so even a killed process loses only the last second of it. Closing the iterator early
        (Ctrl+C, a front end's stop) saves what was streamed, marked stopped.
        """
        if not text.strip():
            raise UsageError("the message is empty")
        fitted = self.fit(text)
        self._save("user", text)
        stats = self.last_stats = GenerationStats()
        parts: list[str] = []
        partial: Message | None = None
        saved_at = float("-inf")
        done = False
        try:
            for chunk in self.engine.stream(fitted.messages, self.sampling, cancel, stats):
                parts.append(chunk)
                yield chunk
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    partial = self._save_partial(partial, "".join(parts), stats)
                    saved_at = time.monotonic()
            done = True
        finally:
            if not done:
                stats.finish = Finish.STOPPED
            if partial is not None or parts or stats.generated_tokens or done:
                self._save_answer(partial, "".join(parts), stats)

    def _answer_sampling(self, stats: GenerationStats) -> dict[str, object]:
        return {**asdict(self.sampling), "seed": stats.seed}

    def _save_partial(
        self, partial: Message | None, content: str, stats: GenerationStats
    ) -> Message | None:
        """Save the answer so far: create its row (status streaming), or update it. A failed
        save is tried again a second later; the final save reports it."""
        conversation_id = self._ensure_conversation()
        if self.store is None or conversation_id is None:
            return None
        try:
            if partial is None:
                return self.store.add_message(
                    conversation_id,
                    Role.ASSISTANT,
                    content,
                    sampling=self._answer_sampling(stats),
                    status=Status.STREAMING,
                )
            self.store.update_message(partial.id, content)
        except PhichatError:
            pass
        return partial

    def _save_answer(self, partial: Message | None, content: str, stats: GenerationStats) -> None:
        """Save the whole answer with its status and stats, then index it for search."""
        details: dict[str, Any] = {
            "tokens": stats.generated_tokens,
            "sampling": self._answer_sampling(stats),
            "tokens_per_s": round(stats.decode_tps, 2),
            "status": Status.STOPPED if stats.finish == Finish.STOPPED else Status.FINISHED,
        }
        if partial is None or self.store is None:
            self._save(Role.ASSISTANT, content, **details)
            return
        self.store.update_message(partial.id, content, **details)
        message = replace(partial, content=content, **details)
        if self.memory is not None:
            self.memory.add([message])
        self.history.append(message)
