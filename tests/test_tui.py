"""The Textual app, driven by Pilot. Most tests run it on the scripted engine
(tests/fake_engine.py) with the real store and embedder; a few run the real SmolLM2 model, and
one runs the installed `phichat` in a real terminal under tmux.

Tests wait on state (a widget shown, a message saved, the engine holding), never on a clock.
Every app is shut down by the `apps` fixture, pass or fail, so no engine thread outlives its test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_engine import ANSWER, FakeEngine, tokens_of
from helpers import (
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
)
from textual import events
from textual.pilot import Pilot
from textual.widgets import Input, OptionList, ProgressBar

from phichat.errors import PhichatError
from phichat.session import ChatSession
from phichat.store import Store, default_path
from phichat.tui.app import PhichatApp
from phichat.tui.chat import AnswerMessage, ChatView, TokenPipe, UserMessage
from phichat.tui.prompt import MAX_CHARS, PromptInput
from phichat.tui.screens import ConfirmScreen, RenameScreen, SettingsScreen
from phichat.tui.side import ConversationList, SidePane

FINISHED_PAIR = [("user", "finished"), ("assistant", "finished")]


# --- on the real model: what only llama.cpp shows ------------------------------------------


@pytest.mark.slow
async def test_answer_streams_into_the_chat_and_the_database(
    apps: Callable[..., PhichatApp], smollm_config: Path
) -> None:
    app = apps(tui_settings(smollm_config, max_tokens=40))
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


@pytest.mark.slow
async def test_the_answer_is_the_same_as_through_the_core_directly(
    apps: Callable[..., PhichatApp], smollm_config: Path
) -> None:
    settings = tui_settings(smollm_config, max_tokens=30)
    app = apps(settings)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        answer = await ask(pilot, "Name three colours.")
        # Read cold, as the app's first answer was: llama.cpp's logits depend on how a prompt
        # is split into batches, and a cached prefix plus one token can flip a close call.
        session.engine.llama.reset()
        direct = ChatSession(settings, session.engine)
        assert "".join(direct.send("Name three colours.")) == answer.text


@pytest.mark.slow
async def test_escape_while_a_long_prompt_is_read_stops_at_once(
    apps: Callable[..., PhichatApp], smollm_config: Path
) -> None:
    facts = " ".join(f"Fact {i} is {i * 7 % 13}." for i in range(160))  # seconds to read
    app = apps(tui_settings(smollm_config))
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        app.query_one(PromptInput).insert(f"{facts} Which fact is 5?")
        await pilot.press("enter")
        # llama.cpp has the prompt's tokens and is reading them (no token generated yet)
        await until(
            lambda: session.last_stats is not None and session.last_stats.prompt_tokens > 0,
            "the prompt to be read",
        )
        await pilot.press("escape")
        await until(lambda: not app.chat.busy, "the stop")
        # Had llama.cpp read the whole prompt, it would have generated a token before stopping.
        assert session.last_stats.generated_tokens == 0
        assert str(app.query(AnswerMessage).last().query_one(".note").render()) == "stopped"
        stored = session.messages(session.conversation_id)
        assert [(m.role, m.status) for m in stored] == [
            ("user", "finished"),
            ("assistant", "stopped"),
        ]
        assert not app._notifications


# --- on the scripted engine --------------------------------------------------------------------


@pytest.mark.slow
async def test_escape_stops_the_answer_which_is_kept_marked_stopped(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(max_tokens=2000)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        answer = await start_held_answer(pilot, fake_engine, 12)
        await pilot.press("escape")
        await until(lambda: not app.chat.busy, "the stop")
        assert session.last_stats is not None and session.last_stats.finish == "stopped"
        assert session.last_stats.generated_tokens == 12
        assert answer.text == held_text(12)
        assert str(answer.query_one(".note").render()) == "stopped"
        stored = session.messages(session.conversation_id)[-1]
        assert stored.status == "stopped" and stored.content == answer.text


@pytest.mark.slow
async def test_scrolling_up_while_streaming_is_not_yanked_back(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(max_tokens=2000)
    async with app.run_test(size=(80, 16)) as pilot:
        await ready(pilot)
        chat = app.query_one(ChatView)
        answer = await start_held_answer(pilot, fake_engine, 100)
        await until(lambda: chat.max_scroll_y > 6, "a screenful")
        await pilot.press("pageup")
        await pilot.wait_for_scheduled_animations()
        position = chat.scroll_y
        assert position < chat.max_scroll_y
        fake_engine.release(200)  # more text streams in below
        await until(lambda: answer.text == held_text(300), "more text")
        await until(lambda: chat.max_scroll_y > position + 10, "the view to grow")
        assert chat.scroll_y == position  # still where the user is reading
        await pilot.press("escape")
        await until(lambda: not app.chat.busy, "the stop")
        for _ in range(30):  # page down to the bottom
            await pilot.press("pagedown")
            await pilot.wait_for_scheduled_animations()
            if chat.scroll_y == chat.max_scroll_y:
                break
        assert chat.scroll_y == chat.max_scroll_y
        await pilot.press("pageup")
        await pilot.wait_for_scheduled_animations()
        assert chat.scroll_y < chat.max_scroll_y
        fake_engine.answer, fake_engine.hold_at = ANSWER, None
        answer = await ask(pilot, "Thanks!")  # sending follows the bottom again
        assert answer.text == ANSWER
        await until(lambda: chat.scroll_y == chat.max_scroll_y, "the view to follow")
        await pilot.pause()
        assert chat.scroll_y == chat.max_scroll_y


async def test_quit_mid_answer_saves_it_and_exits(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(max_tokens=2000)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await start_held_answer(pilot, fake_engine, 7)
        await pilot.press("ctrl+q")
        await until(lambda: not app.is_running, "the exit")
    conversation = session.conversation_id
    app.shutdown()  # waits for the engine thread, which saves the answer, marked stopped
    with Store.open(default_path()) as store:
        saved = store.messages(conversation)[-1]
    assert (saved.role, saved.status, saved.content) == ("assistant", "stopped", held_text(7))


@pytest.mark.slow
async def test_search_in_the_side_pane_opens_the_result(
    scripted: Callable[..., PhichatApp],
) -> None:
    ids = store_conversations()
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await pilot.press("ctrl+b")
        assert app.query_one(SidePane).display and isinstance(app.focused, Input)
        listing = app.query_one(ConversationList)
        assert listing.option_count == 3
        burst(app, "repairing a punctured bike wheel")
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
        await until(lambda: app.query(".-found"), "the result highlighted")
        found = app.query(".-found")
        assert len(found) == 1 and found.first().message_id == int(best.id.split(":")[1])
        assert "bicycle" in str(app.query(UserMessage).first().render())


@pytest.mark.slow
async def test_a_result_deep_in_a_long_conversation_is_scrolled_into_view(
    scripted: Callable[..., PhichatApp],
) -> None:
    with Store.open(default_path()) as store:
        conversation = store.create_conversation(title="Long talk")
        for n in range(12):
            store.add_message(conversation.id, "user", f"Question {n} about the weather?")
            store.add_message(conversation.id, "assistant", f"Answer {n}: sunny.\n\n- warm\n- dry")
        target = store.add_message(conversation.id, "user", "The secret word is pineapple.")
        for n in range(12, 20):
            store.add_message(conversation.id, "assistant", f"Answer {n}: cloudy.\n\n- grey")
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+b")
        burst(app, "pineapple")
        results = app.query_one("#results", OptionList)
        await until(lambda: results.option_count, "results")
        assert results.get_option_at_index(0).id == f"{conversation.id}:{target.id}"
        results.focus()
        results.highlighted = 0
        await pilot.press("enter")
        await until(lambda: app.query(".-found"), "the result")
        chat = app.query_one(ChatView)
        found = app.query_one(".-found")

        def in_view() -> bool:
            top = found.virtual_region.y
            return 0 < chat.scroll_y < chat.max_scroll_y and (
                chat.scroll_y <= top < chat.scroll_y + chat.size.height
            )

        await until(in_view, "the result scrolled into view")
        await pilot.wait_for_scheduled_animations()
        assert in_view()  # and it stays there
        assert found.message_id == target.id


@pytest.mark.slow
async def test_search_updates_as_you_type_debounced(scripted: Callable[..., PhichatApp]) -> None:
    store_conversations()
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        calls: list[str] = []
        search = session.search
        session.search = lambda query, k=10, conversation_id=None: (  # type: ignore[method-assign]
            calls.append(query) or search(query, k, conversation_id)
        )
        await pilot.press("ctrl+b")
        burst(app, "puppy")
        results = app.query_one("#results", OptionList)
        await until(lambda: results.option_count, "results")
        assert calls == ["puppy"]  # one search for five quick keystrokes
        assert "puppy" in str(results.get_option_at_index(0).prompt).lower()
        await pilot.press("backspace", "backspace", "backspace", "backspace", "backspace")
        await until(lambda: not results.option_count, "results cleared")

        app.query_one(PromptInput).focus()  # the search box is empty: related past messages
        burst(app, "my bicycle tyre is flat")
        await until(lambda: results.option_count, "related messages")
        assert "Related" in str(app.query_one("#results-title").render())
        assert "bicycle" in str(results.get_option_at_index(0).prompt)


@pytest.mark.slow
async def test_a_search_without_a_word_finds_nothing_and_is_no_error(
    scripted: Callable[..., PhichatApp],
) -> None:
    store_conversations()
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+b", *"?!")
        title = app.query_one("#results-title")
        await until(lambda: notes(app) or "Results" in str(title.render()), "the search")
        assert notes(app) == []
        assert str(title.render()) == "Results (0)"
        assert app.query_one("#results", OptionList).option_count == 0


@pytest.mark.slow
async def test_switch_rename_and_delete_conversations(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    ids = store_conversations()
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await pilot.press("ctrl+b")
        listing = app.query_one(ConversationList)
        listing.focus()
        listing.highlighted = listing.get_option_index(str(ids["Weekend reading"]))
        await pilot.press("enter")
        await until(lambda: session.conversation_id == ids["Weekend reading"], "switch")
        chat = app.query_one(ChatView)
        await until(lambda: chat.query(UserMessage), "the conversation shown")
        assert "sci-fi novel" in str(chat.query(UserMessage).first().render())
        assert "Le Guin" in chat.query(AnswerMessage).first().text
        answer = await ask(pilot, "Another one, please.")
        stored = session.messages(ids["Weekend reading"])
        assert [m.role for m in stored] == ["user", "assistant"] * 2
        assert stored[-1].content == answer.text == ANSWER
        # the model saw the conversation it was switched to
        assert [m["content"] for m in fake_engine.prompts[-1]][-3:] == [
            "Recommend a sci-fi novel for the weekend.",
            "Try The Left Hand of Darkness by Ursula K. Le Guin.",
            "Another one, please.",
        ]

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
        await until(lambda: listing.option_count == 2, "the list without it")
        assert ids["Weekend reading"] not in {c.id for c in session.conversations()}
        await until(lambda: not chat.query(AnswerMessage), "the chat cleared")
        assert session.conversation_id is None

        await pilot.press("ctrl+n")
        assert session.conversation_id is None


@pytest.mark.slow
async def test_settings_apply_to_the_next_answer(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(max_tokens=200)
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
        assert fake_engine.prompts[-1][0] == {"role": "system", "content": "Answer like a pirate."}
        assert session.last_stats is not None and session.last_stats.generated_tokens == 3
        assert answer.text == "".join(tokens_of(ANSWER)[:3])
        assert str(answer.query_one(".note").render()) == "stopped at the token limit"


@pytest.mark.slow
async def test_prompt_box_newlines_history_and_a_100kb_paste(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(max_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        box = app.query_one(PromptInput)
        await pilot.press("h", "i", "ctrl+j", "y", "o", "u")
        assert box.text == "hi\nyou"
        await pilot.press("enter")
        await until(lambda: not app.chat.busy and app.query(AnswerMessage), "answer")
        assert fake_engine.prompts[-1][-1]["content"] == "hi\nyou"
        await ask(pilot, "second")
        await pilot.press("up")
        assert box.text == "second"
        await pilot.press("up")
        assert box.text == "hi\nyou"
        await pilot.press("down", "down", "down")
        assert box.text == ""

        pasted = "All work and no play makes Jack a dull boy. " * 2300  # ~100 KB
        box.insert(pasted)  # typed: a paste this long is attached (tests/test_attach_app.py)
        await until(lambda: box.text == pasted, "the text")
        await pilot.press("enter")
        await until(lambda: not app.chat.busy, "the refusal", timeout=30)
        assert any("shorten" in n for n in notes(app)), notes(app)
        assert "error:" in str(app.query(AnswerMessage).last().query_one(".note").render())
        assert len(fake_engine.prompts) == 2  # refused before the model saw it

        box.insert("x" * (MAX_CHARS - 50))
        app.post_message(events.Paste("y" * 100))  # a short paste the box has no room for
        await until(lambda: any("paste refused" in n for n in notes(app)), "the refusal")
        assert box.text == "x" * (MAX_CHARS - 50)
        box.clear()
        answer = await ask(pilot, "still there?")  # the app is still usable
        assert answer.text and session.last_stats is not None


@pytest.mark.slow
async def test_a_prompt_sent_while_loading_is_queued(
    apps: Callable[..., PhichatApp], fake_engine: FakeEngine, minilm_dir: Path
) -> None:
    settings = tui_settings(None, max_tokens=8)
    go = threading.Event()

    def slow_load(tqdm_class: type) -> ChatSession:
        bar = tqdm_class(total=1000, desc="model.gguf", mininterval=0)  # as huggingface_hub
        bar.update(400)
        go.wait(TIMEOUT_S)
        bar.update(600)
        bar.close()
        return ChatSession.open(settings, fake_engine, tqdm_class=tqdm_class)

    app = apps(settings, slow_load)
    async with app.run_test(size=SIZE) as pilot:
        try:
            progress = app.query_one("#download", ProgressBar)
            await until(lambda: progress.progress == 400, "the download bar")
            assert progress.display and progress.total == 1000
            assert "downloading" in str(app.query_one("#status").render())
            box = app.query_one(PromptInput)
            box.insert("Hello!")
            await pilot.press("enter")
            assert app.chat.busy and any("queued" in n for n in notes(app))
            assert box.text == "" and len(app.query(UserMessage)) == 1
            await pilot.press("escape")  # take it back
            assert not app.chat.busy and box.text == "Hello!" and not app.query(UserMessage)
            await pilot.press("enter")
            assert app.chat.busy and box.text == ""
        finally:
            go.set()
        session = await ready(pilot)
        await until(lambda: session.last_stats is not None and not app.chat.busy, "answer")
        assert not progress.display
        assert app.query(AnswerMessage).last().text == ANSWER
        assert [m["content"] for m in fake_engine.prompts[-1]] == ["Hello!"]


async def test_a_model_that_fails_to_load_is_a_notification(
    apps: Callable[..., PhichatApp],
) -> None:
    def broken(tqdm_class: type) -> ChatSession:
        raise PhichatError("model.gguf: not a GGUF model file")

    app = apps(tui_settings(None), broken)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.chat._load_error, "the failure")
        await pilot.pause()
        assert "model.gguf: not a GGUF model file" in notes(app)
        assert "no model loaded" in str(app.query_one("#status").render())
        app.query_one(PromptInput).insert("hello")
        await pilot.press("enter", "ctrl+b", "ctrl+s", "ctrl+n", "escape")
        assert app.is_running and app.chat.session is None
        await pilot.press("ctrl+q")


# Snapshots: fixed size, the model loaded but nothing generated, fixed stored conversations.


def _wait_ready(pilot: Pilot) -> object:
    async def run() -> None:
        await ready(pilot)
        await _steady_cursors(pilot)

    return run()


async def _steady_cursors(pilot: Pilot) -> None:
    """Cursors drawn and not blinking: a snapshot must not depend on when in a blink it is
    taken (a busy machine takes it later)."""
    for widget in pilot.app.screen.query("Input, TextArea"):
        widget.cursor_blink = False  # type: ignore[attr-defined]
    await pilot.pause()


def test_snapshot_empty_app(
    snap_compare: Callable[..., bool], apps: Callable[..., PhichatApp], smollm_config: Path
) -> None:
    app = apps(tui_settings(smollm_config))
    assert snap_compare(app, terminal_size=SIZE, run_before=_wait_ready)


@pytest.mark.slow
def test_snapshot_side_pane(
    snap_compare: Callable[..., bool], apps: Callable[..., PhichatApp], smollm_config: Path
) -> None:
    store_conversations()
    app = apps(tui_settings(smollm_config))

    async def open_pane(pilot: Pilot) -> None:
        await _wait_ready(pilot)
        await pilot.press("ctrl+b")
        await _steady_cursors(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=open_pane)


def test_snapshot_settings(
    snap_compare: Callable[..., bool], apps: Callable[..., PhichatApp], smollm_config: Path
) -> None:
    app = apps(tui_settings(smollm_config))

    async def open_settings(pilot: Pilot) -> None:
        await _wait_ready(pilot)
        await pilot.press("ctrl+s")
        await _steady_cursors(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=open_settings)


# The installed command in a real terminal.

LLAMA_LOG_MARKERS = ("llama_", "load_tensors", "ggml", "print_info", "llm_load", "AVX")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_phichat_in_a_real_terminal(smollm_config: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "phichat"
    flags = ["--config", str(smollm_config), "--temperature", "0", "--seed", "1"]
    flags += ["--max-tokens", "20"]
    prompt = "What is the capital of France?"
    expected = subprocess.run(
        [str(exe), *flags, "--prompt", prompt, "--no-history"], capture_output=True, text=True
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
        assert tmux.exit_code(done) == "0"
    finally:
        tmux.kill()
    with Store.open(default_path()) as store:
        [conversation] = store.conversations()
        question, answer = store.messages(conversation.id)
        # All of what was typed was sent: Enter is taken in order with the keys before it.
        assert (question.role, question.content, answer.role) == ("user", prompt, "assistant")


@pytest.mark.slow
def test_help_does_not_import_textual() -> None:
    code = "import sys, phichat.cli as c; c.build_parser(); print('textual' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False"


async def test_the_token_pipe_hands_over_every_chunk_while_the_decoder_runs() -> None:
    """The decode thread puts while the loop takes, as in the app. A chunk put into an empty
    pipe wakes the loop by itself: the decoder waits for each one to arrive, so a lost wake-up
    stalls it. Then a flood is put while the loop takes: all arrives, in order, in batches."""
    pipe = TokenPipe()
    arrived = threading.Condition()
    received: list[str] = []
    stalled: list[int] = []
    one_by_one = [f"{i} " for i in range(200)]
    flood = [f"<{i}>" for i in range(100_000)]

    def decode() -> None:
        try:
            for n, chunk in enumerate(one_by_one, start=1):
                pipe.put(chunk)
                with arrived:
                    if not arrived.wait_for(lambda n=n: len(received) >= n, timeout=30):
                        stalled.append(n)
                        return
            for chunk in flood:
                pipe.put(chunk)
        finally:
            pipe.close()

    thread = threading.Thread(target=decode)
    thread.start()
    try:
        while True:
            text, closed = await pipe.get()
            with arrived:
                received.append(text)
                arrived.notify_all()
            if closed:
                break
    finally:
        thread.join(timeout=60)
    assert not stalled, f"chunk {stalled[0]} never woke the loop"
    assert received[: len(one_by_one)] == one_by_one  # one get() each
    rest = received[len(one_by_one) :]
    assert "".join(rest) == "".join(flood)
    assert len(rest) < len(flood)  # batched while the loop was behind
