"""Switching models in the app: pick a named model ([models]); it is downloaded in a thread of
its own, with the progress bar (answers go on meanwhile), then loaded on the engine thread
between answers. Part of the ChatScreen (a mixin: its handlers go by name)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from textual import work
from textual.message import Message

from phichat.config import Settings
from phichat.errors import describe
from phichat.tui.progress import progress_class
from phichat.tui.report import show_error
from phichat.tui.screens import PickScreen
from phichat.tui.status import StatusLine

if TYPE_CHECKING:
    from phichat.tui.host import ChatHost


@dataclass
class ModelSwitched(Message):
    """The session answers with the model named `name` from now on."""

    name: str


@dataclass
class SwitchFailed(Message):
    """Switching to model `name` failed (`lost`: no model is loaded any more)."""

    name: str
    error: str
    lost: bool = False


class ModelSwitching:
    """The switch_model action and what follows it."""

    _switching: str | None  # the model being switched to
    _load_error: str | None

    def action_switch_model(self: ChatHost) -> None:
        """Pick another named model to carry on with (downloaded first if need be)."""
        from phichat.hub import is_cached

        session = self.session
        if session is None or self._switching is not None:
            self.notify("a model is still loading", severity="warning")
            return
        current = session.settings.model
        names = list(session.settings.models)
        choices = []
        for name in names:
            model = session.settings.models[name]
            notes = [Path(model.path).name if model.path else model.file]
            if model == current:
                notes.append("current")
            elif not is_cached(model):
                notes.append("to download")
            choices.append((name, f"{name}  ({', '.join(notes)})"))
        at = names.index(current.name) if current.name in names else 0
        self.app.push_screen(PickScreen("Carry on with which model?", choices, at), self._switch_to)

    def _switch_to(self: ChatHost, name: str | None) -> None:
        session = self.session
        if name is None or session is None:
            return
        settings = replace(session.settings, model=session.settings.models[name])
        if settings.model == session.settings.model:
            self.notify(f"already answering with {name}")
            return
        self._switching = name
        self._stop_reading()  # read by the model being left: of no use to the next
        self._status(f"switching to {name}…")
        self._fetch_model(name, settings)

    @work(thread=True, exit_on_error=False, group="model")
    def _fetch_model(self: ChatHost, name: str, settings: Settings) -> None:
        """Download the model if need be (its own thread: answers go on meanwhile), then load
        it on the engine thread, after the answer being written if any."""
        from phichat.hub import fetch_model

        try:
            fetch_model(settings.model, progress_class(self._download_progress, self._quitting))
        except Exception as exc:  # noqa: BLE001 - shown in the app, which keeps its model
            self.post_message(SwitchFailed(name, describe(exc)))
            return
        self._engine_thread.submit(self._load_model, name, settings)

    def _load_model(self: ChatHost, name: str, settings: Settings) -> None:
        """Swap the session's model (engine thread)."""
        from phichat.session import EngineLost

        assert self.session is not None
        try:
            self.session.switch_model(settings)
        except EngineLost as exc:
            self.post_message(SwitchFailed(name, describe(exc), lost=True))
        except Exception as exc:  # noqa: BLE001 - shown in the app, which keeps its model
            self.post_message(SwitchFailed(name, describe(exc)))
        else:
            self.post_message(ModelSwitched(name))

    def on_model_switched(self: ChatHost, event: ModelSwitched) -> None:
        self._switching = None
        self.query_one("#download").display = False
        assert self.session is not None
        self.query_one(StatusLine).model_name = self.session.engine.model_label
        self._status(self._answer_state())
        self.notify(f"now answering with {event.name}")
        self._read_ahead_soon()

    def on_switch_failed(self: ChatHost, event: SwitchFailed) -> None:
        self._switching = None
        self.query_one("#download").display = False
        if event.lost:
            self._load_error = event.error
            self._status("no model loaded")
        else:
            self._status(self._answer_state())
        show_error(self.app, f"could not switch to {event.name}: {event.error}")
