"""What each command does, once cli.py has parsed it: settings, models, then the front end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from phichat.config import Settings, load_settings
from phichat.errors import PhichatError


def settings_for(
    args: argparse.Namespace, overrides: dict[str, dict[str, Any]], needs_model: bool = True
) -> Settings:
    """Merged settings; `auto` asks llama.cpp for a GPU only when a model will be loaded."""
    device = getattr(args, "device", "auto")
    if device == "auto":
        if needs_model:
            from phichat.engine import detect_device

            device = detect_device()
        else:
            device = "cpu"
    return load_settings(device, getattr(args, "config", None), overrides)


def model_path(settings: Settings, tqdm_class: Any = None) -> Path:
    """The GGUF to load: --model-file / [model] path, else the Hub file from the HF cache."""
    if settings.model.path:
        return Path(settings.model.path).expanduser()
    from phichat.hub import resolve_file

    model = settings.model
    return resolve_file(model.repo, model.file, model.revision, tqdm_class=tqdm_class)


def load_engine(settings: Settings, verbose: bool):
    """Resolve and load the chat model for the configured device."""
    from phichat.engine import Engine

    return Engine.load(model_path(settings), settings.device, settings.engine, verbose=verbose)


def run_prompt(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """`phichat --prompt`: one answer on stdout."""
    from phichat import oneshot
    from phichat.session import ChatSession

    prompt = oneshot.read_prompt(args.prompt)
    settings = settings_for(args, overrides)
    engine = load_engine(settings, args.verbose)
    session = ChatSession(settings, engine)
    return oneshot.run(session, prompt, args.stats)


def run_tui(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """`phichat`: the chat app."""
    raise PhichatError("the chat app is not built yet; use --prompt")


def run_command(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> int:
    """pull | history | show | search | export."""
    if args.command == "pull":
        settings = settings_for(args, overrides, needs_model=False)
        print(model_path(settings))
        return 0
    raise PhichatError(f"{args.command}: not built yet")
