"""As an answer ends, the app reads the next turn's history ahead (issue 18: where the next turn
moves the cut into old history, the window it keeps is read while the user reads the answer),
and sending stops that read at once. Pilot on the scripted engine, whose read-ahead can be held
until it is stopped."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fake_engine import ANSWER, FakeEngine
from helpers import SIZE, burst, ready, until

from phichat.tui import reading
from phichat.tui.app import PhichatApp
from phichat.tui.chat import AnswerMessage
from phichat.tui.prompt import PromptInput

QUESTION = "Name three rivers in Europe."
NEXT = "Which one is the longest?"


def status(app: PhichatApp) -> str:
    return str(app.query_one("#status").render())


async def test_an_answer_ending_reads_the_next_turn_ahead_until_the_user_sends(
    scripted: Callable[..., PhichatApp],
    fake_engine: FakeEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reading, "READ_AHEAD_PAUSE_S", 3600.0)  # none while typing
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        fake_engine.hold_reading = True
        burst(app, QUESTION)
        await until(lambda: app.query_one(PromptInput).text == QUESTION, "the text")
        assert not fake_engine.read_aheads
        await pilot.press("enter")
        await until(fake_engine.reading.is_set, "the next turn's read-ahead")
        read = fake_engine.read_aheads[-1]
        assert [m["content"] for m in read[-3:]] == [QUESTION, ANSWER, ""]
        await until(lambda: "reading ahead…" in status(app), "the status line")
        burst(app, NEXT)
        await until(lambda: app.query_one(PromptInput).text == NEXT, "the next text")
        await pilot.press("enter")  # stops the held read-ahead: the answer comes
        await until(lambda: len(fake_engine.prompts) == 2, "the second answer")
        assert fake_engine.prompts[-1][-1]["content"] == NEXT
        await until(lambda: len(app.query(AnswerMessage)) == 2, "the answer shown")
        await until(lambda: app.query(AnswerMessage).last().text == ANSWER, "its text")
