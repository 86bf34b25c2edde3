"""The app's actions as key bindings and as command palette (ctrl+p) commands, both from one
declaration: `KeySettings` in phichat/config.py, where each field is an action id with its
default keys, its help and its label. A binding's id is its action's id, so `[keys]` in the
config remaps it through Textual's keymap, and the palette and the hints on screen (`key_hint`)
show the keys in use. The ChatScreen, whose actions they are, holds the bindings and offers
the commands; the message box holds those of its own keys (`send`, `newline`), which are not
commands."""

from __future__ import annotations

from dataclasses import Field, fields
from functools import partial
from typing import Any

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider

from phichat.config import KeySettings, key_list, spec_of

# What the footer shows, by action id (the other actions are in the palette and the help panel).
FOOTER = {
    "stop": "Stop",
    "toggle_side": "Chats & search",
    "new_conversation": "New chat",
    "settings": "Settings",
}
PROMPT_ACTIONS = ("send", "newline")  # the message box's own keys


def screen_actions() -> list[Field[Any]]:
    """The actions of the chat screen (every one but the message box's): bindings and
    commands."""
    return [f for f in fields(KeySettings) if f.name not in PROMPT_ACTIONS]


def action_bindings() -> list[Binding]:
    """One binding per action of the chat screen, with its default keys (the keymap applies
    the user's own), those in the footer first, in its order."""
    order = list(FOOTER)
    actions = sorted(
        screen_actions(), key=lambda f: order.index(f.name) if f.name in FOOTER else len(order)
    )
    return [
        Binding(
            f.default,  # type: ignore[arg-type]
            f.name,
            FOOTER.get(f.name, spec_of(f).label or f.name),
            show=f.name in FOOTER,
            id=f.name,
        )
        for f in actions
    ]


KEY_NAMES = {"escape": "Esc", "enter": "Enter", "tab": "Tab"}  # as hints write them


def key_hint(keys: KeySettings, action: str, most: int = 1) -> str:
    """The first key (or up to `most` keys) bound to `action`, as a hint on screen writes it
    ("Esc", "ctrl+b", "shift+enter or ctrl+j")."""
    bound = key_list(getattr(keys, action))[:most]
    return " or ".join(KEY_NAMES.get(key, key) for key in bound)


def keymap(keys: KeySettings) -> dict[str, str]:
    """Textual's keymap for the configured keys: binding id -> keys."""
    return {f.name: getattr(keys, f.name) for f in fields(KeySettings)}


class PhichatCommands(Provider):
    """Every phichat action, by its label, with what it does and its keys (run on the screen
    the palette was opened from: the ChatScreen, which lists this provider)."""

    def _commands(self) -> list[tuple[str, str, str]]:
        keys: KeySettings = self.app.settings.keys  # type: ignore[attr-defined]
        return [
            (spec_of(f).label or f.name, f"{spec_of(f).help} ({getattr(keys, f.name)})", f.name)
            for f in screen_actions()
        ]

    def _run(self, action: str) -> partial[Any]:
        return partial(self.screen.run_action, action)

    async def discover(self) -> Hits:
        for title, help_text, action in self._commands():
            yield DiscoveryHit(title, self._run(action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, action in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), self._run(action), help=help_text)
