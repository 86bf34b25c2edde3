"""The app reads the message while it is typed (issue 18): after a pause in typing and at once
on a paste; never while an answer is written; Enter, Escape, a conversation switch, the
settings and quitting stop a read-ahead under way at once, with no hang and the right answer.
Pilot on the scripted engine, whose read-ahead can be held until it is stopped."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_engine import ANSWER, FakeEngine
from helpers import (
    SIZE,
    burst,
    ready,
    start_held_answer,
    store_conversations,
    tui_settings,
    until,
)
from textual import events

from phichat.config import PHI3_FILE
from phichat.session import ChatSession
from phichat.tui import reading
from phichat.tui.app import PhichatApp
from phichat.tui.chat import AnswerMessage
from phichat.tui.prompt import PromptInput
from phichat.tui.screens import PickScreen, SettingsScreen
from phichat.tui.side import SidePane

DRAFT = "Which of the rivers is the lon"
SETTLED = "Which of the rivers is the"


@pytest.mark.slow
async def test_on_the_real_model_enter_reads_only_the_end_of_a_message_read_ahead(
    apps: Callable[..., PhichatApp], smollm_config: Path
) -> None:
    app = apps(tui_settings(smollm_config, max_tokens=8))
    text = "Name three rivers in Europe, and tell me which of them is the longest one."
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        burst(app, text)
        await until(lambda: app.query_one(PromptInput).text == text, "the text")
        llama = session.engine.llama
        await until(lambda: llama.n_tokens > 20 and app.chat._read_text is None, "the read-ahead")
        await until(
            lambda: app.chat._read_timer is None and app.chat._read_text is None, "the last one"
        )
        await pilot.press("enter")
        await until(lambda: session.last_stats is not None and not app.chat.busy, "the answer")
        found = re.search(r"re-read (\d+)", status(app))
        assert found is not None and int(found.group(1)) <= 16, status(app)
        assert app.query(AnswerMessage).last().text


def status(app: PhichatApp) -> str:
    return str(app.query_one("#status").render())


def last_read(engine: FakeEngine) -> str:
    """The text of the last message of the last prompt read ahead."""
    return engine.read_aheads[-1][-1]["content"]


async def held_read_ahead(app: PhichatApp, engine: FakeEngine, draft: str = DRAFT) -> None:
    """Type `draft` and wait for its read-ahead, which holds until it is stopped."""
    engine.hold_reading = True
    burst(app, draft)
    await until(lambda: engine.reading.is_set() and last_read(engine) == SETTLED, "read-ahead")


async def test_a_pause_in_typing_reads_the_settled_draft_ahead(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await held_read_ahead(app, fake_engine)
        await until(lambda: "reading ahead…" in status(app), "the status line")
        fake_engine.hold_reading = False
        await until(lambda: status(app).endswith("ready"), "the read-ahead to end")
        assert not fake_engine.prompts  # nothing was answered


@pytest.mark.slow
async def test_typing_on_lets_the_read_ahead_go_on_and_an_edit_before_it_stops_it(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await held_read_ahead(app, fake_engine)
        count = len(fake_engine.read_aheads)
        burst(app, "gest of them ")
        await until(lambda: app.query_one(PromptInput).text.endswith("them "), "the text")
        await pilot.pause(0.5)
        assert fake_engine.reading.is_set() and len(fake_engine.read_aheads) == count
        fake_engine.hold_reading = False  # it ends: what was typed meanwhile is read at once
        await until(lambda: last_read(fake_engine) == f"{SETTLED} longest of them", "read on")
        fake_engine.hold_reading = True
        burst(app, "all ")
        await until(fake_engine.reading.is_set, "the next read-ahead")
        count = len(fake_engine.read_aheads)
        app.query_one(PromptInput).move_cursor((0, 0))
        burst(app, "So ")
        await until(lambda: last_read(fake_engine).startswith("So Which"), "a read of the edit")
        assert len(fake_engine.read_aheads) == count + 1


async def test_enter_stops_the_read_ahead_and_the_whole_message_is_answered(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await held_read_ahead(app, fake_engine)
        burst(app, "gest?")
        await pilot.press("enter")
        await until(lambda: fake_engine.prompts, "the answer")  # the held read-ahead stopped
        fake_engine.hold_reading = False  # the next turn's, as the answer ends, does not hold
        await until(lambda: not app.chat.busy, "the answer to end")
        await until(lambda: not fake_engine.reading.is_set(), "no read-ahead held")
        assert fake_engine.prompts[-1][-1]["content"] == DRAFT + "gest?"
        assert app.query(AnswerMessage).last().text == ANSWER


@pytest.mark.slow
async def test_no_read_ahead_while_an_answer_is_written(
    scripted: Callable[..., PhichatApp],
    fake_engine: FakeEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reading, "READ_AHEAD_PAUSE_S", 0.05)
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await start_held_answer(pilot, fake_engine, 2)
        before = len(fake_engine.read_aheads)
        burst(app, "And what about the mountains ")
        await until(lambda: app.query_one(PromptInput).text.endswith("mountains "), "the text")
        await pilot.pause(0.3)
        assert len(fake_engine.read_aheads) == before
        assert "answering" in status(app)
        await pilot.press("escape")
        await until(lambda: not app.chat.busy, "the answer to stop")


@pytest.mark.slow
async def test_escape_stops_the_read_ahead(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await held_read_ahead(app, fake_engine)
        await pilot.press("escape")
        await until(lambda: not fake_engine.reading.is_set(), "the read-ahead to stop")
        await until(lambda: status(app).endswith("ready"), "the status line")
        assert app.query_one(PromptInput).text == DRAFT  # nothing typed is lost


async def test_a_paste_is_read_ahead_at_once(
    scripted: Callable[..., PhichatApp],
    fake_engine: FakeEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reading, "READ_AHEAD_PAUSE_S", 3600.0)  # typing alone: never
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        burst(app, "Summarise this ")
        await until(lambda: app.query_one(PromptInput).text == "Summarise this ", "the text")
        await pilot.pause(0.2)
        assert not fake_engine.read_aheads
        app.post_message(events.Paste("the river runs to the sea\n"))
        await until(lambda: fake_engine.read_aheads, "a read-ahead")
        assert last_read(fake_engine) == "Summarise this the river runs to the sea"


async def test_a_conversation_switch_stops_the_read_ahead_and_reads_the_other(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    ids = store_conversations()
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await held_read_ahead(app, fake_engine)
        count = len(fake_engine.read_aheads)
        app.query_one(SidePane).post_message(SidePane.Open(ids["Puppy food"]))
        await until(lambda: len(fake_engine.read_aheads) > count, "the next read-ahead")
        prompt = fake_engine.read_aheads[-1]
        assert prompt[0]["content"] == "What should I feed my new puppy?"
        assert prompt[-1]["content"] == SETTLED
        fake_engine.hold_reading = False
        burst(app, "gest?")
        await pilot.press("enter")
        await until(lambda: fake_engine.prompts, "the answer")
        assert fake_engine.prompts[-1][0]["content"] == "What should I feed my new puppy?"


async def test_the_settings_stop_the_read_ahead_until_they_close(
    scripted: Callable[..., PhichatApp],
    fake_engine: FakeEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reading, "READ_AHEAD_PAUSE_S", 0.05)
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await held_read_ahead(app, fake_engine)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        await until(lambda: not fake_engine.reading.is_set(), "the read-ahead to stop")
        count = len(fake_engine.read_aheads)
        app.screen.query_one("#system").load_text("Answer like a pirate.")
        await pilot.pause(0.3)
        assert len(fake_engine.read_aheads) == count  # none while the settings are open
        await pilot.press("ctrl+s")
        assert session.system == "Answer like a pirate."
        await until(lambda: len(fake_engine.read_aheads) > count, "a read-ahead once closed")
        assert fake_engine.read_aheads[-1][0]["content"] == "Answer like a pirate."


@pytest.mark.slow
async def test_a_model_switch_stops_the_read_ahead_and_the_new_model_reads_the_draft(
    apps: Callable[..., PhichatApp],
    fake_engine: FakeEngine,
    smollm_config: Path,
    tiny_phi3_path: Path,
) -> None:
    settings = tui_settings(smollm_config)  # answered by the scripted engine until the switch
    app = apps(settings, lambda tqdm_class: ChatSession.open(settings, fake_engine))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await held_read_ahead(app, fake_engine)
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, PickScreen)
        assert fake_engine.reading.is_set()  # picking is not switching yet
        await pilot.press("enter")  # the first: Phi-3, the tiny one in the cache
        await until(lambda: not fake_engine.reading.is_set(), "the read-ahead to stop")
        await until(lambda: session.engine.model_label == PHI3_FILE, "the switch")
        llama = session.engine.llama
        await until(lambda: llama.n_tokens > 0 and app.chat._read_text is None, "a read on Phi-3")
        await pilot.press("enter")
        await until(lambda: session.last_stats is not None and not app.chat.busy, "the answer")
        assert app.query(AnswerMessage).last().text == "Hello world"
        stats = session.last_stats
        assert stats.prompt_tokens - stats.cached_tokens <= 12


async def test_quitting_during_a_read_ahead_does_not_hang(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await held_read_ahead(app, fake_engine)
        await pilot.press("ctrl+q")
    closing = threading.Thread(target=app.shutdown)
    closing.start()
    closing.join(timeout=10)
    assert not closing.is_alive()
    assert not fake_engine.reading.is_set()
