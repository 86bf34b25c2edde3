"""The Textual app, driven by Pilot with the real SmolLM2 model and the real embedder, plus one
run of the installed `phichat` in a real terminal under tmux."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual import events
from textual.pilot import Pilot
from textual.widgets import Input, OptionList, ProgressBar

from phichat.config import Settings, load_settings
from phichat.errors import PhichatError
from phichat.session import ChatSession
from phichat.store import Store, default_path
from phichat.tui.app import PhichatApp, load_session
from phichat.tui.chat import AnswerMessage, ChatView, UserMessage
from phichat.tui.prompt import PromptInput
from phichat.tui.screens import ConfirmScreen, RenameScreen, SettingsScreen
from phichat.tui.side import ConversationList, SidePane

SIZE = (110, 36)
TIMEOUT_S = 120.0
LONG_PROMPT = "Write a long story about a lighthouse keeper and a storm."
FINISHED_PAIR = [("user", "finished"), ("assistant", "finished")]

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


def tui_settings(config: Path, **sampling: object) -> Settings:
    """SmolLM2 from the offline cache, greedy and seeded unless told otherwise."""
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


async def until(condition: Callable[[], object], what: str) -> None:
    """Let the app run until `condition()` holds."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # not pilot.pause: no screen work of the test's own


async def ready(pilot: Pilot) -> ChatSession:
    app = pilot.app
    assert isinstance(app, PhichatApp)
    await until(lambda: app.session is not None or app._load_error, "the model")
    assert app.session is not None, app._load_error
    return app.session


async def ask(pilot: Pilot, text: str) -> AnswerMessage:
    """Type `text`, send it, wait for the whole answer."""
    app = pilot.app
    assert isinstance(app, PhichatApp)
    app.query_one(PromptInput).focus()
    app.query_one(PromptInput).insert(text)
    await pilot.press("enter")
    await until(lambda: app.query(AnswerMessage), "the answer to start")
    await until(lambda: not app.busy, "the answer to end")
    await pilot.pause()
    return app.query(AnswerMessage).last()


async def start_long_answer(pilot: Pilot) -> None:
    """Send LONG_PROMPT and wait for the first text of the answer."""
    app = pilot.app
    app.query_one(PromptInput).insert(LONG_PROMPT)
    await pilot.press("enter")
    await until(lambda: [a for a in app.query(AnswerMessage) if a.text], "streamed text")


def notes(app: PhichatApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def test_answer_streams_into_the_chat_and_the_database(smollm_config: Path) -> None:
    app = PhichatApp(tui_settings(smollm_config, max_tokens=40))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        assert isinstance(app.focused, PromptInput)
        answer = await ask(pilot, "Write a Python function that adds two numbers.")
        stats = session.last_stats
        assert stats is not None and stats.generated_tokens > 5
        assert answer.text.strip()
        assert [w.message_id for w in app.query(UserMessage)] == [None]
        stored = session.messages(session.conversation_id)
        assert [(m.role, m.status) for m in stored] == FINISHED_PAIR
        assert stored[1].content == answer.text
        assert app.query_one(PromptInput).text == ""
        status = str(app.query_one("#status").render())
        assert "SmolLM2-135M-Instruct.Q4_1.gguf" in status and "CPU" in status
        assert "tok/s" in status and f"ctx {session.context_used}/2048" in status
        await pilot.press("ctrl+q")
    app.shutdown()


async def test_the_answer_is_the_same_as_through_the_core_directly(smollm_config: Path) -> None:
    settings = tui_settings(smollm_config, max_tokens=30)
    app = PhichatApp(settings)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        answer = await ask(pilot, "Name three colours.")
        direct = ChatSession(settings, session.engine)
        assert "".join(direct.send("Name three colours.")) == answer.text
    app.shutdown()


async def test_escape_stops_the_answer_which_is_kept_marked_stopped(smollm_config: Path) -> None:
    app = PhichatApp(tui_settings(smollm_config, max_tokens=2000))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await start_long_answer(pilot)
        await pilot.press("escape")
        await until(lambda: not app.busy, "the stop")
        answer = app.query(AnswerMessage).last()
        assert session.last_stats is not None and session.last_stats.finish == "cancelled"
        assert session.last_stats.generated_tokens < 2000
        assert str(answer.query_one(".note").render()) == "stopped"
        stored = session.messages(session.conversation_id)[-1]
        assert stored.status == "stopped" and stored.content == answer.text
    app.shutdown()


async def test_escape_while_a_long_prompt_is_read_stops_at_once(smollm_config: Path) -> None:
    facts = " ".join(f"Fact {i} is {i * 7 % 13}." for i in range(160))  # seconds to read
    app = PhichatApp(tui_settings(smollm_config))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        app.query_one(PromptInput).insert(f"{facts} Which fact is 5?")
        await pilot.press("enter")
        await until(lambda: app.busy, "the answer to start")
        await asyncio.sleep(0.3)
        await pilot.press("escape")
        pressed = time.monotonic()
        await until(lambda: not app.busy, "the stop")
        assert time.monotonic() - pressed < 0.75
        assert session.last_stats is not None and session.last_stats.generated_tokens == 0
        assert str(app.query(AnswerMessage).last().query_one(".note").render()) == "stopped"
        stored = session.messages(session.conversation_id)
        assert [(m.role, m.status) for m in stored] == [
            ("user", "finished"),
            ("assistant", "stopped"),
        ]
        assert not app._notifications
    app.shutdown()


async def test_scrolling_up_while_streaming_is_not_yanked_back(smollm_config: Path) -> None:
    app = PhichatApp(tui_settings(smollm_config, max_tokens=400))
    async with app.run_test(size=(80, 16)) as pilot:
        session = await ready(pilot)
        chat = app.query_one(ChatView)
        await start_long_answer(pilot)
        await until(lambda: chat.max_scroll_y > 6, "a screenful")
        await pilot.press("pageup")
        await pilot.pause(0.3)
        position = chat.scroll_y
        assert position < chat.max_scroll_y
        await until(lambda: not app.busy or chat.max_scroll_y > position + 10, "more text")
        assert chat.scroll_y == position  # still where the user is reading
        await pilot.press("escape")
        await until(lambda: not app.busy, "the stop")
        await pilot.press("pagedown", "pagedown", "pagedown", "pagedown", "pagedown")
        await pilot.pause(0.3)
        assert chat.scroll_y == chat.max_scroll_y
        session.update_sampling(max_tokens=20)
        answer = await ask(pilot, "Thanks!")  # sending follows the bottom again
        await pilot.pause(0.3)
        assert answer.text and chat.scroll_y == chat.max_scroll_y
    app.shutdown()


async def test_quit_mid_answer_saves_it_and_exits(smollm_config: Path) -> None:
    app = PhichatApp(tui_settings(smollm_config, max_tokens=2000))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await start_long_answer(pilot)
        await pilot.press("ctrl+q")
        await until(lambda: not app.is_running, "the exit")
    conversation = session.conversation_id
    app.shutdown()  # waits for the engine thread, which saves the answer, marked stopped
    with Store.open(default_path()) as store:
        assert store.messages(conversation)[-1].status == "stopped"


async def test_search_in_the_side_pane_opens_the_result(smollm_config: Path) -> None:
    ids = store_conversations()
    app = PhichatApp(tui_settings(smollm_config))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await pilot.press("ctrl+b")
        assert app.query_one(SidePane).display and isinstance(app.focused, Input)
        listing = app.query_one(ConversationList)
        assert listing.option_count == 3
        await pilot.press(*"repairing a punctured bike wheel")
        results = app.query_one("#results", OptionList)
        await until(lambda: results.option_count, "search results")
        best = results.get_option_at_index(0)
        assert best.id is not None and best.id.startswith(f"{ids['Bike repair']}:")
        assert "bicycle tyre" in str(best.prompt) or "inner tube" in str(best.prompt)
        score = float(str(best.prompt).split()[0])
        assert 0 < score <= 1
        results.focus()
        results.highlighted = 0
        await pilot.press("enter")
        await until(lambda: session.conversation_id == ids["Bike repair"], "the switch")
        await pilot.pause()
        found = app.query(".-found")
        assert len(found) == 1 and found.first().message_id == int(best.id.split(":")[1])
        assert "bicycle" in str(app.query(UserMessage).first().render())
    app.shutdown()


async def test_a_result_deep_in_a_long_conversation_is_scrolled_into_view(
    smollm_config: Path,
) -> None:
    with Store.open(default_path()) as store:
        conversation = store.create_conversation(title="Long talk")
        for n in range(40):
            store.add_message(conversation.id, "user", f"Question {n} about the weather?")
            store.add_message(conversation.id, "assistant", f"Answer {n}: sunny.\n\n- warm\n- dry")
        target = store.add_message(conversation.id, "user", "The secret word is pineapple.")
        for n in range(40, 60):
            store.add_message(conversation.id, "assistant", f"Answer {n}: cloudy.\n\n- grey")
    app = PhichatApp(tui_settings(smollm_config))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+b", *"pineapple")
        results = app.query_one("#results", OptionList)
        await until(lambda: results.option_count, "results")
        assert results.get_option_at_index(0).id == f"{conversation.id}:{target.id}"
        results.focus()
        results.highlighted = 0
        await pilot.press("enter")
        await until(lambda: app.query(".-found"), "the result")
        await pilot.pause(0.5)
        chat = app.query_one(ChatView)
        found = app.query_one(".-found")
        assert 0 < chat.scroll_y < chat.max_scroll_y
        top = found.virtual_region.y
        assert chat.scroll_y <= top < chat.scroll_y + chat.size.height
    app.shutdown()


async def test_search_updates_as_you_type_debounced(smollm_config: Path) -> None:
    store_conversations()
    app = PhichatApp(tui_settings(smollm_config))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        calls: list[str] = []
        search = session.search
        session.search = lambda query, k=10: calls.append(query) or search(query, k)  # type: ignore[method-assign]
        await pilot.press("ctrl+b", *"puppy")
        results = app.query_one("#results", OptionList)
        await until(lambda: results.option_count, "results")
        assert calls == ["puppy"]  # one search for five quick keystrokes
        assert "puppy" in str(results.get_option_at_index(0).prompt).lower()
        for _ in "puppy":
            await pilot.press("backspace")
        await until(lambda: not results.option_count, "results cleared")

        app.query_one(PromptInput).focus()  # the search box is empty: related past messages
        await pilot.press(*"my bicycle tyre is flat")
        await until(lambda: results.option_count, "related messages")
        assert "Related" in str(app.query_one("#results-title").render())
        assert "bicycle" in str(results.get_option_at_index(0).prompt)
    app.shutdown()


async def test_a_search_without_a_word_finds_nothing_and_is_no_error(smollm_config: Path) -> None:
    store_conversations()
    app = PhichatApp(tui_settings(smollm_config))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+b", *"?!")
        title = app.query_one("#results-title")
        await until(lambda: notes(app) or "Results" in str(title.render()), "the search")
        assert notes(app) == []
        assert str(title.render()) == "Results (0)"
        assert app.query_one("#results", OptionList).option_count == 0
    app.shutdown()


async def test_switch_rename_and_delete_conversations(smollm_config: Path) -> None:
    ids = store_conversations()
    app = PhichatApp(tui_settings(smollm_config))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await pilot.press("ctrl+b")
        listing = app.query_one(ConversationList)
        listing.focus()
        listing.highlighted = listing.get_option_index(str(ids["Weekend reading"]))
        await pilot.press("enter")
        await until(lambda: session.conversation_id == ids["Weekend reading"], "switch")
        await pilot.pause()
        chat = app.query_one(ChatView)
        assert "sci-fi novel" in str(chat.query(UserMessage).first().render())
        assert "Le Guin" in chat.query(AnswerMessage).first().text
        answer = await ask(pilot, "Another one, please.")
        stored = session.messages(ids["Weekend reading"])
        assert [m.role for m in stored] == ["user", "assistant"] * 2
        assert stored[-1].content == answer.text

        listing.focus()
        listing.highlighted = listing.get_option_index(str(ids["Puppy food"]))
        await pilot.press("r")
        assert isinstance(app.screen, RenameScreen)
        await pilot.press("ctrl+u", *"Dog dinner", "enter")
        titles = {c.id: c.title for c in session.conversations()}
        assert titles[ids["Puppy food"]] == "Dog dinner"

        listing.highlighted = listing.get_option_index(str(ids["Weekend reading"]))
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert len(session.conversations()) == 3
        await pilot.press("delete")
        await pilot.press("y")
        await pilot.pause()
        assert ids["Weekend reading"] not in {c.id for c in session.conversations()}
        assert session.conversation_id is None and not chat.query(AnswerMessage)
        assert listing.option_count == 2

        await pilot.press("ctrl+n")
        assert session.conversation_id is None
    app.shutdown()


async def test_settings_apply_to_the_next_answer(smollm_config: Path) -> None:
    app = PhichatApp(tui_settings(smollm_config, max_tokens=200))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature", Input).value = "-1"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)  # refused, still open
        assert any("temperature must be >= 0" in n for n in notes(app))
        app.screen.query_one("#temperature", Input).value = "0.5"
        app.screen.query_one("#max_tokens", Input).value = "3"
        app.screen.query_one("#system").load_text("Answer like a pirate.")
        await pilot.press("ctrl+s")
        assert not isinstance(app.screen, SettingsScreen)
        assert session.sampling.max_tokens == 3 and session.sampling.temperature == 0.5
        assert session.system == "Answer like a pirate."
        assert isinstance(app.focused, PromptInput)
        answer = await ask(pilot, "Tell me about the sea.")
        assert session.last_stats is not None and 1 <= session.last_stats.generated_tokens <= 3
        assert str(answer.query_one(".note").render()) == "stopped at the token limit"
    app.shutdown()


async def test_prompt_box_newlines_history_and_a_100kb_paste(smollm_config: Path) -> None:
    app = PhichatApp(tui_settings(smollm_config, max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        box = app.query_one(PromptInput)
        await pilot.press("h", "i", "ctrl+j", "y", "o", "u")
        assert box.text == "hi\nyou"
        await pilot.press("enter")
        await until(lambda: not app.busy and app.query(AnswerMessage), "answer")
        await ask(pilot, "second")
        await pilot.press("up")
        assert box.text == "second"
        await pilot.press("up")
        assert box.text == "hi\nyou"
        await pilot.press("down", "down", "down")
        assert box.text == ""

        pasted = "All work and no play makes Jack a dull boy. " * 2300  # ~100 KB
        started = time.perf_counter()
        app.post_message(events.Paste(pasted))
        await pilot.pause()
        assert box.text == pasted
        await pilot.press("enter")
        await until(lambda: not app.busy, "the refusal")
        assert time.perf_counter() - started < 30
        assert any("shorten" in n for n in notes(app)), notes(app)
        assert "error:" in str(app.query(AnswerMessage).last().query_one(".note").render())

        app.post_message(events.Paste("x" * 600_000))
        await pilot.pause()
        assert box.text == "" and any("paste refused" in n for n in notes(app))
        answer = await ask(pilot, "still there?")  # the app is still usable
        assert answer.text and session.last_stats is not None
    app.shutdown()


async def test_a_prompt_sent_while_loading_is_queued(smollm_config: Path) -> None:
    settings = tui_settings(smollm_config, max_tokens=8)
    go = threading.Event()
    real = load_session(settings)

    def slow_load(tqdm_class: type) -> ChatSession:
        bar = tqdm_class(total=1000, desc="model.gguf", mininterval=0)  # as huggingface_hub
        bar.update(400)
        go.wait(TIMEOUT_S)
        bar.update(600)
        bar.close()
        return real(tqdm_class)

    app = PhichatApp(settings, slow_load)
    async with app.run_test(size=SIZE) as pilot:
        try:
            progress = app.query_one("#download", ProgressBar)
            await until(lambda: progress.progress == 400, "the download bar")
            assert progress.display and progress.total == 1000
            assert "downloading" in str(app.query_one("#status").render())
            box = app.query_one(PromptInput)
            box.insert("Hello!")
            await pilot.press("enter")
            assert app.busy and any("queued" in n for n in notes(app))
            assert box.text == "" and len(app.query(UserMessage)) == 1
            await pilot.press("escape")  # take it back
            assert not app.busy and box.text == "Hello!" and not app.query(UserMessage)
            await pilot.press("enter")
            assert app.busy and box.text == ""
        finally:
            go.set()
        session = await ready(pilot)
        await until(lambda: session.last_stats is not None and not app.busy, "answer")
        assert not progress.display
        assert app.query(AnswerMessage).last().text
    app.shutdown()


async def test_a_model_that_fails_to_load_is_a_notification(smollm_config: Path) -> None:
    def broken(tqdm_class: type) -> ChatSession:
        raise PhichatError("model.gguf: not a GGUF model file")

    app = PhichatApp(tui_settings(smollm_config), broken)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app._load_error, "the failure")
        await pilot.pause()
        assert "model.gguf: not a GGUF model file" in notes(app)
        assert "no model loaded" in str(app.query_one("#status").render())
        app.query_one(PromptInput).insert("hello")
        await pilot.press("enter", "ctrl+b", "ctrl+s", "ctrl+n", "escape")
        assert app.is_running and app.session is None
        await pilot.press("ctrl+q")
    app.shutdown()


# Snapshots: fixed size, the model loaded but nothing generated, fixed stored conversations.


def _wait_ready(pilot: Pilot) -> object:
    async def run() -> None:
        await ready(pilot)
        await pilot.pause()

    return run()


def test_snapshot_empty_app(snap_compare: Callable[..., bool], smollm_config: Path) -> None:
    app = PhichatApp(tui_settings(smollm_config))
    assert snap_compare(app, terminal_size=SIZE, run_before=_wait_ready)
    app.shutdown()


def test_snapshot_side_pane(snap_compare: Callable[..., bool], smollm_config: Path) -> None:
    store_conversations()
    app = PhichatApp(tui_settings(smollm_config))

    async def open_pane(pilot: Pilot) -> None:
        await _wait_ready(pilot)
        await pilot.press("ctrl+b")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=open_pane)
    app.shutdown()


def test_snapshot_settings(snap_compare: Callable[..., bool], smollm_config: Path) -> None:
    app = PhichatApp(tui_settings(smollm_config))

    async def open_settings(pilot: Pilot) -> None:
        await _wait_ready(pilot)
        await pilot.press("ctrl+s")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=open_settings)
    app.shutdown()


# The installed command in a real terminal.

LLAMA_LOG_MARKERS = ("llama_", "load_tensors", "ggml", "print_info", "llm_load", "AVX")


class Tmux:
    """A private tmux server running one command in a 120x40 window."""

    def __init__(self, socket: Path) -> None:
        self.base = ["tmux", "-S", str(socket)]

    def start(self, command: list[str]) -> None:
        env = [f"{k}={v}" for k, v in os.environ.items() if k.startswith(("HF_", "XDG_"))]
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
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            screen = self.screen()
            if condition(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_phichat_in_a_real_terminal(smollm_config: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "phichat"
    flags = ["--config", str(smollm_config), "--temperature", "0", "--seed", "1"]
    flags += ["--max-tokens", "20"]
    prompt = "What is the capital of France?"
    expected = subprocess.run(
        [str(exe), *flags, "--prompt", prompt, "--no-log"], capture_output=True, text=True
    )
    assert expected.returncode == 0, expected.stderr
    first_words = " ".join(expected.stdout.split()[:3])
    assert first_words

    done = tmp_path / "exit-code"
    tmux = Tmux(tmp_path / "tmux.sock")
    shell = f"{exe} {' '.join(flags)}; echo $? > {done}"
    try:
        tmux.start(["sh", "-c", shell])
        tmux.wait(lambda s: "· ready" in s, "the model")
        tmux.keys("-l", prompt)
        tmux.keys("Enter")
        screen = tmux.wait(lambda s: "tok/s" in s and "· ready" in s, "the answer")
        assert prompt in screen
        assert first_words in " ".join(screen.split()), screen
        assert not [m for m in LLAMA_LOG_MARKERS if m in screen], screen
        tmux.keys("C-q")
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.read_text().strip() == "0"
    finally:
        tmux.kill()
    with Store.open(default_path()) as store:
        [conversation] = store.conversations()
        assert [m.role for m in store.messages(conversation.id)] == ["user", "assistant"]


def test_help_does_not_import_textual() -> None:
    code = "import sys, phichat.cli as c; c.build_parser(); print('textual' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False"


def test_pipe_hands_batches_to_the_loop() -> None:
    from phichat.tui.chat import TokenPipe

    async def main() -> list[tuple[str, bool]]:
        pipe = TokenPipe()

        def decode() -> None:
            for word in ["a", "b", "c"]:
                pipe.put(word)
            pipe.close()

        thread = threading.Thread(target=decode)
        thread.start()
        thread.join()
        return [await pipe.get()]

    assert asyncio.run(main()) == [("abc", True)]
