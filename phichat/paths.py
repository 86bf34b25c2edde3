"""Every folder phichat uses, in one place.

By default each is the platform's own folder for phichat, as platformdirs decides (on Linux:
~/.config/phichat, ~/.local/share/phichat, ~/.local/state/phichat, ~/.cache/phichat, XDG
variables respected). `PHICHAT_HOME=DIR` puts them all under one folder instead: DIR/config,
DIR/data, DIR/state and DIR/cache. The files in them are named by the modules that own them
(config.toml: config; history.db: store; llama.log and kv-states/: llama_engine).
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "phichat"
HOME_VARIABLE = "PHICHAT_HOME"


def home() -> Path | None:
    """The folder `PHICHAT_HOME` names (made absolute), or None when it is unset or empty."""
    value = os.environ.get(HOME_VARIABLE)
    return Path(value).expanduser().absolute() if value else None


def config_dir() -> Path:
    """The user's config folder (config.toml)."""
    if (root := home()) is not None:
        return root / "config"
    from platformdirs import user_config_path

    return user_config_path(APP_NAME)


def data_dir() -> Path:
    """The folder of what the user would miss: the history database."""
    if (root := home()) is not None:
        return root / "data"
    from platformdirs import user_data_path

    return user_data_path(APP_NAME)


def state_dir() -> Path:
    """The folder of what phichat keeps between runs but could lose: llama.cpp's log."""
    if (root := home()) is not None:
        return root / "state"
    from platformdirs import user_state_path

    return user_state_path(APP_NAME)


def cache_dir() -> Path:
    """The folder of what can be rebuilt: saved conversation states."""
    if (root := home()) is not None:
        return root / "cache"
    from platformdirs import user_cache_path

    return user_cache_path(APP_NAME)
