"""ChatSession: the one chat flow both front ends drive.

user text -> store.save(user) -> memory.fit(history, budget) -> engine.stream(messages, sampling)
-> chunks to the front end -> store.save(assistant, stats) -> embedder (background) -> index
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

from phichat.config import Sampling, Settings
from phichat.engine import Engine, GenerationStats
from phichat.errors import UsageError


class ChatSession:
    """One conversation with one loaded engine; sampling and system prompt can change per turn."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.sampling: Sampling = settings.sampling
        self.system: str = settings.chat.system
        self.history: list[dict[str, str]] = []
        self.last_stats: GenerationStats | None = None

    def update_sampling(self, **changes: object) -> None:
        """Change sampling for the next answers (validated)."""
        self.sampling = replace(self.sampling, **changes).validate()

    def messages_for(self, text: str) -> list[dict[str, str]]:
        """The messages the engine sees for a new user text."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": text}]

    def send(self, text: str, cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the answer to `text`. Closing the iterator early counts as a stop."""
        if not text.strip():
            raise UsageError("the message is empty")
        messages = self.messages_for(text)
        stats = GenerationStats()
        self.last_stats = stats
        parts: list[str] = []
        finished = False
        try:
            for chunk in self.engine.stream(messages, self.sampling, cancel, stats):
                parts.append(chunk)
                yield chunk
            finished = stats.finish != "cancelled"
        finally:
            if not finished and stats.finish != "cancelled":
                stats.finish = "cancelled"
            self.history.append({"role": "user", "content": text})
            self.history.append({"role": "assistant", "content": "".join(parts)})
