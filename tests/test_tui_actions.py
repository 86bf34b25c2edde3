"""The app's everyday actions, driven by Pilot: copy (what the app sent to the clipboard),
regenerate, edit-and-resend, the command palette, saved settings, remapped keys and export on the
scripted engine (tests/fake_engine.py) with the real store; switching between two real local
models; and one run of the installed `phichat` in a real terminal (tmux) covering copy and
regenerate. Apps are shut down by the `apps` fixture."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_engine import ANSWER, STORY, FakeEngine
from helpers import (
    LONG_PROMPT,
    SIZE,
    TIMEOUT_S,
    Tmux,
    ask,
    burst,
    held_text,
    notes,
    ready,
    start_held_answer,
    store_conversations,
    tui_settings,
    until,
    wait_until,
)
from textual.command import CommandInput, CommandList, CommandPalette
from textual.widgets import Button, Checkbox, Input, Label, OptionList, ProgressBar

from phichat import hub
from phichat.config import DEFAULT_MODEL, PHI3_FILE, KeySettings, Settings, load_settings, spec_of
from phichat.session import ChatSession
from phichat.store import Store, default_path
from phichat.tui.app import PhichatApp
from phichat.tui.chat import AnswerMessage, ChatView, UserMessage
from phichat.tui.palette import screen_actions
from phichat.tui.prompt import EDITING, PromptInput
from phichat.tui.screens import ConfirmScreen, ExportScreen, PickScreen, SettingsScreen
from phichat.tui.side import ConversationList, SidePane

CODE_ANSWER = """Two ways:

```python
def add(a, b):
    return a + b
```

and in the shell:

```sh
echo $((1 + 2))
```
"""


def stored_conversation() -> int:
    """A conversation whose answer holds two code blocks; returns its id."""
    with Store.open(default_path()) as store:
        conversation = store.create_conversation(title="Adding")
        store.add_message(conversation.id, "user", "How do I add two numbers?")
        store.add_message(conversation.id, "assistant", CODE_ANSWER)
    return conversation.id


async def open_conversation(pilot: Any, conversation_id: int) -> None:
    app = pilot.app
    app.query_one(SidePane).post_message(SidePane.Open(conversation_id))
    await until(lambda: app.query(AnswerMessage), "the conversation")
    await pilot.pause()


def stored_flags(session: Any) -> list[tuple[str, bool]]:
    return [(m.role, m.replaced) for m in session.messages(session.conversation_id)]


def on_engine(
    apps: Callable[..., PhichatApp], engine: FakeEngine, settings: Settings
) -> PhichatApp:
    """An app with these settings whose session runs on the scripted `engine`."""
    return apps(settings, lambda tqdm_class: ChatSession.open(settings, engine))


@pytest.mark.slow
async def test_copy_the_answer_a_message_and_a_code_block(
    scripted: Callable[..., PhichatApp],
) -> None:
    conversation = stored_conversation()
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await open_conversation(pilot, conversation)
        await pilot.press("ctrl+t")
        assert app.clipboard == CODE_ANSWER
        assert f"copied the answer ({len(CODE_ANSWER)} characters)" in notes(app)

        await pilot.press("ctrl+g")  # two code blocks: which one?
        assert isinstance(app.screen, PickScreen)
        await pilot.press("down", "enter")
        assert app.clipboard == "echo $((1 + 2))\n"
        assert any("copied a sh code block, 1 line (" in n for n in notes(app))

        chat = app.query_one(ChatView)
        chat.focus()  # the chat selects its last message; up: the question
        await pilot.press("up", "c")
        assert app.clipboard == "How do I add two numbers?"
        await pilot.press("down", "enter")  # the answer's actions
        assert isinstance(app.screen, PickScreen)
        choices = app.screen.query_one(OptionList)
        labels = [str(choices.get_option_at_index(i).prompt) for i in range(choices.option_count)]
        assert labels == [
            "Copy this message",
            "Copy a code block",
            "Answer again (regenerate)",
            "Fork the conversation here",
        ]
        await pilot.press("down", "enter", "enter")  # copy a code block: the first
        assert app.clipboard == "def add(a, b):\n    return a + b\n"


async def test_regenerate_keeps_both_answers(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(seed=7)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await ask(pilot, "Tell me a short story about a cat.")
        fake_engine.answer = "Another story, about a fox."
        await pilot.press("ctrl+r")
        await until(lambda: not app.chat.busy and len(stored_flags(session)) == 3, "the new answer")
        await pilot.pause()
        assert stored_flags(session) == [("user", False), ("assistant", True), ("assistant", False)]
        old, new = session.messages(session.conversation_id)[1:]
        assert (old.content, new.content) == (ANSWER, "Another story, about a fox.")
        assert old.sampling["seed"] == 7 and new.sampling["seed"] != 7  # a fresh seed
        assert [m["content"] for m in fake_engine.prompts[-1]] == [
            "Tell me a short story about a cat."
        ]  # asked again without the old answer
        assert [a.text for a in app.query(AnswerMessage)] == [new.content]
        await pilot.press("f3")  # show the replaced answer, marked
        await until(lambda: len(app.query(AnswerMessage)) == 2, "the replaced answer")
        shown_old, shown_new = app.query(AnswerMessage)
        assert (shown_old.text, shown_new.text) == (ANSWER, new.content)
        assert shown_old.has_class("-replaced")
        assert str(shown_old.query_one(".note").render()) == "replaced"
        await pilot.press("ctrl+t")
        assert app.clipboard == new.content  # the answer that stands


@pytest.mark.slow
async def test_edit_replaces_the_last_exchange(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await ask(pilot, "What is the capital of France?")
        await ask(pilot, "And of Itly?")
        box = app.query_one(PromptInput)
        await pilot.press("up")  # in the empty box: the last message, to edit
        assert box.text == "And of Itly?" and box.editing
        assert box.border_title == EDITING.format(send="Enter", stop="Esc")
        box.load_text("And of Italy?")
        await pilot.press("enter")
        await until(lambda: not app.chat.busy and len(stored_flags(session)) == 6, "the answer")
        await pilot.pause()
        assert stored_flags(session) == [
            ("user", False),
            ("assistant", False),
            ("user", True),
            ("assistant", True),
            ("user", False),
            ("assistant", False),
        ]
        shown = [w.text for w in app.query(UserMessage)]
        assert shown == ["What is the capital of France?", "And of Italy?"]
        asked = [m["content"] for m in fake_engine.prompts[-1]]
        assert "And of Itly?" not in asked and asked[-1] == "And of Italy?"
        assert len(app.query(AnswerMessage)) == 2 and not box.editing and box.text == ""
        await pilot.press("up", "escape")  # Esc leaves editing
        assert box.text == "" and not box.editing


@pytest.mark.slow
async def test_up_while_answering_offers_the_message_being_answered(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await ask(pilot, "First question.")
        await start_held_answer(pilot, fake_engine, 3)
        box = app.query_one(PromptInput)
        await pilot.press("up")
        assert box.text == LONG_PROMPT and box.editing
        fake_engine.release()
        await until(lambda: not app.chat.busy, "the answer to end")
        assert box.text == LONG_PROMPT and box.editing  # still that message


# --- during an answer: delete, switch and show replaced ----------------------------------------

WAIT = "wait for the answer first (Esc stops it)"


def errors(app: PhichatApp) -> list[str]:
    return [str(n.message) for n in app._notifications if n.severity == "error"]


def status_of(app: PhichatApp) -> str:
    return str(app.query_one("#status").render())


async def delete_in_the_side_pane(pilot: Any, conversation_id: int) -> ConversationList:
    """Highlight the conversation in the side pane's list, press d and confirm."""
    app = pilot.app
    await pilot.press("ctrl+b")
    listing = app.query_one(ConversationList)
    listing.focus()
    listing.highlighted = listing.get_option_index(str(conversation_id))
    await pilot.press("d")
    assert isinstance(app.screen, ConfirmScreen)
    await pilot.press("y")
    return listing


@pytest.mark.slow
async def test_deleting_the_conversation_being_answered_stops_the_answer_first(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(max_tokens=2000)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await start_held_answer(pilot, fake_engine, 12)
        answered = session.conversation_id
        assert answered is not None
        listing = await delete_in_the_side_pane(pilot, answered)
        await until(lambda: session.conversation_id is None and not app.chat.busy, "the delete")
        await until(lambda: listing.option_count == 0, "the list without it")
        await until(lambda: fake_engine.forgotten, "the engine to forget its state")
        assert fake_engine.on_main_thread == []  # nothing waited for the engine on the UI
        assert session.last_stats is not None and session.last_stats.finish == "stopped"
        assert answered not in {c.id for c in session.conversations()}
        assert fake_engine.forgotten[0].endswith(f"-{answered}")
        await until(lambda: not app.query(AnswerMessage), "the chat cleared")
        assert not app.query(UserMessage) and "ready" in status_of(app)
        assert errors(app) == []  # no "no message N" from an answer saved into it
        fake_engine.answer, fake_engine.hold_at = ANSWER, None
        answer = await ask(pilot, "Still there?")  # a new conversation
        assert answer.text == ANSWER and session.conversation_id is not None
        assert [m.status for m in session.messages(session.conversation_id)] == [
            "finished",
            "finished",
        ]
        assert errors(app) == []


@pytest.mark.slow
async def test_deleting_another_conversation_while_answering_lets_the_answer_go_on(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    ids = store_conversations()
    app = scripted(max_tokens=2000)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        answer = await start_held_answer(pilot, fake_engine, 5)
        gone = ids["Bike repair"]
        listing = await delete_in_the_side_pane(pilot, gone)
        await until(lambda: gone not in {c.id for c in session.conversations()}, "the delete")
        await until(lambda: listing.option_count == 3, "the list without it")
        assert fake_engine.on_main_thread == []  # the UI never waited for the engine
        assert app.chat.busy and fake_engine.holding.is_set()  # the answer goes on
        assert fake_engine.forgotten == []  # its state is forgotten once the answer ends
        await pilot.press("escape")  # and Esc still stops it
        await until(lambda: not app.chat.busy, "the stop")
        assert answer.text == held_text(5)
        assert str(answer.query_one(".note").render()) == "stopped"
        stored = session.messages(session.conversation_id)[-1]
        assert (stored.status, stored.content) == ("stopped", held_text(5))
        await until(lambda: fake_engine.forgotten, "the engine to forget the state")
        assert fake_engine.forgotten[0].endswith(f"-{gone}")
        assert errors(app) == [] and fake_engine.on_main_thread == []


@pytest.mark.slow
async def test_switching_conversation_while_answering_is_refused_with_a_notice(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    ids = store_conversations()
    app = scripted(max_tokens=2000)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        answer = await start_held_answer(pilot, fake_engine, 5)
        answered = session.conversation_id
        await pilot.press("ctrl+b")
        listing = app.query_one(ConversationList)
        listing.focus()
        listing.highlighted = listing.get_option_index(str(ids["Puppy food"]))
        await pilot.press("enter")
        await until(lambda: WAIT in notes(app), "the notice")
        assert session.conversation_id == answered and app.chat.busy
        assert app.query(AnswerMessage).last() is answer  # the answer stays in view
        fake_engine.release()
        await until(lambda: not app.chat.busy, "the answer to end")
        assert answer.text == STORY and session.conversation_id == answered
        stored = session.messages(answered)[-1]
        assert (stored.status, stored.content) == ("finished", STORY)
        assert fake_engine.on_main_thread == [] and errors(app) == []


@pytest.mark.slow
async def test_show_replaced_while_answering_waits_for_the_answer(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(max_tokens=2000)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        answer = await start_held_answer(pilot, fake_engine, 12)
        await pilot.press("f3")
        await until(lambda: WAIT in notes(app), "the notice")
        assert not app.chat.show_replaced
        assert app.query(AnswerMessage).last() is answer  # still the one being written
        assert not answer.query_one(".note").display  # not marked stopped
        assert "answering" in status_of(app)
        fake_engine.release()
        await until(lambda: not app.chat.busy, "the answer to end")
        assert [a.text for a in app.query(AnswerMessage)] == [STORY]
        assert not answer.query_one(".note").display and "ready" in status_of(app)
        stored = session.messages(session.conversation_id)[-1]
        assert (stored.status, stored.content) == ("finished", STORY)
        await pilot.press("f3")  # once it has ended, it works
        assert app.chat.show_replaced and "replaced answers shown" in notes(app)


@pytest.mark.slow
async def test_the_palette_lists_and_runs_every_action(
    scripted: Callable[..., PhichatApp],
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        ran: list[str] = []
        run_action = app.run_action

        async def recorded(action: str, *args: Any, **kwargs: Any) -> bool:
            ran.append(action)
            return await run_action(action, *args, **kwargs)

        app.run_action = recorded  # type: ignore[method-assign]
        actions = screen_actions()  # all but the message box's own keys (send, newline)
        await pilot.press("ctrl+p")
        assert isinstance(app.screen, CommandPalette)
        listing = app.screen.query_one(CommandList)
        await until(lambda: listing.option_count >= len(actions), "the commands")
        listed = [str(listing.get_option_at_index(i).prompt) for i in range(listing.option_count)]
        for f in actions:
            label = spec_of(f).label
            assert any(entry.startswith(f"{label}\n") for entry in listed), label
            assert any(f"({getattr(KeySettings(), f.name)})" in entry for entry in listed)
        await pilot.press("escape")
        for f in actions:
            await pilot.press("ctrl+p")
            app.screen.query_one(CommandInput).value = str(spec_of(f).label)  # as if typed
            matches = app.screen.query_one(CommandList)
            await until(lambda matches=matches: matches.option_count, "a match")
            ran.clear()
            await pilot.press("enter")
            await until(lambda f=f: f.name in ran, f"{f.name} to run")
            await pilot.pause()
            while len(app.screen_stack) > 1:
                await pilot.press("escape")  # close what the action opened


@pytest.mark.slow
async def test_saved_settings_are_read_back_by_a_new_app(
    scripted: Callable[..., PhichatApp],
) -> None:
    app = scripted(max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature", Input).value = "0.25"
        app.screen.query_one("#seed", Input).value = "42"
        app.screen.query_one("#system").load_text("Answer in French.")
        app.screen.query_one("#save", Button).press()
        await until(lambda: not isinstance(app.screen, SettingsScreen), "the save")
        saved = "saved temperature, seed, system to"
        await until(lambda: any(saved in n for n in notes(app)), "the note of what was saved")

    again = scripted(max_tokens=8)
    async with again.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        assert (session.sampling.temperature, session.sampling.seed) == (0.25, 42)
        assert session.system == "Answer in French."
        await pilot.press("ctrl+s")
        assert again.screen.query_one("#temperature", Input).value == "0.25"


async def test_a_key_remapped_in_the_config_runs_its_action(
    apps: Callable[..., PhichatApp], fake_engine: FakeEngine, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys]\ncopy_answer = "f9"\n')
    app = on_engine(apps, fake_engine, load_settings("cpu", keys))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await ask(pilot, "Name a fruit.")
        await pilot.press("ctrl+t")  # the default key no longer copies
        assert app.clipboard == ""
        await pilot.press("f9")
        assert app.clipboard == answer.text == ANSWER


@pytest.mark.slow
async def test_export_writes_the_conversation_as_markdown(
    scripted: Callable[..., PhichatApp], tmp_path: Path
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        answer = await ask(pilot, "Name a river.")
        await pilot.press("f5")
        assert isinstance(app.screen, ExportScreen)
        path = app.screen.query_one("#path", Input)
        assert path.value.endswith("-name-a-river.md")
        path.value = str(tmp_path / "river.md")
        await pilot.press("enter")
        await until((tmp_path / "river.md").exists, "the file")
        text = (tmp_path / "river.md").read_text()
        assert "## User\n\nName a river." in text and answer.text in text
        assert any("exported the conversation to" in n for n in notes(app))


@pytest.mark.slow
async def test_the_side_pane_searches_this_chat_or_all(
    scripted: Callable[..., PhichatApp],
) -> None:
    ids = store_conversations()
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        results = app.query_one("#results", OptionList)
        title = app.query_one("#results-title", Label)

        def found() -> set[int]:
            options = (results.get_option_at_index(i) for i in range(results.option_count))
            return {int(str(option.id).split(":")[0]) for option in options}

        async def heading(text: str) -> None:
            await until(lambda: str(title.render()).startswith(text), text)

        async def switch(conversation_id: int) -> None:
            app.query_one(SidePane).post_message(SidePane.Open(conversation_id))
            await until(lambda: session.conversation_id == conversation_id, "the switch")

        await switch(ids["Bike repair"])
        await pilot.press("ctrl+f")
        burst(app, "a good book, food or a wheel")
        await heading("Results (")
        assert len(found()) > 1  # every chat
        await pilot.press("tab", "tab", "space")  # past "in chats" to "this chat only", tick it
        assert app.query_one("#scope", Checkbox).value
        await heading("Results in this chat (")
        assert found() == {ids["Bike repair"]}
        await switch(ids["Puppy food"])
        await until(lambda: found() == {ids["Puppy food"]}, "the search in the chat opened")
        await pilot.press("ctrl+n")
        await heading("Results in this chat (0)")
        await pilot.press("ctrl+f", "tab", "tab", "space")
        await heading("Results (")
        assert len(found()) > 1


@pytest.mark.slow
async def test_switching_to_a_second_local_model_answers_with_it(
    apps: Callable[..., PhichatApp],
    smollm_config: Path,
    tiny_phi3_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from tiny_phi3 import ANSWER as PHI3_ANSWER

    go = threading.Event()
    cached = huggingface_hub.hf_hub_download

    def first_download(*args: Any, **kwargs: Any) -> str:
        """As if the file were not cached yet: the Hub 'sends' it in two parts."""
        if kwargs.get("local_files_only"):
            if not go.is_set():
                raise LocalEntryNotFoundError("not cached")
            return cached(*args, **kwargs)
        bar = kwargs["tqdm_class"](total=1000, mininterval=0)
        bar.update(400)
        go.wait(TIMEOUT_S)
        bar.update(600)
        bar.close()
        return cached(*args, **{**kwargs, "local_files_only": True})

    app = apps(tui_settings(smollm_config))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        smol = await ask(pilot, "Say something.")
        assert smol.text != PHI3_ANSWER
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", first_download)
        monkeypatch.setattr(hub, "_unreachable", lambda: None)  # this fake Hub answers
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, PickScreen)
        choices = app.screen.query_one(OptionList)
        first = str(choices.get_option_at_index(0).prompt)
        assert first.startswith(DEFAULT_MODEL) and "to download" not in first
        await pilot.press("enter")
        try:
            bar = app.query_one("#download", ProgressBar)
            await until(lambda: bar.progress == 400, "the download bar")
            assert bar.display and bar.total == 1000
            assert f"downloading {DEFAULT_MODEL}" in str(app.query_one("#status").render())
            second = await ask(pilot, "Still there?")  # answers go on meanwhile
            assert second.text != PHI3_ANSWER
        finally:
            go.set()
        await until(lambda: session.engine.model_label == PHI3_FILE, "the switch")
        await until(lambda: f"now answering with {DEFAULT_MODEL}" in notes(app), "the notice")
        assert not bar.display and PHI3_FILE in str(app.query_one("#status").render())
        third = await ask(pilot, "And now?")
        assert third.text == PHI3_ANSWER
        models = [m.model for m in session.messages(session.conversation_id)]
        smollm_file = session.messages(session.conversation_id)[1].model
        assert models == [None, smollm_file, None, smollm_file, None, PHI3_FILE]
        assert smollm_file != PHI3_FILE


def stored() -> list[Any]:
    """The messages of the only conversation in the history (none before there is one)."""
    if not default_path().exists():
        return []
    with Store.open(default_path()) as store:
        conversations = store.conversations()
        return store.messages(conversations[0].id) if conversations else []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_copy_and_regenerate_in_a_real_terminal(smollm_config: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "phichat"
    flags = ["--config", str(smollm_config), "--temperature", "0.9", "--max-tokens", "16"]
    done = tmp_path / "exit-code"
    tmux = Tmux(tmp_path / "tmux.sock")
    try:
        tmux.start(["sh", "-c", f"{exe} {' '.join(flags)}; echo $? > {done}"])
        subprocess.run([*tmux.base, "set", "-g", "set-clipboard", "on"], check=True)
        tmux.wait(lambda s: "· ready" in s, "the model")
        tmux.keys("-l", "Tell me about owls.")
        tmux.keys("Enter")
        tmux.wait(lambda s: "tok/s" in s and "· ready" in s, "the answer")
        tmux.keys("C-t")
        tmux.wait(lambda s: "copied the answer" in s, "the copy notice")
        copied = subprocess.run([*tmux.base, "show-buffer"], capture_output=True, text=True)
        tmux.keys("C-r")
        wait_until(lambda: len(stored()) >= 3, "the new answer to be saved")
        tmux.wait(lambda s: "· ready" in s, "the app to be ready again")
        tmux.keys("C-q")
        assert tmux.exit_code(done) == "0"
    finally:
        tmux.kill()
    messages = stored()
    assert [(m.role, m.replaced) for m in messages] == [
        ("user", False),
        ("assistant", True),
        ("assistant", False),
    ]
    assert copied.stdout == messages[1].content  # OSC 52 reached the terminal (tmux's buffer)


def test_the_default_keys_are_free_in_the_message_box_and_the_search_box() -> None:
    """The app's keys reach the app while the user types (a widget's own binding would win)."""
    from textual.widgets import Input

    defaults = {key.strip() for f in screen_actions() for key in str(f.default).split(",")}
    for widget in (PromptInput, Input):
        taken = set(widget._merged_bindings.key_to_bindings)  # type: ignore[union-attr]
        assert not defaults & taken, (widget.__name__, defaults & taken)
