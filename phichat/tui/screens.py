"""Modal screens: session settings, renaming a conversation, confirming a delete, picking one
of a few choices, and where to export a conversation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, OptionList, TextArea
from textual.widgets.option_list import Option

from phichat.config import Sampling, Settings, check_value, spec_of, value_type
from phichat.errors import UsageError
from phichat.text import escaped
from phichat.tui.report import reported, show_error

if TYPE_CHECKING:
    from phichat.session import ChatSession

# The sampling settings the form offers: those the schema gives a label.
SAMPLING_FIELDS = [f for f in fields(Sampling) if spec_of(f).label]


class SettingsScreen(ModalScreen[bool]):
    """Sampling and the system prompt for this session, applied from the next answer on; "save
    as my defaults" also writes what differs from `defaults` (the settings the app started
    with) to the user's config file, for the next start."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(False)", "Cancel"),
        Binding("ctrl+s", "apply", "Apply", priority=True),
    ]

    def __init__(self, session: ChatSession, defaults: Settings) -> None:
        super().__init__()
        self.session = session
        self.defaults = defaults

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
                yield Button("Save as my defaults", id="save")
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def _form(self) -> tuple[dict[str, Any], str] | None:
        """The sampling values and system prompt in the form, checked; None (with the error
        shown) when a value is refused."""
        values: dict[str, Any] = {}
        for f in SAMPLING_FIELDS:
            label = (spec_of(f).label or f.name).lower()
            text = self.query_one(f"#{f.name}", Input).value.strip()
            kind = value_type(Sampling, f.name)
            try:
                value = kind(text) if text else None
                values[f.name] = check_value(Sampling, f, value, label)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                show_error(self, f"{label} must be {what}, not {text!r}")
                return None
            except UsageError as exc:
                show_error(self, str(exc))
                return None
        return values, self.query_one("#system", TextArea).text.strip()

    def _apply(self, values: dict[str, Any], system: str) -> None:
        self.session.update_sampling(**values)
        self.session.system = system

    def action_apply(self) -> None:
        """Validate and apply; a bad value is shown and the screen stays open."""
        form = self._form()
        if form is None:
            return
        self._apply(*form)
        self.notify("settings apply from the next answer")
        self.dismiss(True)

    def action_save(self) -> None:
        """Apply, then write the values that differ from the start's to the user config."""
        from phichat.user_config import save_settings

        form = self._form()
        if form is None:
            return
        values, system = form
        sampling = {
            name: value
            for name, value in values.items()
            if value != getattr(self.defaults.sampling, name)
        }
        changes = {"sampling": sampling}
        if system != self.defaults.chat.system:
            changes["chat"] = {"system": system or None}
        self._apply(values, system)
        names = [*sampling, *changes.get("chat", {})]
        if not names:
            self.notify("nothing to save: these are the settings phichat started with")
            self.dismiss(True)
            return
        with reported(self):
            path = save_settings({section: keys for section, keys in changes.items() if keys})
            self.notify(f"saved {', '.join(names)} to {path}; used from the next start")
            self.dismiss(True)

    @on(Button.Pressed, "#apply")
    def _apply_pressed(self) -> None:
        self.action_apply()

    @on(Button.Pressed, "#save")
    def _save_pressed(self) -> None:
        self.action_save()

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
            yield Label(escaped(self.question), classes="title", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes", variant="error", id="yes")
                yield Button("No", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class PickScreen(ModalScreen["str | None"]):
    """One of a few choices, as (id, label) pairs; Enter or a click picks, Esc cancels. The
    labels are plain text (a code block's first line, a role's name: no markup)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, choices: list[tuple[str, str]], highlighted: int = 0) -> None:
        super().__init__()
        self.title_text = title
        self.choices = choices
        self.highlighted = highlighted

    def compose(self) -> Iterable[Widget]:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="title", markup=False)
            yield OptionList(
                *(Option(escaped(label), id=choice) for choice, label in self.choices),
                compact=True,
                markup=False,
                id="choices",
            )

    def on_mount(self) -> None:
        choices = self.query_one(OptionList)
        choices.highlighted = self.highlighted
        choices.focus()

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class ExportScreen(ModalScreen["Path | None"]):
    """Where to write a conversation as Markdown; Enter writes, Esc cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, default: Path) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> Iterable[Widget]:
        with Vertical(classes="dialog"):
            yield Label(
                "Export this conversation as Markdown to (Enter writes, Esc cancels)",
                classes="title",
            )
            yield Input(str(self.default), compact=True, id="path")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        self.dismiss(Path(path).expanduser() if path else None)
