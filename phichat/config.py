"""Settings: one schema, then four layers over it.

Each setting is declared once, as a field of a section dataclass below, with its type, default,
bounds and help (`setting(...)`). The TOML loader, the command-line flags and the app's settings
form are all derived from these declarations. Layers, each validated on the way in: the packaged
`configs/<device>.toml` (what differs per device), the user's config file, `--config FILE`, then
flags. An unknown section or key, a wrong type or a value out of bounds names the file and the
key; a TOML syntax error names the file and the line.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

from phichat.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

APP_NAME = "phichat"
LOCAL_DEVICES = ("cpu", "cuda", "metal")  # where llama.cpp runs the model in this process
SERVER = "server"  # the model runs on an OpenAI-compatible server
DEVICES = (*LOCAL_DEVICES, SERVER)
SERVER_KINDS = ("auto", "llama-server", "llama-cpp-python", "vllm", "ollama", "generic")
DEFAULT_PROMPT = "Write a haiku about ice hockey"

PHI3_REPO = "microsoft/Phi-3-mini-4k-instruct-gguf"
PHI3_FILE = "Phi-3-mini-4k-instruct-q4.gguf"
PHI3_REVISION = "999f761fe19e26cf1a339a5ec5f9f201301cbb83"
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_REVISION = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"

MAX_CTX = 1 << 20  # no GGUF chat model has a longer window; memory is checked at load
MAX_THREADS = 256
MAX_GPU_LAYERS = 1024
SEED_MAX = 2**32 - 1  # llama.cpp seeds are uint32


@dataclass(frozen=True)
class Spec:
    """What a setting may hold and how it is offered: bounds (inclusive `low`/`high`, exclusive
    `above`), the command-line `flag`, and the `label` of the app's settings form."""

    help: str
    low: float | None = None
    high: float | None = None
    above: float | None = None
    flag: str | None = None
    label: str | None = None
    metavar: str | None = None

    def bounds(self) -> str:
        """The bounds in words, for help and errors ('' when unbounded)."""
        lower = f"> {_number(self.above)}" if self.above is not None else None
        lower = lower or (f">= {_number(self.low)}" if self.low is not None else None)
        upper = f"<= {_number(self.high)}" if self.high is not None else None
        return " and ".join(part for part in (lower, upper) if part)


def _number(value: float) -> str:
    """A bound as written: 4294967295, not 4.29497e+09; 0.5 as 0.5."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def setting(default: Any, help: str, **spec: Any) -> Any:
    """Declare a setting: a dataclass field carrying its Spec."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


@dataclass(frozen=True)
class ModelSettings:
    """Which GGUF to run: a Hub file at a pinned revision, or a local path."""

    repo: str = setting(PHI3_REPO, "Hugging Face repo of the GGUF")
    file: str = setting(PHI3_FILE, "GGUF file in that repo")
    revision: str = setting(PHI3_REVISION, "pinned commit of that repo")
    path: str | None = setting(
        None,
        "a local GGUF instead of the Hub model (not with --server)",
        flag="--model-file",
        metavar="PATH",
    )


@dataclass(frozen=True)
class EmbedderSettings:
    """Which all-MiniLM-L6-v2 to embed with: a Hub repo at a pinned revision, or a local dir."""

    repo: str = setting(MINILM_REPO, "Hugging Face repo of all-MiniLM-L6-v2")
    revision: str = setting(MINILM_REVISION, "pinned commit of that repo")
    path: str | None = setting(
        None,
        "a local all-MiniLM-L6-v2 directory instead of the Hub model",
        flag="--embedder-dir",
        metavar="DIR",
    )


@dataclass(frozen=True)
class EngineSettings:
    """How llama.cpp runs the model on a device."""

    n_ctx: int = setting(
        4096,
        "context window in tokens (with --server: assumed where the server does not say)",
        low=16,
        high=MAX_CTX,
        flag="--ctx",
    )
    n_gpu_layers: int = setting(0, "layers on the GPU (-1: all)", low=-1, high=MAX_GPU_LAYERS)
    threads: int = setting(0, "CPU threads (0: one per core)", low=0, high=MAX_THREADS)
    batch: int = setting(512, "prompt tokens llama.cpp reads per step", low=1, high=MAX_CTX)
    flash_attn: bool = setting(False, "flash attention")

    def thread_count(self) -> int:
        """Threads to decode with: the configured number, or one per usable core for 0."""
        return self.threads if self.threads > 0 else usable_cores()


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters for one answer. seed None draws a fresh seed per answer."""

    temperature: float = setting(
        0.7, "0 is greedy", low=0, high=100, flag="--temperature", label="Temperature"
    )
    top_p: float = setting(0.95, "nucleus sampling", above=0, high=1, flag="--top-p", label="Top-p")
    repeat_penalty: float = setting(
        1.1,
        "> 1 discourages repeats",
        above=0,
        high=100,
        flag="--repeat-penalty",
        label="Repeat penalty",
    )
    repeat_last_n: int = setting(
        64,
        "tokens the repeat penalty looks back over (-1: the whole context)",
        low=-1,
        high=MAX_CTX,
        flag="--repeat-last-n",
        label="Repeat window",
    )
    seed: int | None = setting(
        None,
        "fixed seed for repeatable answers (default: a fresh one each time)",
        low=0,
        high=SEED_MAX,
        flag="--seed",
        label="Seed",
    )
    max_tokens: int = setting(
        512,
        "most tokens in one answer",
        low=1,
        high=MAX_CTX,
        flag="--max-tokens",
        label="Max tokens",
    )

    def validate(self) -> Sampling:
        """Raise UsageError for a value out of bounds; return self."""
        for f in fields(self):
            check_value(Sampling, f, getattr(self, f.name), declared_name("sampling", f))
        return self


@dataclass(frozen=True)
class ChatSettings:
    """What the conversation starts with."""

    system: str = setting("", "a system prompt", flag="--system", metavar="TEXT")


@dataclass(frozen=True)
class StoreSettings:
    """Where history lives: a SQLite file; no path means the platform data dir."""

    path: str | None = setting(None, "the history database file")


@dataclass(frozen=True)
class ServerSettings:
    """An OpenAI-compatible server that runs the model (`--device server`). The API key itself
    is never stored: api_key_env names the environment variable that holds it."""

    url: str | None = setting(
        None,
        "an OpenAI-compatible server to chat with, e.g. http://gpu-box:8080/v1 (no local model)",
        flag="--server",
        metavar="URL",
    )
    model: str = setting(
        "",
        "the server's model to chat with (default: the first it lists)",
        flag="--server-model",
        metavar="NAME",
    )
    api_key_env: str = setting("", "the environment variable holding the server's API key")
    timeout: float = setting(
        60.0, "seconds to connect, and between two chunks of an answer", above=0, high=86400
    )
    kind: str = setting("auto", f"{', '.join(SERVER_KINDS)} (auto: detected)")


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
    server: ServerSettings = field(default_factory=ServerSettings)


SECTIONS: dict[str, type] = {
    name: kind for name, kind in get_type_hints(Settings).items() if name != "device"
}


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


# --- the schema, read back ---------------------------------------------------------------------


def spec_of(f: Field[Any]) -> Spec:
    """The Spec declared for a settings field."""
    return f.metadata["spec"]


@cache
def field_type(section: type, name: str) -> Any:
    """The declared type of a settings field: int, float, bool, str or `X | None`."""
    return get_type_hints(section)[name]


def schema() -> Iterator[tuple[str, Field[Any]]]:
    """Every setting as (section name, field), in declaration order."""
    for section, kind in SECTIONS.items():
        for f in fields(kind):
            yield section, f


def value_type(section: type, name: str) -> type:
    """The type a setting holds when set: float for `float`, int for `int | None`, and so on."""
    declared = field_type(section, name)
    args = [a for a in getattr(declared, "__args__", ()) if a is not type(None)]
    return args[0] if args else declared


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def check_value(section: type, f: Field[Any], value: Any, name: str) -> Any:
    """`value` checked against the type and bounds of field `f` of `section` (ints become floats
    where the field is a float); UsageError naming the setting `name` otherwise."""
    kind = value_type(section, f.name)
    spec = spec_of(f)
    if value is None:
        if field_type(section, f.name) is kind:
            raise UsageError(f"{name} must be {_type_name(kind)}")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise UsageError(f"{name} must be {_type_name(kind)}, not {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, not {value}")
    if kind is str and "\0" in value:
        raise UsageError(f"{name} must not contain NUL characters")
    if kind in (int, float):
        too_low = (spec.low is not None and value < spec.low) or (
            spec.above is not None and value <= spec.above
        )
        too_high = spec.high is not None and value > spec.high
        if too_low or too_high:
            raise UsageError(f"{name} must be {spec.bounds()}, not {value}")
    return value


# --- layers ------------------------------------------------------------------------------------


def user_config_path() -> Path:
    """The user's own config file in the platform config dir (XDG_CONFIG_HOME respected)."""
    from platformdirs import user_config_path as _user_config_path

    return _user_config_path(APP_NAME) / "config.toml"


def packaged_config(device: str) -> str:
    """The text of the packaged configs/<device>.toml."""
    from importlib.resources import files

    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    return files("phichat.configs").joinpath(f"{device}.toml").read_text(encoding="utf-8")


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


def apply_layer(settings: Settings, layer: dict[str, Any], source: str) -> Settings:
    """Overlay one parsed config file on settings, checking every section, key and value."""
    for section, values in layer.items():
        if section not in SECTIONS:
            known = ", ".join(SECTIONS)
            raise UsageError(f"{source}: unknown section [{section}] (known: {known})")
        if not isinstance(values, dict):
            raise UsageError(f"{source}: [{section}] must be a table")
        current = getattr(settings, section)
        declared = {f.name: f for f in fields(current)}
        changes = {}
        for key, value in values.items():
            if key not in declared:
                known = ", ".join(declared)
                raise UsageError(f"{source}: unknown key {section}.{key} (known: {known})")
            try:
                changes[key] = check_value(type(current), declared[key], value, f"{section}.{key}")
            except UsageError as exc:
                raise UsageError(f"{source}: {exc}") from None
        settings = replace(settings, **{section: replace(current, **changes)})
    try:
        return validate(settings)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None


def validate(settings: Settings) -> Settings:
    """Raise UsageError where settings disagree with each other; return settings."""
    sampling, engine, server = settings.sampling, settings.engine, settings.server
    if sampling.repeat_last_n > engine.n_ctx:
        raise UsageError(
            f"repeat-last-n ({sampling.repeat_last_n}) must be <= the context window "
            f"({engine.n_ctx}), or -1 for all of it"
        )
    if server.url is not None:
        split_server_url(server.url)
    if server.kind not in SERVER_KINDS:
        raise UsageError(
            f"server.kind must be one of {', '.join(SERVER_KINDS)}, not {server.kind!r}"
        )
    return settings


def split_server_url(url: str) -> tuple[str, str]:
    """(OpenAI API base, server root) of a server URL given with or without its /v1."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"server URL {url!r} must look like http://host:port/v1")
    root = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    return (root + (path or "/v1"), root)


def server_host(url: str) -> str:
    """The host:port of a server URL, without any user:password@ in it."""
    return urlsplit(url.strip()).netloc.rpartition("@")[2]


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
    if device == SERVER and not settings.server.url:
        raise UsageError(
            "--device server needs the server's URL: --server URL, "
            "or url in the [server] table of a config file"
        )
    return validate(settings)


def merge_overrides(settings: Settings, overrides: dict[str, dict[str, Any]]) -> Settings:
    """Apply values from flags or the app (checked against the schema), skipping None."""
    for section, values in overrides.items():
        current = getattr(settings, section)
        declared = {f.name: f for f in fields(current)}
        changes = {
            key: check_value(
                type(current), declared[key], value, declared_name(section, declared[key])
            )
            for key, value in values.items()
            if value is not None
        }
        if changes:
            settings = replace(settings, **{section: replace(current, **changes)})
    return settings


def declared_name(section: str, f: Field[Any]) -> str:
    """How errors name a setting: its flag where it has one, else section.key."""
    return spec_of(f).flag or f"{section}.{f.name}"
