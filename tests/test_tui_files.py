"""Files attached in the app (`/file`, `@PATH`): chips with token counts, removable, sent with
the message and kept in the history. Pilot, the scripted engine, the real store and embedder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import SIZE, ask, notes, ready, until

from phichat.tui.app import PhichatApp
from phichat.tui.attach import AttachmentBar, Chip, attach_request
from phichat.tui.prompt import PromptInput

FACT = "The launch code for the orbital test is ZEBRA-42, kept by Ines."


def test_what_a_message_asks_to_attach(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    assert attach_request("/file a.py 'my notes.md'") == (["a.py", "my notes.md"], True)
    here = tmp_path / "a.py"
    assert attach_request(f"explain @{here}, please") == ([str(here)], False)
    assert attach_request("mail @someone about it") == ([], False)  # no such file: text
    assert attach_request("look at @src/*.py") == (["src/*.py"], False)
    assert attach_request("a /file in the middle") == ([], False)


async def type_and_send(pilot: object, text: str) -> None:
    app = pilot.app  # type: ignore[attr-defined]
    prompt = app.query_one(PromptInput)
    prompt.focus()
    prompt.insert(text)
    await pilot.press("enter")  # type: ignore[attr-defined]


@pytest.mark.slow
async def test_files_become_chips_and_go_with_the_next_message(
    tmp_path: Path, scripted: Callable[..., PhichatApp]
) -> None:
    notes_md = tmp_path / "notes.md"
    notes_md.write_text(f"# Notes\n\n{FACT}\n")
    other = tmp_path / "other.txt"
    other.write_text("nothing to see\n" * 1000)  # 1,000 lines
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01")
    app = scripted(max_tokens=16)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        bar = app.query_one(AttachmentBar)
        await type_and_send(pilot, f"/file {other} {tmp_path / 'bin.dat'}")
        await until(lambda: len(bar.query(Chip)) == 1, "the chip")
        assert app.query_one(PromptInput).text == ""  # nothing sent
        await until(lambda: "tokens" in str(bar.query_one(Chip).label), "its token count")
        assert f"{tmp_path / 'bin.dat'}: is a binary file, not text" in notes(app)
        await pilot.click(Chip)
        await until(lambda: not bar.query(Chip), "the chip removed")
        assert not bar.display

        await type_and_send(pilot, f"/file {notes_md}")
        await until(lambda: len(bar.query(Chip)) == 1, "the chip again")
        await ask(pilot, "What is the code?")
        assert not bar.query(Chip)
        assert session.conversation_id is not None
        question = session.messages(session.conversation_id)[0].content
        assert FACT in question and question.endswith("What is the code?")
        assert "other.txt" not in question  # removed before sending
        assert f"sources: {notes_md} (whole, lines 1-3)" in notes(app)
        assert session.conversation(session.conversation_id).title == "What is the code?"

        await ask(pilot, f"And what does @{other} say?")  # attached inline, and sent
        question = session.messages(session.conversation_id)[2].content
        assert question.count("nothing to see") >= 1 and question.endswith(f"@{other} say?")
        await pilot.press("ctrl+q")
