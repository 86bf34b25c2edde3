"""Errors as notifications: nothing raised by the core ever leaves the app as a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from phichat.errors import describe

if TYPE_CHECKING:
    from textual.app import App
    from textual.widget import Widget

ERROR_TIMEOUT_S = 8.0


def show_error(node: Widget | App[Any], message: str) -> None:
    """An error notification that stays long enough to be read."""
    node.notify(message, severity="error", timeout=ERROR_TIMEOUT_S)


@contextmanager
def reported(node: Widget | App[Any]) -> Iterator[None]:
    """Run a block; show any exception from it as an error notification instead of raising."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the app stays up; the user reads what went wrong
        show_error(node, describe(exc))
