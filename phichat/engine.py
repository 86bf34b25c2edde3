"""The engine interface: what a chat session needs from a model, wherever the model runs.

The local llama.cpp engine (`phichat.llama_engine`) and an OpenAI-compatible server
(`phichat.remote_engine`) provide it; `phichat.engines` picks the one the settings ask for. This
module imports no implementation. The session, memory and front ends only ever see a `ChatEngine`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from phichat.config import Device, Sampling


READ_AHEAD_MARGIN = 1  # tokens before the settled text's end left to be read after Enter


def settled_tokens(
    messages: list[dict[str, str]], tokens_of: Callable[[list[dict[str, str]]], list[int]]
) -> list[int]:
    """The prompt tokens of `messages` (as `tokens_of` renders and tokenizes them, with the
    engine's own template and tokenizer) that stay the same whatever text is added to the last
    message: those shared with the prompt where that message goes on, less READ_AHEAD_MARGIN
    (tokenization at the join could still change them)."""
    longer = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + " x"}]
    tokens = tokens_of(messages)
    return tokens[: max(0, shared_prefix(tokens, tokens_of(longer)) - READ_AHEAD_MARGIN)]


def shared_prefix(tokens: Sequence[int], other: Sequence[int]) -> int:
    """How many leading tokens `tokens` and `other` share."""
    return next(
        (i for i, (a, b) in enumerate(zip(tokens, other, strict=False)) if a != b),
        min(len(tokens), len(other)),
    )


class Finish(str, Enum):
    """Why an answer ended."""

    END = "end"  # the model ended it (an end-of-generation token)
    LENGTH = "length"  # max_tokens or the end of the context window
    STOPPED = "stopped"  # stopped from outside: Escape, Ctrl+C, a signal, a server hanging up


@dataclass
class GenerationStats:
    """What one answer cost. `cached_tokens` of the prompt were not read again; of those,
    `restored_tokens` came from a saved state of the conversation."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    restored_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    seed: int = 0
    finish: Finish = Finish.END

    @property
    def decode_tps(self) -> float:
        """Decode speed in tokens/s (tokens after the first, over the time after the first)."""
        if self.generated_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.generated_tokens - 1) / self.decode_s


class ChatEngine(Protocol):
    """A chat model that streams answers: all a ChatSession needs."""

    device: Device  # the device config it runs with
    model_label: str  # the model as the status line and the history name it

    @property
    def device_label(self) -> str:
        """Where it runs, for the status line (e.g. "CPU", "CUDA (32 GPU layers)", a server's
        host:port)."""
        ...

    @property
    def n_ctx(self) -> int:
        """The context window in tokens."""
        ...

    def take_notices(self, sampling: Sampling) -> list[str]:
        """One line for each thing the user should know, each said once: how it runs (a
        context above the model's training length), a setting in `sampling` a server cannot
        honour, a conversation state llama.cpp could not save. The session reads it
        (`ChatSession.take_notices`) for the front ends to show."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` with the model's own tokenizer."""
        ...

    def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cancel: threading.Event | None = None,
        stats: GenerationStats | None = None,
        conversation: str | None = None,
    ) -> Iterator[str]:
        """Yield the answer to `messages` as it is generated, filling `stats` as it goes; stop
        soon after `cancel` is set (stats.finish = STOPPED). `conversation` is a key naming
        the conversation, for an engine that keeps state per conversation. A last message
        from the assistant is an answer cut short: the model goes on from its end (the
        stream yields only what comes next)."""
        ...

    def read_ahead(
        self,
        messages: list[dict[str, str]],
        cancel: threading.Event,
        conversation: str | None = None,
        limit: int | None = None,
    ) -> int:
        """Read the part of the prompt `messages` that more text in its last message cannot
        change, ahead of the answer, in small steps that stop at once when `cancel` is set;
        at most `limit` tokens of it (None: all). The answer never depends on whether it ran.
        Returns how many tokens were read (0: nothing was left to read, or an engine with
        nothing to read ahead)."""
        ...

    def prepare(self, conversation: str | None) -> None:
        """Get ready to answer in `conversation` ahead of its next message (for an engine
        that keeps state per conversation: load it now rather than at the next answer)."""
        ...

    def fork(self, parent: str, child: str) -> None:
        """Conversation `child`, a fork of `parent` with nothing kept of its own yet, starts
        from what is kept for `parent` (for an engine that keeps state per conversation)."""
        ...

    def forget(self, conversation: str) -> None:
        """Drop what is kept for a conversation that was deleted."""
        ...

    def close(self) -> None:
        """Save what is worth keeping, then free the model (or the connection)."""
        ...
