"""Notifications and choices show file names, paths and code as they are: text the user, a
file or the model chose (square brackets, a `[/]`) is never read as Textual markup. Pilot on
the scripted engine, the real store and embedder, real files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import SIZE, ask, notes, ready, until
from textual.widgets import Input, OptionList

from phichat.store import Store
from phichat.tui.app import PhichatApp
from phichat.tui.attach import AttachmentBar, Chip
from phichat.tui.chat import AnswerMessage
from phichat.tui.prompt import PromptInput
from phichat.tui.screens import ExportScreen, PickScreen, SettingsScreen
from phichat.tui.side import SidePane


def toasts(app: PhichatApp) -> list[str]:
    """The text of each notification on the screen now, as drawn (until it times out)."""
    return [str(toast.render()) for toast in app.screen.query("Toast")]


@pytest.mark.slow
async def test_the_sources_of_an_answer_show_file_names_as_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripted: Callable[..., PhichatApp]
) -> None:
    (tmp_path / "a[b.txt").write_text("alpha\n")
    (tmp_path / "[bold]x[").mkdir()
    (tmp_path / "[bold]x[" / "].txt").write_text("beta\n")  # its path: `[bold]x[/].txt`
    monkeypatch.chdir(tmp_path)
    app = scripted(max_tokens=8)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        prompt.focus()
        prompt.insert("/file *.txt */*.txt")
        await pilot.press("enter")
        await until(lambda: len(app.query_one(AttachmentBar).query(Chip)) == 2, "the chips")
        prompt.insert("What do they say?")
        await pilot.press("enter")

        await until(lambda: any("sources: " in t for t in toasts(app)), "the sources shown")
        shown = next(t for t in toasts(app) if "sources: " in t)
        names = ("a[b.txt (whole, line 1)", "[bold]x[/].txt (whole, line 1)")
        assert all(name in shown for name in names), shown
        assert shown in notes(app)  # drawn as it was said
        await until(lambda: not app.chat.busy, "the answer to end")
        await ask(pilot, "Thanks.")  # the app goes on


@pytest.mark.slow
async def test_an_error_naming_a_path_with_brackets_shows_it_as_it_is(
    tmp_path: Path, scripted: Callable[..., PhichatApp]
) -> None:
    app = scripted(max_tokens=8)
    target = tmp_path / "[" / "]gone" / "out.md"  # `…/[/]gone/out.md`, in no folder there is
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await ready(pilot)
        await ask(pilot, "Name a river.")
        await pilot.press("f5")
        assert isinstance(app.screen, ExportScreen)
        app.screen.query_one("#path", Input).value = str(target)
        await pilot.press("enter")

        said = f"No such file or directory: '{target}'"
        await until(lambda: any(said in t for t in toasts(app)), "the error shown")
        assert "[/]gone" in str(target) and not target.parent.exists()
        await ask(pilot, "And another?")  # the app goes on


SPLIT_ANSWER = """Split on slashes:

```python
parts = re.split(r"[/]", path)
```

or in the shell:

```sh
echo "[bold]done[/]"
```
"""


@pytest.mark.slow
async def test_the_code_block_picker_shows_each_first_line_as_it_is(
    scripted: Callable[..., PhichatApp],
) -> None:
    with Store.open() as store:
        chat = store.create_conversation(title="Splitting")
        store.add_message(chat.id, "user", "How do I split a path?")
        store.add_message(chat.id, "assistant", SPLIT_ANSWER)
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.query_one(SidePane).post_message(SidePane.Open(chat.id))
        await until(lambda: app.query(AnswerMessage), "the conversation")
        await pilot.pause()

        await pilot.press("ctrl+g")  # two code blocks: which one?
        assert isinstance(app.screen, PickScreen)
        await pilot.pause()
        choices = app.screen.query_one(OptionList)
        drawn = [choices.render_line(y).text for y in range(choices.size.height)]
        assert any('1. python: parts = re.split(r"[/]", path)' in line for line in drawn), drawn
        assert any('2. sh: echo "[bold]done[/]"' in line for line in drawn), drawn
        await pilot.press("down", "enter")
        assert app.clipboard == 'echo "[bold]done[/]"\n'


@pytest.mark.slow
async def test_settings_saved_to_a_home_with_brackets_name_it_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripted: Callable[..., PhichatApp]
) -> None:
    from phichat.paths import HOME_VARIABLE
    from phichat.user_config import user_config_path

    monkeypatch.setenv(HOME_VARIABLE, str(tmp_path / "[" / "]home"))  # `…/[/]home`
    app = scripted(max_tokens=8)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature", Input).value = "0.5"
        await pilot.click("#save")

        said = f"saved temperature to {user_config_path()}; used from the next start"
        await until(lambda: any(said in t for t in toasts(app)), "the path shown")
        assert "[/]home" in said and user_config_path().exists()
        await ask(pilot, "And now?")  # the app goes on
