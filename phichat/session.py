"""ChatSession: the one chat flow both front ends drive.

user text -> store.save(user) -> memory.fit(history, budget) -> engine.stream(messages, sampling)
-> chunks to the front end -> store.save(assistant, stats) -> embedder (background) -> index
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phichat.config import SERVER, RoleSettings, Settings
from phichat.engine import ChatEngine, Finish, GenerationStats
from phichat.engines import open_engine
from phichat.errors import PhichatError, UsageError, describe
from phichat.export import export_conversation
from phichat.files import (
    ChunkSearch,
    ChunkVectors,
    Part,
    attach_text,
    embed_chunks,
    folder_parts,
    index_folder,
    with_attachments,
    written_text,
)
from phichat.memory import (
    MESSAGE_ALLOWANCE,
    FittedContext,
    Hit,
    Memory,
    fit_context,
    load_embedder,
)
from phichat.store import Conversation, Message, Role, Status, Store, store_path, title_from
from phichat.text import is_blank

if TYPE_CHECKING:
    from phichat.config import Sampling
    from phichat.files import FolderReport
    from phichat.memory import Encoder
    from phichat.store import Chunk

BACKFILL_BATCH = 8  # messages embedded between looks at whether the engine is busy
EMBEDDER_WAIT_S = 10.0  # how long recall may wait for the embedder still loading
SAVE_EVERY_S = 1.0  # an answer being written is saved at least this often
ATTACH_OVERHEAD = 32  # tokens for the message frames around a message with attachments

Answer = Generator[str, None, None]  # an answer's text as it streams; close() stops it


def settled_text(draft: str) -> str:
    """The part of a message being typed that typing on cannot change: up to the end of its
    last word followed by a space or line break (a word still being typed may grow)."""
    ends = [draft.rfind(space) for space in (" ", "\n", "\t")]
    return draft[: max(ends) + 1].rstrip() if max(ends) >= 0 else ""


def refuse_blank(text: str) -> None:
    """UsageError for a message with nothing to read (sent or edited alike)."""
    if is_blank(text):
        raise UsageError("the message is empty (nothing but whitespace or control characters)")


def check_continuable(history: Sequence[Message], model: str, device: str) -> Message:
    """The last answer of `history`, if `model` on `device` can go on with it: one stopped or
    cut at max tokens, written by that model, on a local engine (a server cannot take up an
    answer where it ended); UsageError saying why not otherwise."""
    last = history[-1] if history else None
    if last is None or last.role != Role.ASSISTANT or Role.USER not in [m.role for m in history]:
        raise UsageError("there is no answer to continue in this conversation")
    if not last.cut_short:
        raise UsageError(
            "the last answer is finished: there is nothing to continue (regenerate answers it"
            " again)"
        )
    if last.model is not None and last.model != model:
        raise UsageError(
            f"the last answer was written by {last.model}: only that model can continue it"
            " (regenerate answers it again with this one)"
        )
    if device == SERVER:
        raise UsageError("a server cannot take up an answer where it ended: regenerate it")
    return last


class EngineLost(PhichatError):
    """Neither the new model nor the previous one could be loaded: the session has none."""


class BackgroundMemory:
    """Loads the embedder off the hot path, then embeds messages as they are saved.

    Messages saved before the embedder is ready (or while it cannot be had) keep no vector;
    `Memory.backfill` embeds them once it is. Embedding never slows an answer: while the
    session's engine reads a prompt or writes an answer (`engine_busy()`), the work waits
    between small batches, and carries on once the answer is done. What goes wrong here is
    kept, in one line, in `problem` for the front ends to show; it never stops history being
    saved.
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.problem: str | None = None
        self.waiting = threading.Event()  # set while work waits for the engine to finish
        self._memory: Memory | None = None
        self._ready = threading.Event()
        self._engine_idle = threading.Event()
        self._engine_idle.set()
        self._queue: queue.SimpleQueue[Sequence[Message] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="phichat-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        embedder, self.problem = load_embedder(self.settings.embedder, threads=1)
        try:
            self._memory = Memory.open(self.store, embedder)
        except Exception as exc:  # noqa: BLE001 - kept for the front ends; history goes on
            self.problem = f"search is off: {describe(exc)}"
        finally:
            self._ready.set()
        self._guarded(lambda memory: memory.backfill(BACKFILL_BATCH, self._wait_for_engine))
        while (messages := self._queue.get()) is not None:
            self._wait_for_engine()
            self._guarded(lambda memory: memory.remember(messages))

    def _wait_for_engine(self) -> None:
        """Wait while the engine reads a prompt or writes an answer."""
        if not self._engine_idle.is_set():
            self.waiting.set()
            self._engine_idle.wait()
            self.waiting.clear()

    @contextlib.contextmanager
    def engine_busy(self) -> Iterator[None]:
        """While the engine reads a prompt or writes an answer: embedding waits (on a small
        CPU it would take cores from llama.cpp). Enter it after the new message's own
        recall is embedded, which does not wait."""
        self._engine_idle.clear()
        try:
            yield
        finally:
            self._engine_idle.set()

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
        """Finish the messages already queued, then stop (no answer is being written now,
        even if a stream was left unfinished)."""
        self._engine_idle.set()
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
        self.role: RoleSettings | None = None  # its system prompt and sampling win over these
        self.knowledge: str | None = None  # a folder whose best chunks go with each message
        self._chunk_vectors: ChunkVectors | None = None  # kept between searches (kept_vectors)
        self._said: set[str] = set()  # the folder's problems said so far (each said once)
        self._notices: list[str] = []  # the session's own, said with the engine's
        self._fork_of: str | None = None  # the state key of the open fork's parent, until used
        self.conversation_id: int | None = None
        self.history: list[Message] = []
        self.last_stats: GenerationStats | None = None
        self.last_fit: FittedContext | None = None  # the prompt of the last answer
        self.memory = BackgroundMemory(settings, store) if store and remember else None
        self._token_counts: dict[str, int] = {}  # by the current engine's tokenizer
        self._drafted: tuple[tuple[Any, ...], list[dict[str, str]] | None] | None = None
        self._owned_engine: ChatEngine | None = None  # opened here, so closed here
        self._verbose = False
        self._store_key = (
            hashlib.sha256(os.fsencode(store.path.resolve())).hexdigest()[:12] if store else ""
        )

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
        session._verbose = verbose
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

    def switch_model(self, settings: Settings) -> None:
        """Carry on with the model `settings.model` names (its file already downloaded; run it
        where the engine runs). The current model is freed first, so only one is in memory; if
        the new one cannot be loaded, the current one is loaded again and the error raised.
        Each turn renders its prompt with the engine's own chat template, so the conversation
        is re-read in the new model's format, and no cache of the old model is used again."""
        owned = self._owned_engine
        if owned is not None:
            owned.close()
            self._owned_engine = None
        try:
            engine = open_engine(settings, self._verbose)
        except BaseException as exc:
            if owned is not None:
                try:
                    self.engine = self._owned_engine = open_engine(self.settings, self._verbose)
                except Exception as again:  # noqa: BLE001 - both are reported, in one line
                    raise EngineLost(
                        f"{describe(exc)}; the previous model could not be loaded again "
                        f"either: {describe(again)}"
                    ) from None
            raise
        self.settings, self.engine, self._owned_engine = settings, engine, engine
        self._token_counts.clear()
        self.last_stats = self.last_fit = None

    # --- settings ------------------------------------------------------------------------

    def update_sampling(self, **changes: Any) -> None:
        """Change sampling for the next answers (UsageError for values out of range)."""
        self.sampling = replace(self.sampling, **changes).validate()

    @property
    def problem(self) -> str | None:
        """What keeps search or recall from working fully, in one line (None when all is well)."""
        return self.memory.problem if self.memory is not None else None

    def take_notices(self) -> list[str]:
        """One line for each thing the engine wants the user to know (ChatEngine.take_notices),
        each said once; for the front ends to show when the model is ready, before an answer,
        and after closing."""
        notices, self._notices = self._notices, []
        return self.engine.take_notices(self.answer_sampling) + notices

    @property
    def answer_sampling(self) -> Sampling:
        """The sampling the next answer uses: the session's, with its role's over it."""
        role = self.role
        return replace(self.sampling, **role.sampling) if role and role.sampling else self.sampling

    @property
    def answer_system(self) -> str:
        """The system prompt the next answer uses: the role's, else the session's."""
        return self.role.system if self.role and self.role.system else self.system

    def role_named(self, name: str) -> RoleSettings:
        """The role `name` of the settings (UsageError naming the known ones otherwise)."""
        role = self.settings.roles.get(name)
        if role is None:
            known = ", ".join(self.settings.roles) or "none"
            raise UsageError(f"unknown role {name!r} (known: {known}; add it under [roles])")
        return role

    def set_role(self, role: RoleSettings | None) -> None:
        """Use `role` (None: none) from the next answer on, and keep it with the conversation."""
        self.role = role
        if self.store is not None and self.conversation_id is not None:
            self.store.set_role(self.conversation_id, role.name if role else None)

    def use_folder(
        self,
        folder: Path | None,
        warn: Callable[[PhichatError], None],
        stop: threading.Event | None = None,
    ) -> FolderReport | None:
        """Make `folder` the conversation's knowledge (None: none), kept with it: from the next
        message on, its chunks most relevant to each message go with it (`knowledge_parts`).
        The folder is indexed now (only what changed since it last was) and its new chunks
        embedded (`stop` set: what is left is done before the next message); each file that
        cannot be indexed goes to `warn`. UsageError for a folder that is none; PhichatError
        without the history database, where the index lives."""
        store = self._require_store()
        report = root = None
        if folder is not None:
            root = str(folder.expanduser().absolute())
            report = index_folder(store, Path(root), self._said_once(warn), stop)
            embedder = self.chunk_embedder()
            if embedder is not None:
                files = store.indexed_files(root).values()
                embed_chunks(store, embedder, file_ids=[file.id for file in files], stop=stop)
        self.knowledge = root
        if self.conversation_id is not None:
            store.set_knowledge(self.conversation_id, self.knowledge)
        return report

    def knowledge_parts(
        self, text: str, attached: Sequence[Part] = (), embed: bool = True
    ) -> list[Part]:
        """The chunks of the conversation's knowledge folder most relevant to a new message
        `text`, as many as fit in `[chat] knowledge_tokens` and in what the window leaves beside
        the files `attached` to it (none without a folder). The folder's index is brought up
        to date first: a file is read again only if its size or mtime changed, and its new
        chunks embedded (`embed` off: none while a chunk of the folder has no vector). A folder
        gone, or a file in it that cannot be read, is a notice (each said once)."""
        if self.knowledge is None or self.store is None:
            return []
        notice = self._said_once(lambda exc: self._notices.append(str(exc)))
        try:
            index_folder(self.store, Path(self.knowledge), notice)
        except PhichatError as exc:
            notice(UsageError(f"{exc}: the message goes without the folder's chunks"))
            return []
        beside = self._count(attach_text(attached)) if attached else 0
        budget = min(self.settings.chat.knowledge_tokens, self.attachment_budget(text) - beside)
        embedder = self.chunk_embedder()
        kept = self.kept_vectors(embedder)
        return folder_parts(
            self.store, self.knowledge, text, budget, self._count, embedder, kept, embed
        )

    def _said_once(self, warn: Callable[[PhichatError], None]) -> Callable[[PhichatError], None]:
        """`warn`, for what was not said before in this session."""

        def once(exc: PhichatError) -> None:
            if str(exc) not in self._said:
                self._said.add(str(exc))
                warn(exc)

        return once

    def chunk_embedder(self) -> Encoder | None:
        """The embedder that ranks files' chunks: the memory's (waiting for it up to
        EMBEDDER_WAIT_S), else one loaded here; None where it cannot be had (chunks are then
        found by their words, and a notice says so once)."""
        if self.memory is not None:
            memory = self.memory.get(timeout=EMBEDDER_WAIT_S)
            return memory.embedder if memory else None
        return self._own_embedder

    def kept_vectors(self, embedder: Encoder | None) -> ChunkVectors | None:
        """The chunk vectors of `embedder` kept from one search to the next (the side pane's
        file search, each message's folder chunks, attached files' chunks): read once, then
        only what changed in the index (none without an embedder or the history database)."""
        if embedder is None or self.store is None:
            return None
        kept = self._chunk_vectors
        if kept is None or kept.embedder.model_id != embedder.model_id:
            kept = self._chunk_vectors = ChunkVectors(self.store, embedder)
        return kept

    @functools.cached_property
    def _own_embedder(self) -> Encoder | None:
        """The embedder, loaded once for a session without a memory (None: a notice says why)."""
        embedder, problem = load_embedder(
            self.settings.embedder, without="files are searched by their exact words only"
        )
        if problem is not None:
            self._notices.append(problem)
        return embedder

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
        """Start afresh; the conversation is created with its first message (with the role
        chosen for it)."""
        self.conversation_id, self.history, self._fork_of = None, [], None

    def switch(self, conversation_id: int) -> None:
        """Carry on conversation `conversation_id` (PhichatError if there is none)."""
        store = self._require_store()
        conversation = store.conversation(conversation_id)
        self.conversation_id = conversation_id
        self.history = [m for m in store.messages(conversation_id) if not m.replaced]
        self.role = self.settings.roles.get(conversation.role or "")
        self.knowledge = conversation.knowledge
        if conversation.role and self.role is None:
            self._notices.append(
                f"this conversation's role {conversation.role!r} is no longer in the config:"
                " it goes on without one"
            )
        parent = conversation.parent
        self._fork_of = self._state_key(parent) if parent is not None else None

    def fork(self, at: int | None = None) -> Conversation:
        """Carry on in a new conversation holding this one's messages up to message `at`
        (default: the last), under this one in the list. Its first answer starts from what
        the engine keeps of this one (the KV cache, a saved state): at the current point, it
        reads only its new message."""
        store = self._require_store()
        if self.conversation_id is None:
            raise UsageError("there is nothing to fork yet")
        fork = store.fork_conversation(self.conversation_id, at)
        self.switch(fork.id)
        return fork

    def set_pinned(self, conversation_id: int, pinned: bool) -> None:
        """Pin a conversation to the top of the list, or unpin it."""
        self._require_store().set_pinned(conversation_id, pinned)

    def set_archived(self, conversation_id: int, archived: bool) -> None:
        """Archive a conversation out of the list (still searched), or restore it."""
        self._require_store().set_archived(conversation_id, archived)

    def conversation(self, conversation_id: int) -> Conversation:
        """One conversation (PhichatError if there is none)."""
        return self._require_store().conversation(conversation_id)

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
        """Delete a conversation, its messages and the engine's saved state of it. The engine
        waits for an answer being written to end: a front end that must not wait calls
        `delete_history`, then `engine.forget` where the engine runs."""
        key = self.delete_history(conversation_id)
        if key is not None:
            self.engine.forget(key)

    def delete_history(self, conversation_id: int) -> str | None:
        """Delete a conversation and its messages (leaving it if it is the open one), not the
        engine's saved state of it: returns the key that state is kept under (None without
        one), for `engine.forget`. Never while an answer is being written in it."""
        key = self._state_key(conversation_id)
        self._require_store().delete_conversation(conversation_id)
        if conversation_id == self.conversation_id:
            self.new_conversation()
        return key

    def prepare(self) -> None:
        """Let the engine get ready for this conversation's next message (load its saved
        state): call it where the engine runs, after a switch."""
        self._adopt_fork()
        self.engine.prepare(self._state_key())

    def _adopt_fork(self) -> None:
        """A fork the engine has kept nothing for starts from what it keeps for the parent
        (where the engine runs)."""
        key = self._state_key()
        if self._fork_of is not None and key is not None:
            self.engine.fork(self._fork_of, key)
        self._fork_of = None

    def _state_key(self, conversation_id: int | None = None) -> str | None:
        """What the engine keeps a conversation's state under (this one by default): its id in
        this history database (None without history, or before its first message)."""
        conversation_id = conversation_id or self.conversation_id
        if self.store is None or conversation_id is None:
            return None
        return f"{self._store_key}-{conversation_id}"

    def export(self, conversation_id: int) -> str:
        """One conversation as Markdown, replaced messages included and marked."""
        return export_conversation(self._require_store(), conversation_id, "md")

    def last_user_text(self) -> str | None:
        """What the user wrote in the conversation's last message (what an edit replaces),
        without the files and folder chunks attached to it, if there is one."""
        turn = self._last_turn()
        return None if turn is None else self._written(self.history[turn])

    def _written(self, message: Message) -> str:
        """What the user wrote of `message`: its text without the parts attached to it."""
        if self.store is None or not message.id:
            return message.content
        sources = self.store.attachments([message.id]).get(message.id, [])
        return written_text(message.content, len(sources))

    def _last_turn(self) -> int | None:
        """Where the last user message is in the history."""
        users = [i for i, message in enumerate(self.history) if message.role == Role.USER]
        return users[-1] if users else None

    def search(self, query: str, k: int = 10, conversation_id: int | None = None) -> list[Hit]:
        """Past messages that match `query` by meaning and exact words, best first."""
        self._require_store()
        memory = self.memory.get() if self.memory else None
        if memory is None:
            raise PhichatError("search is not available in this session")
        return memory.search(query, k, conversation_id)

    def search_files(self, query: str, k: int = 10) -> list[Chunk]:
        """Chunks of the indexed folders that match `query` by meaning and exact words, best
        first (UsageError for a query without a word)."""
        store, embedder = self._require_store(), self.chunk_embedder()
        return ChunkSearch(store, embedder, kept=self.kept_vectors(embedder)).search(query, k)

    # --- one exchange --------------------------------------------------------------------

    def _count(self, text: str) -> int:
        count = self._token_counts.get(text)
        if count is None:
            count = self._token_counts[text] = self.engine.count_tokens(text)
        return count

    def fit(
        self,
        text: str,
        history: Sequence[Message] | None = None,
        recall: Sequence[int] | None = None,
        wait_s: float = EMBEDDER_WAIT_S,
    ) -> FittedContext:
        """The messages the engine sees for a new user text after `history` (default: the
        conversation's), within the context window; `recall`: the older messages to recall
        for it (default: chosen by relevance, `[chat] recall_tokens` of them, waiting up to
        `wait_s` for the embedder still loading; none without it)."""
        scorer = None

        def relevance(messages: list[Message]) -> list[float]:
            """Cosine to `text`, asked for only when the history overflows the window."""
            nonlocal scorer
            if scorer is None:
                memory = self.memory.get(timeout=wait_s) if self.memory else None
                scorer = (memory.relevance(text) if memory else None) or (
                    lambda found: [0.0] * len(found)
                )
            return scorer(messages)

        n_ctx = self.engine.n_ctx
        reserve = min(self.answer_sampling.max_tokens, n_ctx // 2)
        history = self.history if history is None else history
        return fit_context(
            self.answer_system,
            history,
            text,
            self._count,
            n_ctx,
            reserve,
            relevance,
            self.settings.chat.recall_tokens,
            recall,
            allowance=MESSAGE_ALLOWANCE,
        )

    def read_ahead(
        self,
        draft: str,
        cancel: threading.Event,
        editing: bool = False,
        limit: int | None = None,
        attached: Sequence[Part] = (),
    ) -> int:
        """Let the engine read, while `draft` is still being typed, the part of the prompt it
        will get for it that typing on cannot change: the history as fitted for the draft, what
        goes before its text (the parts `attached` to it, then the knowledge folder's chunks
        for its words so far), and the draft up to its last complete word (`settled_text`).
        `editing`: the draft would replace the last message. Reads at most `limit` tokens
        (None: all); stops at once when `cancel` is set; call it where the engine runs. Returns
        how many tokens were read (0: nothing left to read, or a draft that cannot be sent as
        it is).

        With an empty draft, right after an answer, it reads the next turn's prompt up to its
        new message: where the next turn moves the cut into old history, the window it keeps
        is read now rather than after Enter."""
        messages = self._draft_prompt(draft, editing, tuple(attached))
        if messages is None:
            return 0
        with self._engine_busy():
            return self.engine.read_ahead(messages, cancel, self._state_key(), limit)

    def _draft_prompt(
        self, draft: str, editing: bool, attached: tuple[Part, ...]
    ) -> list[dict[str, str]] | None:
        """The prompt a read-ahead of `draft` reads: the one fitted for it, its last message
        cut to the draft's settled text (None: nothing to read). Fitted once for a draft: the
        steps of a read-ahead reuse it while the history, settings and engine stay the same.
        A draft without a complete word recalls nothing yet; after one, the recall is chosen
        for the draft as typed so far (a pause before Enter chooses what Enter chooses) and the
        knowledge folder's chunks for its settled words (Enter chooses both again from the whole
        message)."""
        key: tuple[Any, ...] = (draft, editing, attached, self.knowledge, self.history)
        key += (self.answer_system, self.answer_sampling, self.settings, self.engine)
        if self._drafted is not None and self._drafted[0] == key:
            return self._drafted[1]
        history = self.history
        turn = self._last_turn() if editing else None
        if turn is not None:
            history = history[:turn]
        settled = settled_text(draft)
        text = with_attachments(draft, [*attached, *self._draft_knowledge(settled, attached)])
        messages: list[dict[str, str]] | None = None
        try:  # wait_s=0: Enter waits for what runs here
            fitted = self.fit(text, history, recall=None if settled else (), wait_s=0)
        except UsageError:  # too long for the window: said when it is sent
            fitted = None
        if fitted is not None and fitted.messages[-1]["content"].endswith(draft):
            *head, last = fitted.messages  # else the draft is not where typing goes on
            content = last["content"][: len(last["content"]) - len(draft)] + settled
            messages = [*head, {**last, "content": content}]
        self._drafted = (key, messages)
        return messages

    def _draft_knowledge(self, settled: str, attached: Sequence[Part]) -> list[Part]:
        """The knowledge folder's chunks for a draft's `settled` words, as a message of them
        gets them; none while the embedder is loading or a chunk waits for its vector (a
        read-ahead neither waits nor embeds: Enter does what is left)."""
        if not settled or self.memory is None:
            return []
        memory = self.memory.get(timeout=0)
        if memory is None or memory.embedder is None:
            return []
        return self.knowledge_parts(settled, attached, embed=False)

    def _ensure_conversation(self) -> int | None:
        if self.store is None:
            return None
        if self.conversation_id is None:
            conversation = self.store.create_conversation(
                model=self.engine.model_label,
                device=self.engine.device,
                kind=self.kind,
                role=self.role.name if self.role else None,
                knowledge=self.knowledge,
            )
            self.conversation_id = conversation.id
        return self.conversation_id

    def _save(
        self,
        role: str,
        content: str,
        keep: int | None = None,
        replaces: Sequence[Message] = (),
        attached: Sequence[Part] = (),
        title: str | None = None,
        **details: Any,
    ) -> Message:
        """Save a message after the first `keep` of the history (default: all of it); the
        messages it `replaces` are marked so, and where its `attached` parts came from is
        recorded, in the same transaction. `title`: what an untitled conversation is named
        after (default: the message)."""
        conversation_id = self._ensure_conversation()
        if self.store is None or conversation_id is None:
            message = Message(0, 0, Role(role), content, 0.0, **details)
        else:
            message = self.store.add_message(
                conversation_id,
                role,
                content,
                replaces=[m.id for m in replaces],
                attachments=[part.source for part in attached],
                title=title,
                **details,
            )
            if self.memory is not None:
                self.memory.add([message])
        self.history = [*self.history[:keep], message]
        return message

    def send(
        self, text: str, cancel: threading.Event | None = None, attached: Sequence[Part] = ()
    ) -> Answer:
        """Stream the answer to `text`, saving the question first and the answer as it grows.
        `attached`: file text that goes with it (see phichat.files), kept in the message as
        sent, with where it came from.

        The answer is saved at its first text and again at most every SAVE_EVERY_S seconds,
        so even a killed process loses only the last second of it. Closing the iterator early
        (Ctrl+C, a front end's stop) saves what was streamed, marked stopped.
        """
        refuse_blank(text)
        message = with_attachments(text, attached)
        fitted = self.fit(message)
        with self._engine_busy():
            self._save(Role.USER, message, recalled=fitted.recall, attached=attached, title=text)
            yield from self._answer(fitted, self.answer_sampling, cancel)

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` by the engine's tokenizer (remembered)."""
        return self._count(text)

    def attachment_budget(self, text: str) -> int:
        """Tokens that files attached to a new message `text` may take: what the window leaves
        after the system prompt, the message itself and the room kept for the answer (older
        turns then make way, as for any long message)."""
        n_ctx = self.engine.n_ctx
        reserve = min(self.answer_sampling.max_tokens, n_ctx // 2)
        system = self.answer_system
        used = (self._count(system) if system else 0) + self._count(text) + ATTACH_OVERHEAD
        return max(0, n_ctx - reserve - used)

    def regenerate(self, cancel: threading.Event | None = None) -> Answer:
        """Stream a new answer to the last user message, with a fresh seed. The answer it had
        stays in the history, marked replaced (still searchable, shown on request), from the
        new one's first text on; if that never comes (stopped at once, an error), nothing
        changes."""
        turn = self._last_turn()
        if turn is None:
            raise UsageError("there is no message to answer again yet")
        question = self.history[turn]
        fitted = self.fit(question.content, self.history[:turn], question.recalled)
        fresh = replace(self.answer_sampling, seed=None)
        with self._engine_busy():
            yield from self._answer(fitted, fresh, cancel, turn + 1, self.history[turn + 1 :])

    def edit_last(
        self, text: str, cancel: threading.Event | None = None, attached: Sequence[Part] = ()
    ) -> Answer:
        """Send `text` in place of the last user message, and stream its answer: the message
        and its answer stay in the history, marked replaced. `attached`: as with `send` (the
        front ends give an edit the folder chunks a new message would get: knowledge_parts).
        A conversation named after the message it starts with takes the new one's name."""
        refuse_blank(text)
        turn = self._last_turn()
        if turn is None:
            raise UsageError("there is no message to edit yet")
        message = with_attachments(text, attached)
        fitted = self.fit(message, self.history[:turn])
        old = self._written(self.history[turn])
        with self._engine_busy():
            replaced, recalled = self.history[turn:], fitted.recall
            self._save(Role.USER, message, turn, replaced, recalled=recalled, attached=attached)
            if turn == 0 and self.store is not None and self.conversation_id is not None:
                conversation = self.store.conversation(self.conversation_id)
                if conversation.title == title_from(old):  # named after it, not by hand
                    self.store.set_title(self.conversation_id, title_from(text))
            yield from self._answer(fitted, self.answer_sampling, cancel)

    def continue_answer(self, cancel: threading.Event | None = None) -> Answer:
        """Stream the rest of the last answer, stopped or cut at max tokens, into the same
        message: the model goes on from where it ended, reading none of it again (the KV
        cache or the saved state holds it). Refused for a finished answer, one of another
        model, and on a server (which cannot take up an answer where it ended)."""
        last = check_continuable(self.history, self.engine.model_label, self.engine.device)
        turn = self._last_turn()
        assert turn is not None  # check_continuable found the answer's question
        question = self.history[turn]
        fitted = self.fit(question.content, self.history[:turn], question.recalled)
        going_on = {"role": Role.ASSISTANT.value, "content": last.content}
        fitted = replace(fitted, messages=[*fitted.messages, going_on])
        with self._engine_busy():
            keep = len(self.history) - 1
            yield from self._answer(fitted, self.answer_sampling, cancel, keep, (), last)

    def _engine_busy(self) -> contextlib.AbstractContextManager[None]:
        """Background embedding waits within this: from after the new message's recall is
        embedded (in fit) until its answer is saved."""
        return self.memory.engine_busy() if self.memory else contextlib.nullcontext()

    def _answer(
        self,
        fitted: FittedContext,
        sampling: Sampling,
        cancel: threading.Event | None,
        keep: int | None = None,
        replaces: Sequence[Message] = (),
        extends: Message | None = None,
    ) -> Answer:
        """Stream the engine's answer to `fitted` with `sampling`, saving it as it grows and
        at the end, also when closed early (marked stopped). It goes after the first `keep`
        messages of the history; the messages it `replaces` are marked so as its first text
        is saved, so an answer stopped before any text replaces nothing. `extends`: the
        answer this one goes on with, in its row (its text and tokens first)."""
        stats = self.last_stats = GenerationStats()
        self.last_fit = fitted
        head, earlier = (extends.content, extends.tokens or 0) if extends else ("", 0)
        parts: list[str] = [head] if head else []
        partial: Message | None = extends
        saved_at = float("-inf")
        done = False
        try:
            self._adopt_fork()
            stream = self.engine.stream(
                fitted.messages, sampling, cancel, stats, conversation=self._state_key()
            )
            for chunk in stream:
                parts.append(chunk)
                yield chunk
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    content = "".join(parts)
                    partial = self._save_partial(partial, content, sampling, stats, replaces)
                    saved_at = time.monotonic()
            done = True
        finally:
            if not done:
                stats.finish = Finish.STOPPED
            nothing = not parts and stats.finish == Finish.STOPPED
            if (partial is not None or parts or stats.generated_tokens or done) and not (
                replaces and nothing
            ):
                content = "".join(parts)
                self._save_answer(partial, content, sampling, stats, keep, replaces, earlier)

    def _save_partial(
        self,
        partial: Message | None,
        content: str,
        sampling: Sampling,
        stats: GenerationStats,
        replaces: Sequence[Message],
    ) -> Message | None:
        """Save the answer so far: create its row (status streaming, marking what it
        replaces), or update it. A failed save is tried again a second later; the final save
        reports it."""
        conversation_id = self._ensure_conversation()
        if self.store is None or conversation_id is None:
            return None
        try:
            if partial is None:
                return self.store.add_message(
                    conversation_id,
                    Role.ASSISTANT,
                    content,
                    sampling={**asdict(sampling), "seed": stats.seed},
                    status=Status.STREAMING,
                    model=self.engine.model_label,
                    replaces=[m.id for m in replaces],
                )
            self.store.update_message(partial.id, content)
        except PhichatError:
            pass
        return partial

    def _save_answer(
        self,
        partial: Message | None,
        content: str,
        sampling: Sampling,
        stats: GenerationStats,
        keep: int | None,
        replaces: Sequence[Message],
        earlier: int = 0,
    ) -> None:
        """Save the whole answer with its status and stats (after `earlier` tokens of an
        answer it goes on with), then index it for search."""
        details: dict[str, Any] = {
            "tokens": earlier + stats.generated_tokens,
            "sampling": {**asdict(sampling), "seed": stats.seed, "finish": stats.finish.value},
            "tokens_per_s": round(stats.decode_tps, 2),
            "status": Status.STOPPED if stats.finish == Finish.STOPPED else Status.FINISHED,
        }
        if partial is None or self.store is None:
            model = self.engine.model_label
            self._save(Role.ASSISTANT, content, keep, replaces, model=model, **details)
            return
        self.store.update_message(partial.id, content, **details)
        message = replace(partial, content=content, **details)
        if self.memory is not None:
            self.memory.add([message])
        self.history = [*self.history[:keep], message]
