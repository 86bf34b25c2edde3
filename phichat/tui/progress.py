"""The first-run model download, reported to the app instead of drawn on the terminal."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any


class DownloadCancelled(Exception):
    """The app is quitting: stop the download (huggingface_hub resumes it next time)."""


def progress_class(report: Callable[[int, int | None], None], cancel: threading.Event) -> type:
    """A tqdm class for huggingface_hub's `tqdm_class` that calls `report(done, total)` (bytes)
    where tqdm would draw, and aborts the download once `cancel` is set."""
    from tqdm import tqdm

    class AppProgress(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = io.StringIO()  # tqdm never writes to the terminal under the app
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if cancel.is_set():
                raise DownloadCancelled("the download was cancelled")
            return super().update(n)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            report(int(self.n), int(self.total) if self.total else None)
            return True

    return AppProgress
