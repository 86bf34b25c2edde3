"""A scripted ChatEngine for tests of what sits above the engine: the session and the app.

It answers with a fixed text (or one made from the messages), a word per token, and counts
tokens as words. Like the llama.cpp engine it refuses a prompt longer than its window, honours
`cancel` between tokens, and fills GenerationStats as it goes (finish END, LENGTH or STOPPED).

A test can make it hold: after `hold_at` tokens of an answer (0: before the first, as while a
long prompt is read) it sets `holding` and waits until the test calls `release()` or the answer
is cancelled. Tests wait on that state, never on a clock.

Like the llama.cpp engine it holds a lock for a whole answer, which `prepare` and `forget` wait
for. Called on the main thread (where a test runs the app's event loop) they are recorded in
`on_main_thread`; there, while an answer holds the lock, they raise `EngineBusy` rather than
wait, which would freeze the app and hang the test.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator

from phichat.config import Sampling
from phichat.engine import Finish, GenerationStats
from phichat.errors import UsageError

ANSWER = "This is the scripted answer."
STORY = "\n\n".join(
    f"Night {n}: the keeper climbed the {n + 40} steps, trimmed the wick and watched the storm "
    f"roll in over the rocks, counting {n * 3} waves before the light swung round again."
    for n in range(1, 61)
)  # ~1800 words: more than any test lets through
PER_MESSAGE_TOKENS = 4  # the chat template's role markers, roughly
POLL_S = 0.005  # how often a held answer looks at `cancel` (llama.cpp looks on every token)

_TOKEN = re.compile(r"\S+\s*|\s+")

Answer = str | Callable[[list[dict[str, str]]], str]


class EngineBusy(RuntimeError):
    """A call on the main thread would have waited for the answer being written."""


def tokens_of(text: str) -> list[str]:
    """The tokens the engine streams for `text`: words with their trailing whitespace."""
    return _TOKEN.findall(text)


class FakeEngine:
    """A ChatEngine that streams a scripted answer (see the module docstring).

    `answer` and `hold_at` are read at the start of each answer, so a test may change them
    between answers. `prompts` keeps every message list it was asked to answer.
    """

    def __init__(
        self,
        answer: Answer = ANSWER,
        *,
        hold_at: int | None = None,
        n_ctx: int = 2048,
        device: str = "cuda",
        model_label: str = "scripted-engine.gguf",
    ) -> None:
        self.answer = answer
        self.hold_at = hold_at
        # "cuda": the app paces its frames as for an engine that leaves the CPU cores free,
        # which this one does (on "cpu" it holds back so llama.cpp keeps every core).
        self.device = device
        self.model_label = model_label
        self.prompts: list[list[dict[str, str]]] = []
        self.holding = threading.Event()
        self.closed = False
        self.lock = threading.Lock()  # held for a whole answer, as by the llama.cpp engine
        self.on_main_thread: list[str] = []  # prepare/forget called on the main thread
        self.forgotten: list[str] = []
        self.forked: list[tuple[str, str]] = []
        self.read_aheads: list[list[dict[str, str]]] = []  # the prompts read ahead, in turn
        self.hold_reading = False  # a read-ahead goes on until cancelled, `reading` set
        self.reading = threading.Event()
        self._read_all = False  # the last prompt read ahead was read to its end
        self._n_ctx = n_ctx
        self._gate = threading.Condition()
        self._allowed = math.inf

    @property
    def device_label(self) -> str:
        """What the status line shows."""
        return "scripted"

    @property
    def n_ctx(self) -> int:
        """The context window in (word) tokens."""
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        """Words in `text`."""
        return len(text.split())

    def release(self, tokens: int | None = None) -> None:
        """Let the held answer go on: to its end, or for `tokens` more tokens (then hold)."""
        with self._gate:
            self._allowed = math.inf if tokens is None else self._allowed + tokens
            self._gate.notify_all()

    def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        stats: GenerationStats | None = None,
        conversation: str | None = None,
    ) -> Iterator[str]:
        """Yield the scripted answer a token at a time, filling `stats`."""
        stats = stats if stats is not None else GenerationStats()
        started = time.perf_counter()
        prompt = sum(self.count_tokens(m["content"]) + PER_MESSAGE_TOKENS for m in messages)
        if prompt >= self.n_ctx:
            raise UsageError(
                f"the prompt is {prompt} tokens; the context window is {self.n_ctx} "
                "(shorten the prompt or raise --ctx)"
            )
        self.prompts.append([dict(m) for m in messages])
        text = self.answer(messages) if callable(self.answer) else self.answer
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        stats.prompt_tokens, stats.seed, stats.finish = prompt, seed, Finish.END
        budget = min(sampling.max_tokens, self.n_ctx - prompt)
        with self._gate:
            self._allowed = math.inf if self.hold_at is None else self.hold_at
        first_at = 0.0
        with self.lock:
            for token in tokens_of(text):
                if stats.generated_tokens >= budget:
                    stats.finish = Finish.LENGTH
                    return
                if not self._may_go_on(stats.generated_tokens, cancel):
                    stats.finish = Finish.STOPPED
                    return
                if stats.generated_tokens == 0:
                    first_at = time.perf_counter()
                    stats.ttft_s = first_at - started
                stats.generated_tokens += 1
                stats.decode_s = time.perf_counter() - first_at
                yield token
                if cancel is not None and cancel.is_set():
                    stats.finish = Finish.STOPPED
                    return

    def _may_go_on(self, streamed: int, cancel: threading.Event | None) -> bool:
        """Hold while the answer may not pass `streamed` tokens; False once cancelled."""
        with self._gate:
            try:
                while streamed >= self._allowed and not (cancel is not None and cancel.is_set()):
                    self.holding.set()
                    self._gate.wait(POLL_S)
            finally:
                self.holding.clear()
        return not (cancel is not None and cancel.is_set())

    def take_notices(self, sampling: Sampling) -> list[str]:
        return []

    def read_ahead(
        self,
        messages: list[dict[str, str]],
        cancel: threading.Event,
        conversation: str | None = None,
        limit: int | None = None,
    ) -> int:
        """Record the prompt read ahead, unless it was the last one read (0: nothing new);
        with `hold_reading`, go on (`reading` set) until `cancel` is set, as a long read-ahead
        does, reading nothing. Else it reads the prompt's (word) tokens, all in one step."""
        if self.read_aheads and self.read_aheads[-1] == messages and self._read_all:
            return 0
        self.read_aheads.append([dict(m) for m in messages])
        self._read_all = False
        while self.hold_reading and not cancel.is_set():
            self.reading.set()
            cancel.wait(POLL_S)
        self.reading.clear()
        if cancel.is_set():
            return 0
        self._read_all = True
        return sum(self.count_tokens(m["content"]) + PER_MESSAGE_TOKENS for m in messages)

    def _wait_for_the_answer(self, call: str) -> None:
        """Wait for an answer being written to end, as the llama.cpp engine does (see the
        module docstring for the main thread)."""
        if threading.current_thread() is threading.main_thread():
            self.on_main_thread.append(call)
            if not self.lock.acquire(blocking=False):
                raise EngineBusy(f"{call} on the main thread would wait for the answer")
        else:
            self.lock.acquire()
        self.lock.release()

    def prepare(self, conversation: str | None) -> None:
        """Nothing to get ready (once no answer is being written)."""
        self._wait_for_the_answer("prepare")

    def fork(self, parent: str, child: str) -> None:
        """Nothing is kept per conversation; `forked` lists what was asked."""
        self.forked.append((parent, child))

    def forget(self, conversation: str) -> None:
        """Nothing is kept per conversation; `forgotten` lists what was asked."""
        self._wait_for_the_answer("forget")
        self.forgotten.append(conversation)

    def close(self) -> None:
        """Nothing to free; remembered for tests."""
        self.closed = True
