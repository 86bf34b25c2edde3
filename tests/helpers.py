"""What more than one test module uses: waiting on a condition, running phichat (a process or
in-process) and checking its one-line errors, driving the app under Pilot, and a real terminal
(tmux). Tests wait on state (a widget shown, a message saved, a file written), never on a clock.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from fake_engine import STORY, FakeEngine, tokens_of
from textual import events
from textual.app import App
from textual.pilot import Pilot

from phichat import cli
from phichat.config import Settings, load_settings
from phichat.session import ChatSession
from phichat.store import Store, default_path
from phichat.tui.app import PhichatApp
from phichat.tui.chat import AnswerMessage
from phichat.tui.prompt import PromptInput

T = TypeVar("T")

TIMEOUT_S = 120.0  # generous: a loaded 2-core machine is slow, and a wait that ends early is free


# --- waiting on a condition --------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T], what: str, timeout: float = TIMEOUT_S, every: float = 0.01
) -> T:
    """Poll `condition()` every `every` seconds until it is truthy; return its value. An
    AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
    return value


async def until(condition: Callable[[], object], what: str, timeout: float = TIMEOUT_S) -> None:
    """wait_until for a test under Pilot: the app's event loop runs between the polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # not pilot.pause: no screen work of the test's own


# --- phichat as a command ----------------------------------------------------------------------


def phichat(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the phichat command as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "phichat", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or dict(os.environ),
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Non-zero exit, nothing on stdout, one `phichat: error:` line on stderr, no traceback."""
    assert result.returncode != 0, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("phichat: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def run(
    capsys: pytest.CaptureFixture[str], *args: str, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """`phichat ARGS` in this process: (exit code, stdout, stderr)."""
    if stdin is not None:
        # As Python reads stdin under the C locale: undecodable bytes kept as surrogates.
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape")
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result: tuple[int, str, str], fragment: str, code: int = 2) -> str:
    """One `phichat: error:` line naming `fragment`, nothing on stdout, the exit code."""
    exit_code, out, err = result
    lines = err.strip().splitlines()
    assert (exit_code, out, len(lines)) == (code, "", 1), result
    assert lines[0].startswith("phichat: error: ") and fragment in lines[0], lines[0]
    return lines[0]


# --- the app under Pilot -----------------------------------------------------------------------

SIZE = (110, 36)
LONG_PROMPT = "Write a long story about a lighthouse keeper and a storm."

STORED = {
    "Puppy food": [
        ("user", "What should I feed my new puppy?"),
        ("assistant", "Puppy food three times a day, and fresh water."),
    ],
    "Bike repair": [
        ("user", "How do I fix a flat bicycle tyre?"),
        ("assistant", "Take the wheel off, find the hole, patch the inner tube, inflate."),
    ],
    "Weekend reading": [
        ("user", "Recommend a sci-fi novel for the weekend."),
        ("assistant", "Try The Left Hand of Darkness by Ursula K. Le Guin."),
    ],
}


def tui_settings(config: Path | None, **sampling: object) -> Settings:
    """Settings from `config` (None: the defaults), greedy and seeded unless told otherwise."""
    values = {"temperature": 0.0, "seed": 1, "max_tokens": 24, **sampling}
    return load_settings("cpu", config, {"sampling": values})


def store_conversations() -> dict[str, int]:
    """Put STORED in the history database; return title -> conversation id."""
    ids = {}
    with Store.open(default_path()) as store:
        for title, messages in STORED.items():
            conversation = store.create_conversation(title=title)
            for role, content in messages:
                store.add_message(conversation.id, role, content)
            ids[title] = conversation.id
    return ids


async def ready(pilot: Pilot) -> ChatSession:
    """Once the app's model is loaded: its session."""
    app = pilot.app
    assert isinstance(app, PhichatApp)
    await until(lambda: app.chat.session is not None or app.chat._load_error, "the model")
    assert app.chat.session is not None, app.chat._load_error
    return app.chat.session


async def ask(pilot: Pilot, text: str) -> AnswerMessage:
    """Type `text`, send it, wait for the whole answer."""
    app = pilot.app
    assert isinstance(app, PhichatApp)
    app.query_one(PromptInput).focus()
    app.query_one(PromptInput).insert(text)
    await pilot.press("enter")
    await until(lambda: app.query(AnswerMessage), "the answer to start")
    await until(lambda: not app.chat.busy, "the answer to end")
    await pilot.pause()
    return app.query(AnswerMessage).last()


async def start_held_answer(pilot: Pilot, engine: FakeEngine, tokens: int) -> AnswerMessage:
    """Send LONG_PROMPT to the scripted engine, which streams STORY and holds after `tokens`
    tokens; return once they are on the screen."""
    engine.answer, engine.hold_at = STORY, tokens
    app = pilot.app
    app.query_one(PromptInput).insert(LONG_PROMPT)
    await pilot.press("enter")
    await until(engine.holding.is_set, "the engine to hold")
    answer = app.query(AnswerMessage).last()
    await until(lambda: answer.text == held_text(tokens), "the held text on the screen")
    return answer


def held_text(tokens: int) -> str:
    """What the scripted engine has streamed of STORY after `tokens` tokens."""
    return "".join(tokens_of(STORY)[:tokens])


def burst(app: App[object], text: str) -> None:
    """Type `text` as one quick burst: every key event is queued at once. (pilot.press waits for
    the app to go idle after each key, which on a busy machine can outlast a debounce.)"""
    for char in text:
        app.post_message(events.Key("space" if char == " " else char, char))


def notes(app: PhichatApp) -> list[str]:
    """The notifications the app has shown."""
    return [str(n.message) for n in app._notifications]


# --- a real terminal ---------------------------------------------------------------------------


class Tmux:
    """A private tmux server running one command in a 120x40 window."""

    def __init__(self, socket: Path) -> None:
        self.base = ["tmux", "-S", str(socket)]

    def start(self, command: list[str]) -> None:
        env = [f"{k}={v}" for k, v in os.environ.items() if k.startswith(("HF_", "PHICHAT_HOME"))]
        flags = [arg for pair in env for arg in ("-e", pair)]
        subprocess.run(
            [*self.base, "new-session", "-d", "-x", "120", "-y", "40", *flags, "--", *command],
            check=True,
            env={**os.environ, "TERM": "xterm-256color"},
        )

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", *keys], check=True)

    def screen(self) -> str:
        result = subprocess.run([*self.base, "capture-pane", "-p"], capture_output=True, text=True)
        return result.stdout

    def alive(self) -> bool:
        return subprocess.run([*self.base, "has-session"], capture_output=True).returncode == 0

    def wait(self, condition: Callable[[str], bool], what: str) -> str:
        """Until `condition(screen)` holds; returns that screen."""

        def shown() -> str | None:
            screen = self.screen()
            return screen if condition(screen) else None

        try:
            return wait_until(shown, what, every=0.1)
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}; screen:\n{self.screen()}") from None

    def exit_code(self, done: Path) -> str:
        """The exit code the command wrote to `done` (`...; echo $? > done`) once it ended."""
        wait_until(lambda: done.exists() and done.read_text().endswith("\n"), "the exit code", 30)
        return done.read_text().strip()

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def garden(n: int) -> str:
    """`n` paragraphs about gardening, each different."""
    return "\n\n".join(
        f"Bed {i}: tomatoes and beans need water every {i % 7 + 1} days in a dry summer, "
        f"and the soil of bed {i} wants compost twice a year."
        for i in range(n)
    )
