"""Writing the user's config file: "save as my defaults" from the app.

Only the keys given are written; the file's comments, layout and every other key stay as they
were (tomlkit edits the document rather than re-serialising a dict). The new text is checked the
way phichat will read it at the next start before it replaces the file, in one rename, so a
failed save leaves the old file whole. A config file that is a symlink stays one: the file it
points to is the one replaced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from phichat.config import Settings, apply_layer, parse_toml, user_config_path
from phichat.errors import PhichatError


def save_settings(changes: dict[str, dict[str, Any]], path: Path | None = None) -> Path:
    """Write `changes` ({section: {key: value}}) to the user's config file (default:
    `user_config_path()`); a value of None removes the key, so the default applies again.
    Returns the file written. UsageError if the existing file is not valid TOML or the result
    would not load; PhichatError if it cannot be written."""
    import tomlkit

    path = path or user_config_path()
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise PhichatError(f"{path}: cannot read config file: {exc}") from None
    apply_layer(Settings(), parse_toml(text, str(path)), str(path))  # refuse a broken file
    document = tomlkit.parse(text)
    for section, values in changes.items():
        table = document.get(section)
        if table is None:
            table = document[section] = tomlkit.table()
        for key, value in values.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    new_text = tomlkit.dumps(document)
    apply_layer(Settings(), parse_toml(new_text, str(path)), str(path))
    # a symlink (dotfiles kept elsewhere) stays one: the file it points to is replaced
    _replace(path.resolve() if path.is_symlink() else path, new_text)
    return path


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, keeping the old file's permissions."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(temp, mode)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise PhichatError(f"{path}: cannot write config file: {exc.strerror or exc}") from None
