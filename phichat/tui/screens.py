"""Modal screens: session settings, renaming a conversation, confirming a delete."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import TYPE_CHECKING, ClassVar

from textual import on
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, TextArea

from phichat.config import Sampling, check_value, spec_of, value_type
from phichat.errors import UsageError
from phichat.tui.report import show_error

if TYPE_CHECKING:
    from phichat.session import ChatSession

# The sampling settings the form offers: those the schema gives a label.
SAMPLING_FIELDS = [f for f in fields(Sampling) if spec_of(f).label]


class SettingsScreen(ModalScreen[bool]):
    """Sampling and the system prompt for this session; applied from the next answer on."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(False)", "Cancel"),
        Binding("ctrl+s", "apply", "Apply", priority=True),
    ]

    def __init__(self, session: ChatSession) -> None:
        super().__init__()
        self.session = session

    def compose(self) -> Iterable[Widget]:
        sampling = self.session.sampling
        with Vertical(id="settings", classes="dialog"):
            yield Label("Settings for this session (ctrl+s applies, Esc cancels)", classes="title")
            with Grid(id="sampling"):
                for f in SAMPLING_FIELDS:
                    value = getattr(sampling, f.name)
                    yield Label(spec_of(f).label or f.name)
                    yield Input(
                        "" if value is None else str(value),
                        type="integer" if value_type(Sampling, f.name) is int else "number",
                        placeholder=spec_of(f).help,
                        tooltip=spec_of(f).help,
                        compact=True,
                        id=f.name,
                    )
            yield Label("System prompt")
            yield TextArea(self.session.system, id="system", compact=True, soft_wrap=True)
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def action_apply(self) -> None:
        """Validate and apply; a bad value is shown and the screen stays open."""
        changes: dict[str, object] = {}
        for f in SAMPLING_FIELDS:
            label = (spec_of(f).label or f.name).lower()
            text = self.query_one(f"#{f.name}", Input).value.strip()
            kind = value_type(Sampling, f.name)
            try:
                value = kind(text) if text else None
                changes[f.name] = check_value(Sampling, f, value, label)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                show_error(self, f"{label} must be {what}, not {text!r}")
                return
            except UsageError as exc:
                show_error(self, str(exc))
                return
        self.session.update_sampling(**changes)
        self.session.system = self.query_one("#system", TextArea).text.strip()
        self.notify("settings apply from the next answer")
        self.dismiss(True)

    @on(Button.Pressed, "#apply")
    def _apply_pressed(self) -> None:
        self.action_apply()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(False)


class RenameScreen(ModalScreen["str | None"]):
    """A new title for a conversation; Enter saves, Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.old_title = title

    def compose(self) -> Iterable[Widget]:
        with Vertical(classes="dialog"):
            yield Label("Rename the conversation (Enter saves, Esc cancels)", classes="title")
            yield Input(self.old_title, compact=True, id="title")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        title = event.value.strip()
        self.dismiss(title or None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; y or Enter on Yes confirms, n or Esc declines."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "dismiss(False)", "No"),
        Binding("y", "dismiss(True)", "Yes"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> Iterable[Widget]:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="title", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes", variant="error", id="yes")
                yield Button("No", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")
