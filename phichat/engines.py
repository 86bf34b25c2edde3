"""The engine factory: the `ChatEngine` the settings ask for (a server, or llama.cpp locally),
kept apart from the protocol in `phichat.engine` so that module imports no implementation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from phichat.config import SERVER, server_host

if TYPE_CHECKING:
    from phichat.config import Settings
    from phichat.engine import ChatEngine


def open_engine(settings: Settings, verbose: bool = False, tqdm_class: Any = None) -> ChatEngine:
    """The engine the settings ask for, ready to answer: connected to the server for the server
    device (the config's context size applies where the server does not say its own), else the
    GGUF loaded in llama.cpp (downloaded once if needed, with `tqdm_class` drawing progress)."""
    if settings.device == SERVER:
        from phichat.remote_engine import RemoteEngine

        return RemoteEngine.connect(settings.server, settings.engine.n_ctx)
    from phichat.hub import fetch_model
    from phichat.llama_engine import LlamaEngine

    path = fetch_model(settings.model, tqdm_class)
    return LlamaEngine.load(path, settings.device, settings.engine, verbose=verbose)


def planned_model_label(settings: Settings) -> str:
    """What to call the model before its engine is open: the GGUF's file name, or the server's
    model as configured (its host:port when the server is to pick)."""
    if settings.device == SERVER:
        return settings.server.model or server_host(settings.server.url or "")
    model = settings.model
    return Path(model.path).name if model.path else model.file
