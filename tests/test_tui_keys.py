"""Send and newline are keys `[keys]` remaps like every other action (issue 21): the message box
sends and breaks lines on the keys bound, and its placeholder, the welcome text and the editing
hint name those keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from helpers import SIZE, ready, until
from textual.widgets import Static

from phichat.config import load_settings
from phichat.errors import UsageError
from phichat.session import ChatSession
from phichat.tui.app import PhichatApp
from phichat.tui.chat import UserMessage
from phichat.tui.prompt import PromptInput


def test_send_on_a_key_another_action_has_is_refused_naming_both(tmp_path: Path) -> None:
    config = tmp_path / "keys.toml"
    config.write_text('[keys]\nsend = "ctrl+s"\n')  # settings keeps ctrl+s,f2
    with pytest.raises(UsageError, match=r"keys\.settings and keys\.send are both ctrl\+s"):
        load_settings("cpu", config)


async def test_send_remapped_to_ctrl_s_enter_breaks_the_line_and_the_hints_say_so(
    apps: Callable[..., PhichatApp], fake_engine: FakeEngine, tmp_path: Path
) -> None:
    config = tmp_path / "keys.toml"
    config.write_text('[keys]\nsend = "ctrl+s"\nnewline = "alt+enter"\nsettings = "f2"\n')
    settings = load_settings("cpu", config)
    app = apps(settings, lambda tqdm_class: ChatSession.open(settings, fake_engine))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        box = app.query_one(PromptInput)
        assert box.placeholder == "Message phichat (ctrl+s sends, alt+enter: new line)"
        welcome = str(app.query_one("#welcome", Static).render())
        assert welcome.startswith("Type a message and press ctrl+s (alt+enter: new line,")
        await pilot.press("R", "e", "d", "enter", "B", "l", "u", "e")
        assert box.text == "Red\nBlue"  # Enter is a plain newline now: nothing sent
        assert not app.query(UserMessage) and not fake_engine.prompts
        await pilot.press("ctrl+s")
        await until(lambda: app.query(UserMessage), "the message sent")
        assert [w.text for w in app.query(UserMessage)] == ["Red\nBlue"]
        await until(lambda: not app.chat.busy, "the answer")
        assert fake_engine.prompts[-1][-1] == {"role": "user", "content": "Red\nBlue"}
        await pilot.press("up")  # the last message, offered for editing
        assert box.editing and str(box.border_title).startswith(
            "editing your last message: ctrl+s replaces it"
        )


async def test_the_default_keys_send_on_enter_and_break_lines_on_ctrl_j(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        box = app.query_one(PromptInput)
        assert box.placeholder == "Message phichat (Enter sends, shift+enter or ctrl+j: new line)"
        await pilot.press("H", "i", "ctrl+j", "y", "o")
        assert box.text == "Hi\nyo" and not app.query(UserMessage)
        await pilot.press("enter")
        await until(lambda: app.query(UserMessage), "the message sent")
        assert box.text == "" and [w.text for w in app.query(UserMessage)] == ["Hi\nyo"]
        await until(lambda: not app.chat.busy, "the answer")
