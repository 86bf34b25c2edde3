"""Errors as notifications: nothing raised by the core ever leaves the app as a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from textual.dom import DOMNode

from phichat.errors import describe

ERROR_TIMEOUT_S = 8.0


def show_error(node: DOMNode, message: str) -> None:
    """An error notification that stays long enough to be read."""
    node.notify(message, severity="error", timeout=ERROR_TIMEOUT_S)


@contextmanager
def reported(node: DOMNode) -> Iterator[None]:
    """Run a block; show any exception from it as an error notification instead of raising."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the app stays up; the user reads what went wrong
        show_error(node, describe(exc))
