"""One prompt -> the answer on stdout, streamed; stats on stderr with --stats."""

from __future__ import annotations

import signal
import sys
import threading

from phichat.errors import UsageError
from phichat.session import ChatSession


def read_prompt(prompt: str) -> str:
    """The prompt text: '-' reads stdin; empty or whitespace-only is refused."""
    if prompt == "-":
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError:
            raise UsageError("stdin is not valid UTF-8 text") from None
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


def run(session: ChatSession, prompt: str, show_stats: bool) -> int:
    """Stream one answer to stdout; Ctrl+C stops it (what was streamed stays) with exit 130.

    Ctrl+C sets the answer's cancel flag rather than raising: llama.cpp sees the flag between
    tokens and also while it reads a long prompt, which a KeyboardInterrupt cannot reach.
    What the engine cannot honour of the sampling settings is said first, on stderr.
    """
    out = sys.stdout
    for notice in session.take_notices():
        print(f"phichat: warning: {notice}", file=sys.stderr)
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: cancel.set())
    end_line = False  # whatever was printed, or a finished answer, ends with a newline
    try:
        for chunk in session.send(prompt, cancel):
            out.write(chunk)
            out.flush()
            end_line = True
        end_line = True
    finally:
        signal.signal(signal.SIGINT, previous)
        if end_line:  # also before an error line, so that it does not trail the answer
            out.write("\n")
            out.flush()
    if cancel.is_set():
        return 130
    stats = session.last_stats
    if show_stats and stats is not None:
        print(
            f"prompt tokens: {stats.prompt_tokens} (cached {stats.cached_tokens}), "
            f"generated tokens: {stats.generated_tokens}, "
            f"time to first token: {stats.ttft_s * 1000:.0f} ms, "
            f"decode: {stats.decode_tps:.1f} tokens/s, seed: {stats.seed}",
            file=sys.stderr,
        )
    return 0
