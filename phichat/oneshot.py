"""One prompt -> the answer on stdout, streamed; stats on stderr with --stats."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Sequence
from functools import partial

from phichat import output
from phichat.config import check_text
from phichat.errors import UsageError
from phichat.files import Part
from phichat.session import ChatSession
from phichat.signals import Stopper
from phichat.text import escaped, is_blank

MAX_PROMPT_BYTES = 16 << 20  # far more than any context window holds; /dev/zero must not fill RAM


def read_prompt(prompt: str) -> str:
    """The prompt text: '-' reads stdin; invalid UTF-8, NUL characters (as in an argument,
    which cannot hold one) and text with nothing to read (only whitespace or control
    characters: an empty prompt) are refused."""
    if prompt == "-":
        if sys.stdin is None:
            raise UsageError("--prompt -: stdin is closed")
        try:
            data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"cannot read stdin: {exc.strerror or exc}") from None
        if len(data) > MAX_PROMPT_BYTES:
            raise UsageError(f"stdin holds more than {MAX_PROMPT_BYTES >> 20} MiB: too long")
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("stdin is not valid UTF-8 text") from None
    else:
        check_text(prompt, "--prompt")
    if is_blank(prompt):
        raise UsageError("the prompt is empty (nothing but whitespace or control characters)")
    return check_text(prompt, "stdin")


def run(
    session: ChatSession, prompt: str | None, show_stats: bool, attached: Sequence[Part] = ()
) -> int:
    """Stream one answer to stdout (prompt None: the rest of the conversation's last answer,
    which was cut short), with `attached` file text in the prompt (its sources on stderr
    first, with `show_stats`). Ctrl+C, SIGTERM or SIGHUP stop it: what was streamed is
    saved, marked stopped, and the exit code is 130, 143 or 129.

    A signal sets the answer's cancel flag rather than raising: llama.cpp sees the flag between
    tokens and also while it reads a long prompt, which a KeyboardInterrupt cannot reach.
    What the engine wants the user to know (ChatSession.take_notices) is said first, on stderr.
    """
    out = output.stdout()
    for notice in session.take_notices():
        output.print_warning(notice)
    if show_stats and attached:
        sources = "; ".join(escaped(str(part.source)) for part in attached)
        print(f"sources: {sources}", file=sys.stderr)
    cancel = threading.Event()
    with Stopper(lambda _signum: cancel.set()) as stopper:
        printed = False  # the answer ends its line, also when an error line follows it
        try:
            answer = (
                session.continue_answer
                if prompt is None
                else partial(session.send, prompt, attached=attached)
            )
            with contextlib.closing(answer(cancel)) as stream:
                for chunk in stream:  # a failed write closes the stream: the answer is saved
                    with output.writing():
                        out.write(chunk)
                        out.flush()
                    printed = True
            printed = True
        finally:
            if printed:
                with output.writing():
                    out.write("\n")
                    out.flush()
    if stopper.exit_code is not None:
        return stopper.exit_code
    stats = session.last_stats
    if show_stats and stats is not None:
        print(
            f"prompt tokens: {stats.prompt_tokens} (cached {stats.cached_tokens}, "
            f"restored {stats.restored_tokens}), "
            f"generated tokens: {stats.generated_tokens}, "
            f"time to first token: {stats.ttft_s * 1000:.0f} ms, "
            f"decode: {stats.decode_tps:.1f} tokens/s, seed: {stats.seed}",
            file=sys.stderr,
        )
    return 0
