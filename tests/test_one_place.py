"""Facts kept in one place (issue 21): a message of nothing but whitespace and control
characters is refused alike when sent, edited in the core, or sent from the message box; a
conversation without a title is named alike in the history and its export; the keys that hints
on screen name are the ones `[keys]` binds. And no import circle: the engine protocol imports
no engine."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fake_engine import FakeEngine
from helpers import SIZE, ask, notes, ready, start_held_answer, until
from textual.widgets import Static

from phichat.config import load_settings
from phichat.errors import UsageError
from phichat.session import ChatSession
from phichat.store import Store
from phichat.tui.app import PhichatApp
from phichat.tui.chat import UserMessage
from phichat.tui.prompt import PromptInput

if TYPE_CHECKING:
    from conftest import CliRun

CONTROLS_ONLY = "\x01\x02 \x1b\t\u200b"  # .strip() keeps \x01\x02\x1b\u200b: not empty to it


@pytest.fixture
def session(fake_engine: FakeEngine) -> Iterator[ChatSession]:
    opened = ChatSession.open(load_settings("cpu"), fake_engine, remember=False)
    yield opened
    opened.close()


def test_an_edit_of_only_control_characters_is_refused_as_a_send_is(
    session: ChatSession, fake_engine: FakeEngine
) -> None:
    "".join(session.send("What is the capital of France?"))
    for action in (session.send, session.edit_last):
        with pytest.raises(UsageError, match="the message is empty"):
            "".join(action(CONTROLS_ONLY))
    assert session.history[0].content == "What is the capital of France?"
    assert len(session.history) == 2 and len(fake_engine.prompts) == 1


@pytest.mark.slow
async def test_the_message_box_sends_no_message_of_only_control_characters(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await ask(pilot, "What is the capital of France?")
        box = app.query_one(PromptInput)
        for editing in (False, True):
            if editing:
                box.clear()
                await pilot.press("up")  # in the empty box: the last message, to edit
                assert box.editing
            box.load_text(CONTROLS_ONLY)
            await pilot.press("enter")
            await pilot.pause()
            assert box.text == CONTROLS_ONLY and box.editing == editing  # kept, not sent
            assert not app.chat.busy and len(fake_engine.prompts) == 1
            assert not notes(app)  # no error either: nothing was sent to refuse
        box.load_text("And of Italy?")
        await pilot.press("enter")  # still editing: this replaces the last message
        await until(lambda: not app.chat.busy and len(fake_engine.prompts) == 2, "the answer")
        shown = [w.text for w in app.query(UserMessage)]
        assert shown == ["And of Italy?"]


def test_a_conversation_without_a_title_is_named_alike_in_the_history_and_its_export(
    phichat_cli: CliRun,
) -> None:
    with Store.open() as store:
        chat = store.create_conversation()
        store.add_message(chat.id, "user", "A question that named it")
        store.set_title(chat.id, "")
    listed = phichat_cli("history")
    exported = phichat_cli("export", str(chat.id), "--format", "md")
    assert listed.returncode == exported.returncode == 0, listed.stderr + exported.stderr
    assert "(untitled)" in listed.stdout
    assert exported.stdout.startswith("# (untitled)\n")


@pytest.mark.slow
async def test_the_hints_on_screen_name_the_keys_the_keymap_binds(
    apps: Callable[..., PhichatApp], fake_engine: FakeEngine, minilm_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "keys.toml"
    config.write_text('[keys]\nstop = "f10"\ntoggle_side = "f9,ctrl+b"\nsettings = "f2"\n')
    settings = load_settings("cpu", config)
    app = apps(settings, lambda tqdm_class: ChatSession.open(settings, fake_engine))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        welcome = str(app.query_one("#welcome", Static).render())
        assert "f10 stops an answer · f9 conversations and search · ctrl+n new chat · " in welcome
        assert "f2 settings" in welcome and "Esc" not in welcome
        await start_held_answer(pilot, fake_engine, 3)
        assert "answering… (f10 stops)" in str(app.query_one("#status").render())
        await pilot.press("f10")  # the remapped stop key
        await until(lambda: not app.chat.busy, "the answer to stop")
        box = app.query_one(PromptInput)
        box.clear()
        await pilot.press("up")  # the last message, offered for editing
        assert box.editing and box.border_title is not None
        assert str(box.border_title).endswith("f10 cancels")
        await pilot.press("f10")  # leaves editing, as Esc does by default
        assert not box.editing


def test_the_engine_protocol_imports_no_engine() -> None:
    import phichat.engine

    tree = ast.parse(Path(phichat.engine.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    ours = {name for name in imported if name.split(".")[0] == "phichat"}
    assert ours == {"phichat.config"}  # for types only: no engine, no factory, no hub
