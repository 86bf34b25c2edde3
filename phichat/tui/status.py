"""The status line: model file, device, context used, the last answer's speed, and the state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.widgets import Static

if TYPE_CHECKING:
    from phichat.engine import GenerationStats
    from phichat.session import ChatSession


def prompt_read(stats: GenerationStats) -> str:
    """Where the first token's time went: the prompt tokens read, and a saved state loaded."""
    reread = f"re-read {stats.prompt_tokens - stats.cached_tokens}"
    return f"restored, {reread}" if stats.restored_tokens else reread


class StatusLine(Static):
    """One line under the prompt box."""

    def __init__(self, model_name: str, *, id: str | None = None) -> None:
        super().__init__(markup=False, id=id)
        self.model_name = model_name

    def show(self, state: str, session: ChatSession | None = None) -> None:
        """Redraw with `state` (ready, answering…) and, once loaded, the session's figures."""
        parts = [self.model_name]
        if session is not None:
            engine = session.engine
            parts.append(engine.device_label)
            if session.role is not None:
                parts.append(f"role {session.role.name}")
            parts.append(f"ctx {session.context_used}/{engine.n_ctx}")
            stats = session.last_stats
            if stats is not None and stats.generated_tokens:
                parts.append(f"{stats.decode_tps:.1f} tok/s")
                parts.append(f"first token {stats.ttft_s * 1000:.0f} ms ({prompt_read(stats)})")
            if session.problem:
                parts.append("search limited")
        parts.append(state)
        self.update(" · ".join(parts))
