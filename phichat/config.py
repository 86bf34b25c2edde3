"""Settings: packaged configs/<device>.toml, then the user's config file, then --config, then flags.

Every layer is validated on the way in: an unknown section or key, or a value of the wrong type,
names the file and the key; a TOML syntax error names the file and the line.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from phichat.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

APP_NAME = "phichat"
DEVICES = ("cpu", "cuda", "metal")
DEFAULT_PROMPT = "Write a haiku about ice hockey"

PHI3_REPO = "microsoft/Phi-3-mini-4k-instruct-gguf"
PHI3_FILE = "Phi-3-mini-4k-instruct-q4.gguf"
PHI3_REVISION = "999f761fe19e26cf1a339a5ec5f9f201301cbb83"
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_REVISION = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"


@dataclass(frozen=True)
class ModelSettings:
    """Which GGUF to run: a Hub file at a pinned revision, or a local path."""

    repo: str = PHI3_REPO
    file: str = PHI3_FILE
    revision: str = PHI3_REVISION
    path: str | None = None


@dataclass(frozen=True)
class EmbedderSettings:
    """Which all-MiniLM-L6-v2 to embed with: a Hub repo at a pinned revision, or a local dir."""

    repo: str = MINILM_REPO
    revision: str = MINILM_REVISION
    path: str | None = None


@dataclass(frozen=True)
class EngineSettings:
    """How llama.cpp runs the model on a device."""

    n_ctx: int = 4096
    n_gpu_layers: int = 0
    threads: int = 0
    batch: int = 512
    flash_attn: bool = False

    def thread_count(self) -> int:
        """Threads to decode with: the configured number, or one per usable core for 0."""
        if self.threads > 0:
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # macOS has no sched_getaffinity
            return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters for one answer. seed None draws a fresh seed per answer."""

    temperature: float = 0.7
    top_p: float = 0.95
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 512

    def validate(self) -> Sampling:
        """Raise UsageError for any value llama.cpp would misread; return self."""
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top-p must be in (0, 1]"),
            (self.repeat_penalty > 0, "repeat penalty must be > 0"),
            (self.repeat_last_n >= -1, "repeat-last-n must be >= -1 (-1: the whole context)"),
            (self.max_tokens >= 1, "max-tokens must be >= 1"),
            (self.seed is None or 0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self


@dataclass(frozen=True)
class ChatSettings:
    """What the conversation starts with."""

    system: str = ""


@dataclass(frozen=True)
class StoreSettings:
    """Where history lives: a SQLite file; empty path means the platform data dir."""

    path: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything phichat needs to run, after all layers are merged."""

    device: str = "cpu"
    model: ModelSettings = field(default_factory=ModelSettings)
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    sampling: Sampling = field(default_factory=Sampling)
    chat: ChatSettings = field(default_factory=ChatSettings)
    store: StoreSettings = field(default_factory=StoreSettings)


SECTIONS: dict[str, type] = {
    f.name: f.default_factory
    for f in fields(Settings)
    if f.name != "device"  # type: ignore[misc]
}


def user_config_path() -> Path:
    """The user's own config file in the platform config dir (XDG_CONFIG_HOME respected)."""
    from platformdirs import user_config_path as _user_config_path

    return _user_config_path(APP_NAME) / "config.toml"


def packaged_config(device: str) -> str:
    """The text of configs/<device>.toml: inside an installed wheel, or in a source checkout."""
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    here = Path(__file__).resolve().parent
    configs = here / "configs"
    if not configs.is_dir():
        configs = here.parent / "configs"
    return (configs / f"{device}.toml").read_text(encoding="utf-8")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML, turning a syntax error into one line that names the file and the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: invalid TOML: {exc}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """Read and parse a user's TOML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read config file: {exc}") from None
    return parse_toml(text, str(path))


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a TOML value fits a dataclass field's annotation (as written in this module)."""
    if isinstance(value, bool):
        return "bool" in annotation
    if isinstance(value, int):
        return "int" in annotation or "float" in annotation
    if isinstance(value, float):
        return "float" in annotation
    if isinstance(value, str):
        return "str" in annotation
    return False


def _coerce(value: Any, annotation: str) -> Any:
    """Turn an int into a float where the field is a float."""
    if isinstance(value, int) and not isinstance(value, bool) and annotation.startswith("float"):
        return float(value)
    return value


def apply_layer(settings: Settings, layer: dict[str, Any], source: str) -> Settings:
    """Overlay one parsed config file on settings, checking every section, key and type."""
    for section, values in layer.items():
        if section not in SECTIONS:
            known = ", ".join(SECTIONS)
            raise UsageError(f"{source}: unknown section [{section}] (known: {known})")
        if not isinstance(values, dict):
            raise UsageError(f"{source}: [{section}] must be a table")
        current = getattr(settings, section)
        annotations = {f.name: str(f.type) for f in fields(current)}
        changes = {}
        for key, value in values.items():
            if key not in annotations:
                raise UsageError(
                    f"{source}: unknown key {section}.{key} (known: {', '.join(annotations)})"
                )
            if not _type_ok(value, annotations[key]):
                raise UsageError(
                    f"{source}: {section}.{key} must be {annotations[key]}, "
                    f"not {type(value).__name__}"
                )
            changes[key] = _coerce(value, annotations[key])
        settings = replace(settings, **{section: replace(current, **changes)})
    try:
        return validate(settings)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None


def validate(settings: Settings) -> Settings:
    """Raise UsageError for values out of range; return settings."""
    settings.sampling.validate()
    if settings.engine.n_ctx < 16:
        raise UsageError("ctx must be >= 16 tokens")
    return settings


def load_settings(
    device: str,
    config_file: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Settings:
    """Merge packaged device config, the user's config file, --config and flag overrides."""
    settings = Settings(device=device)
    settings = apply_layer(settings, parse_toml(packaged_config(device), f"{device}.toml"), device)
    user_file = user_config_path()
    if user_file.is_file():
        settings = apply_layer(settings, read_config_file(user_file), str(user_file))
    if config_file is not None:
        settings = apply_layer(settings, read_config_file(config_file), str(config_file))
    if overrides:
        settings = merge_overrides(settings, overrides)
    return validate(settings)


def merge_overrides(settings: Settings, overrides: dict[str, dict[str, Any]]) -> Settings:
    """Apply already-typed values (from flags or the TUI), skipping those left as None."""
    for section, values in overrides.items():
        changes = {k: v for k, v in values.items() if v is not None}
        if changes:
            current = getattr(settings, section)
            settings = replace(settings, **{section: replace(current, **changes)})
    return settings


def as_dict(settings: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (for storing sampling params alongside a message)."""
    return dataclasses.asdict(settings)
