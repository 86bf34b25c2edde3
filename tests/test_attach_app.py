"""Attaching in the prompt box (issue 19, item 1): Tab completes paths after `/file` and `@`,
`!COMMAND` attaches what a command prints, a paste of more than a screenful becomes a chip
(read ahead with the message), and a chip shows before its file is counted. Pilot on the
scripted engine, the real store and embedder, real files and processes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from helpers import SIZE, ask, notes, ready, until
from textual import events
from textual.pilot import Pilot

from phichat.tui.app import PhichatApp
from phichat.tui.attach import AttachmentBar, Chip
from phichat.tui.prompt import PromptInput


async def type_and_send(pilot: Pilot[object], text: str) -> None:
    prompt = pilot.app.query_one(PromptInput)
    prompt.focus()
    prompt.insert(text)
    await pilot.press("enter")


def chips(app: PhichatApp) -> list[str]:
    return [chip.label.plain for chip in app.query_one(AttachmentBar).query(Chip)]


def question(app: PhichatApp, index: int = -2) -> str:
    """The content of a message of the open conversation, as saved."""
    session = app.chat.session
    assert session is not None and session.conversation_id is not None
    return session.messages(session.conversation_id)[index].content


@pytest.mark.slow
async def test_tab_completes_a_path_after_file_and_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripted: Callable[..., PhichatApp]
) -> None:
    (tmp_path / "notes.md").write_text("n\n")
    (tmp_path / "notebook").mkdir()
    (tmp_path / "nothing.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.insert("/file no")
        await pilot.press("tab")
        assert prompt.text == "/file not" and app.focused is prompt
        await pilot.press("e", "tab")  # notes.md or notebook/: listed, nothing added
        await until(lambda: any("notebook/  notes.md" in n for n in notes(app)), "the list")
        assert prompt.text == "/file note"
        await pilot.press("s", "tab")
        assert prompt.text == "/file notes.md "
        prompt.clear()
        prompt.insert("what is in @noteb")
        await pilot.press("tab")
        assert prompt.text == "what is in @notebook/"
        prompt.clear()
        prompt.insert("no path here")
        await pilot.press("tab")  # not a path: Tab moves on, as it always did
        assert app.focused is not prompt and prompt.text == "no path here"


@pytest.mark.slow
async def test_a_command_prints_into_a_chip_that_goes_with_the_next_message(
    scripted: Callable[..., PhichatApp],
) -> None:
    app = scripted(max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await type_and_send(pilot, "!printf 'alpha\\nbeta\\n'")
        await until(lambda: chips(app), "the chip")
        assert app.query_one(PromptInput).text == ""  # nothing sent
        await until(lambda: "tokens" in chips(app)[0], "its token count")
        assert chips(app)[0].startswith("!printf 'alpha\\nbeta\\n' · ")
        tip = app.query_one(Chip).tooltip
        assert tip is not None and "alpha\nbeta" in str(tip)  # what it printed, shown first

        await type_and_send(pilot, "!echo oops >&2; exit 3")
        failed = "!echo oops >&2; exit 3: exited with status 3: oops"
        await until(lambda: failed in notes(app), "the failure, in one line")
        assert len(chips(app)) == 1

        await type_and_send(pilot, "!sleep 0.3; echo late")  # still running when sent
        await ask(pilot, "What did they print?")
        sent = question(app)
        assert "[Attached: !printf 'alpha\\nbeta\\n' (whole, lines 1-2)]" in sent
        assert "alpha\nbeta" in sent and "late" in sent
        assert sent.endswith("What did they print?") and not chips(app)


@pytest.mark.slow
async def test_a_long_paste_is_a_chip_and_the_box_keeps_what_was_typed(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    pasted = "".join(f"row {i}: the river runs to the sea\n" for i in range(SIZE[1] + 5))
    app = scripted(max_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.insert("Summarise this: ")
        app.post_message(events.Paste(pasted))
        await until(lambda: chips(app), "the chip")
        await until(lambda: "tokens" in chips(app)[0], "its token count")
        assert chips(app)[0].startswith(f"pasted text, {SIZE[1] + 5} lines · ")
        assert prompt.text == "Summarise this: "  # the paste is not in the box

        def read_with_paste() -> bool:  # the read-ahead reads the paste with the message
            last = fake_engine.read_aheads[-1][-1]["content"] if fake_engine.read_aheads else ""
            return "row 0: the river" in last and last.endswith("Summarise this:")

        await until(read_with_paste, "the paste read ahead")
        app.query_one(Chip).press()  # removed (as by a click): the message goes without it
        await until(lambda: not chips(app), "the chip removed")
        prompt.focus()
        app.post_message(events.Paste(pasted))
        await until(lambda: chips(app), "the chip again")
        await pilot.press("enter")
        await until(lambda: not app.chat.busy and fake_engine.prompts, "the answer")
        sent = question(app)
        assert sent.startswith(f"[Attached: pasted text (whole, lines 1-{SIZE[1] + 5})]")
        assert sent.count("row 0: the river") == 1 and sent.endswith("\n\nSummarise this: ")


async def test_a_chip_shows_before_its_file_is_counted(
    tmp_path: Path, scripted: Callable[..., PhichatApp]
) -> None:
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i} of a long file\n" for i in range(1000)))
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        engine_free = threading.Event()
        app.chat._engine_thread.submit(engine_free.wait)  # the engine is busy meanwhile
        try:
            await type_and_send(pilot, f"/file {big}")
            await until(lambda: chips(app) == [f"{big} ✕"], "the chip, uncounted")
            assert app.query_one(PromptInput).text == ""  # and the box is free to type in
        finally:
            engine_free.set()
        await until(lambda: "tokens" in chips(app)[0], "the count, once the engine is free")
