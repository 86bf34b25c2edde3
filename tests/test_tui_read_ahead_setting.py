"""`[chat] read_ahead = false` turns the app's read-ahead off (issue 18: the anchor that
benchmarks/keystroke_latency.py measures against): typing, a paste and the end of an answer
read nothing ahead, and every message is answered whole. With it on (the default), the same
steps do read ahead. Pilot on the scripted engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from helpers import SIZE, burst, ready, until
from textual import events

from phichat.config import load_settings
from phichat.session import ChatSession
from phichat.tui import reading
from phichat.tui.app import PhichatApp
from phichat.tui.chat import AnswerMessage
from phichat.tui.prompt import PromptInput


@pytest.mark.slow
@pytest.mark.parametrize("read_ahead", [True, False], ids=["on", "off"])
async def test_read_ahead_false_reads_nothing_ahead_and_answers_the_whole_message(
    read_ahead: bool,
    apps: Callable[..., PhichatApp],
    fake_engine: FakeEngine,
    minilm_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reading, "READ_AHEAD_PAUSE_S", 0.0)  # typing reads ahead at once
    settings = load_settings("cpu", None, {"chat": {"read_ahead": read_ahead}})
    app = apps(settings, lambda tqdm_class: ChatSession.open(settings, fake_engine))
    first = "Summarise this the river runs to the sea"
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        burst(app, "Summarise this ")
        app.post_message(events.Paste("the river runs to the sea"))
        await until(lambda: app.query_one(PromptInput).text == first, "the paste")
        if read_ahead:
            await until(lambda: fake_engine.read_aheads, "a read-ahead")
        await pilot.press("enter")
        await until(lambda: len(app.query(AnswerMessage)) == 1 and not app.chat.busy, "answer 1")
        burst(app, "And where does it start?")
        await until(lambda: app.query_one(PromptInput).text.endswith("start?"), "the text")
        await pilot.press("enter")
        await until(lambda: len(app.query(AnswerMessage)) == 2 and not app.chat.busy, "answer 2")
    assert [prompt[-1]["content"] for prompt in fake_engine.prompts] == [
        first,
        "And where does it start?",
    ]
    assert bool(fake_engine.read_aheads) == read_ahead
