"""The TUI's layout (issue 21): a thin App, the chat on a ChatScreen, and mixins that know the
screen only through the ChatHost protocol, so no module of the TUI imports its way in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import phichat.tui

MIXINS = ("actions", "keeping", "models", "reading", "host")


def imported(module: str) -> set[str]:
    """The phichat modules `phichat.tui.<module>` imports, under TYPE_CHECKING too."""
    tree = ast.parse((Path(phichat.tui.__file__).parent / f"{module}.py").read_text())
    names = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {name for name in names if name.startswith("phichat")}


def test_the_mixins_do_not_import_the_app_or_the_chat_screen() -> None:
    for module in MIXINS:
        circle = imported(module) & {"phichat.tui.app", "phichat.tui.chat_screen"}
        assert not circle, (module, circle)


def test_the_chat_screen_does_not_import_the_app() -> None:
    assert "phichat.tui.app" not in imported("chat_screen")
