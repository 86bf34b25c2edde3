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
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from phichat.errors import UsageError
from phichat.paths import config_dir
from phichat.text import clipped, is_blank

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Device = Literal["cpu", "cuda", "metal", "server"]
LOCAL_DEVICES: tuple[Device, ...] = ("cpu", "cuda", "metal")  # llama.cpp in this process
SERVER: Device = "server"  # the model runs on an OpenAI-compatible server
DEVICES: tuple[Device, ...] = (*LOCAL_DEVICES, SERVER)
ServerKind = Literal["auto", "llama-server", "llama-cpp-python", "vllm", "ollama", "generic"]
SERVER_KINDS: tuple[ServerKind, ...] = get_args(ServerKind)
DEFAULT_PROMPT = "Write a haiku about ice hockey"

PHI3_REPO = "microsoft/Phi-3-mini-4k-instruct-gguf"
PHI3_FILE = "Phi-3-mini-4k-instruct-q4.gguf"
PHI3_FP16_FILE = "Phi-3-mini-4k-instruct-fp16.gguf"
PHI3_REVISION = "999f761fe19e26cf1a339a5ec5f9f201301cbb83"
DEFAULT_MODEL = "phi-3-mini-4k-q4"
SHIPPED_FILES = {DEFAULT_MODEL: PHI3_FILE, "phi-3-mini-4k-fp16": PHI3_FP16_FILE}
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_REVISION = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"

URL_LIMIT = 2048  # a server URL longer than this is a mistake (httpx allows 64 Ki)
MAX_CTX = 1 << 20  # no GGUF chat model has a longer window; memory is checked at load
MAX_THREADS = 256  # and at load, at most THREADS_PER_CORE per usable core
THREADS_PER_CORE = 4
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few lines; /dev/zero must not fill memory
MAX_GPU_LAYERS = 1024
SEED_MAX = 2**32 - 1  # llama.cpp seeds are uint32
KvType = Literal["f16", "q8_0"]
KV_TYPES: tuple[KvType, ...] = get_args(KvType)
MAX_CACHE_MB = 1 << 24  # 16 TB


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
    check: Callable[[Any], str | None] | None = None  # what is wrong with a value, if anything
    choices: tuple[str, ...] | None = None

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


def _not_blank(text: str) -> str | None:
    """A name or a path must say something (an empty one would quietly mean the default)."""
    return "must not be empty" if is_blank(text) else None


def expand_path(text: str) -> Path:
    """`text` as a path, a leading ~ or ~user expanded; UsageError where that home is unknown
    (pathlib raises RuntimeError for it)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        home = text.split("/", 1)[0]
        raise UsageError(f"{text!r}: no home directory is known for {home!r}") from None


def _path_problem(text: str) -> str | None:
    """What is wrong with a path setting: empty, or a ~user whose home is unknown."""
    try:
        expand_path(text)
    except UsageError as exc:
        return str(exc)
    return _not_blank(text)


@dataclass(frozen=True)
class ModelSettings:
    """Which GGUF to run: a named entry of [models], or a Hub file at a pinned revision, or a
    local path. Setting `name` takes the entry's repo, file, revision and path; setting any of
    those (as `--model-file` does) leaves the named entries."""

    name: str | None = setting(
        DEFAULT_MODEL,
        f"a model named in [models] (shipped: {', '.join(SHIPPED_FILES)})",
        flag="--model",
        metavar="NAME",
    )
    repo: str = setting(PHI3_REPO, "Hugging Face repo of the GGUF", check=_not_blank)
    file: str = setting(PHI3_FILE, "GGUF file in that repo", check=_not_blank)
    revision: str = setting(PHI3_REVISION, "pinned commit of that repo", check=_not_blank)
    path: str | None = setting(
        None,
        "a local GGUF instead of the Hub model (not with --server)",
        flag="--model-file",
        metavar="PATH",
        check=_path_problem,
    )


MODEL_SOURCE = ("repo", "file", "revision", "path")  # what a [models] entry may set
MODEL_NAME = re.compile(r"[\w.-]+")


def shipped_models() -> dict[str, ModelSettings]:
    """The named models phichat ships: Phi-3-mini-4k from Microsoft's own GGUF repo."""
    return {
        name: ModelSettings(name=name, repo=PHI3_REPO, file=file, revision=PHI3_REVISION)
        for name, file in SHIPPED_FILES.items()
    }


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
        check=_path_problem,
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
    kv_type: KvType = setting(
        "f16", "KV cache type (q8_0: half the memory and saved-state size)", choices=KV_TYPES
    )
    state_cache_mb: int = setting(
        0,
        "disk space for saved conversation states, in MB (0: none are saved)",
        low=0,
        high=MAX_CACHE_MB,
    )

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
    recall_tokens: int = setting(
        512,
        "once a conversation outgrows the window: tokens of older turns recalled by relevance"
        " into each new message (read again on every turn; at most half the room left)",
        low=0,
        high=MAX_CTX,
    )
    knowledge_tokens: int = setting(
        1024,
        "with a folder as the conversation's knowledge (/use DIR, --use DIR): tokens of its"
        " chunks most relevant to each message that go with it (at most what the window leaves)",
        low=0,
        high=MAX_CTX,
    )
    read_ahead: bool = setting(
        True,
        "in the app, read ahead while you type or read (the message so far, the next turn's"
        " history), so that Enter leaves only the message's last words to read",
    )


@dataclass(frozen=True)
class RoleSettings:
    """A named role (`[roles.NAME]`, `--role NAME`): a system prompt and sampling settings
    that win over the session's own while the role is chosen."""

    name: str
    system: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)  # Sampling field -> value


_SYSTEM = next(f for f in fields(ChatSettings) if f.name == "system")
SHIPPED_ROLES: dict[str, dict[str, Any]] = {
    "coder": {
        "system": "You are a terse senior programmer. Answer with working code first, then at "
        "most two sentences. No greetings, no apologies.",
        "temperature": 0.2,
    },
    "writer": {
        "system": "You are a careful editor and writer. Write clear, concrete prose in plain "
        "words; keep the author's voice; prefer short sentences.",
        "temperature": 0.8,
    },
    "shell": {
        "system": "You turn requests into one POSIX shell command line. Reply with the command "
        "alone, on one line, no explanation and no code fences.",
        "temperature": 0.0,
        "max_tokens": 128,
    },
}


def _role(name: str, entry: Any) -> RoleSettings:
    """One [roles.NAME] table as a RoleSettings: `system` and any [sampling] key, each checked
    and named (`roles.NAME.KEY`) when refused."""
    where = f"roles.{name}"
    if not MODEL_NAME.fullmatch(name):
        raise UsageError(f"[{where}]: a role name is letters, digits, '.', '_' and '-'")
    if not isinstance(entry, dict):
        raise UsageError(f"[{where}] must be a table (system and sampling settings)")
    declared = {f.name: f for f in fields(Sampling)}
    system, sampling = "", {}
    for key, value in entry.items():
        if key == "system":
            system = check_value(ChatSettings, _SYSTEM, value, f"{where}.system")
        elif key in declared:
            sampling[key] = check_value(Sampling, declared[key], value, f"{where}.{key}")
        else:
            known = ", ".join(["system", *declared])
            raise UsageError(f"unknown key {where}.{key} (known: {known})")
    if not system and not sampling:
        raise UsageError(f"[{where}] sets nothing (a system prompt or sampling settings)")
    if sampling:  # the values together, as the session will use them
        replace(Sampling(), **sampling).validate()
    return RoleSettings(name, system, sampling)


def shipped_roles() -> dict[str, RoleSettings]:
    """The roles phichat ships (a terse coder, a writer, a shell one-liner helper)."""
    return {name: _role(name, entry) for name, entry in SHIPPED_ROLES.items()}


@dataclass(frozen=True)
class StoreSettings:
    """Where history lives: a SQLite file; no path means history.db in phichat's data folder."""

    path: str | None = setting(None, "the history database file", check=_path_problem)


MODIFIERS = ("ctrl", "shift", "alt", "meta", "super", "hyper")
NAMED_KEYS = frozenset(
    {"enter", "escape", "tab", "space", "backspace", "delete", "insert", "home", "end"}
    | {"pageup", "pagedown", "up", "down", "left", "right"}
    | {f"f{n}" for n in range(1, 25)}
)
# Textual's names for punctuation: the Unicode name, lower case, with these shortened
_SHORT_NAMES = {
    "solidus": "slash",
    "reverse_solidus": "backslash",
    "commercial_at": "at",
    "hyphen_minus": "minus",
    "plus_sign": "plus",
    "low_line": "underscore",
}
PUNCTUATION_KEYS = frozenset(
    _SHORT_NAMES.get(name, name)
    for name in (
        unicodedata.name(ch).lower().replace("-", "_").replace(" ", "_")
        for ch in string.punctuation
    )
)
RESERVED_KEYS = {"ctrl+p": "opens the command palette", "ctrl+q": "quits", "ctrl+c": "quits"}


def key_list(keys: str) -> list[str]:
    """The keys of a `[keys]` value, in order ("shift+enter,ctrl+j" -> both)."""
    return [key.strip() for key in keys.split(",")]


def key_problem(keys: str) -> str | None:
    """What is wrong with a key string (None when it is fine): one or more keys, separated by
    commas, each a key name with optional modifiers, as Textual names them ("ctrl+t", "f4",
    "ctrl+slash", "escape,ctrl+g")."""
    for key in key_list(keys):
        *modifiers, name = key.split("+")
        if not name and not modifiers:
            return f"{keys!r} has an empty key"
        unknown = [m for m in modifiers if m not in MODIFIERS]
        if unknown:
            return f"{unknown[0]!r} in {key!r} is not a modifier ({', '.join(MODIFIERS)})"
        repeated = [m for n, m in enumerate(modifiers) if m in modifiers[:n]]
        if repeated:
            return f"{repeated[0]!r} is given twice in {key!r}"
        plain = len(name) == 1 and name.isprintable() and not name.isspace()
        if not (
            name in NAMED_KEYS
            or name in PUNCTUATION_KEYS
            or (plain and (not modifiers or name.islower() or name.isdigit()))
        ):
            return (
                f"{name!r} in {key!r} is not a key (a letter, a digit, f1-f24, enter, "
                "escape, tab, space, up, pageup, home, ... or a name such as slash or comma)"
            )
    return None


def _keys(default: str, help: str, label: str) -> Any:
    """Declare the keys of one app action (`label` names it in the command palette)."""
    return setting(default, help, label=label, check=key_problem)


@dataclass(frozen=True)
class KeySettings:
    """The app's actions, each by its id: the keys that run it (Textual key names; several are
    separated by commas). Each is also a command in the palette (ctrl+p) under its label, but
    the message box's own (send, newline)."""

    new_conversation: str = _keys("ctrl+n", "start a new conversation", "New chat")
    conversations: str = _keys("ctrl+o", "open a past conversation", "Conversations")
    search: str = _keys("ctrl+f", "search every message by meaning and words", "Search")
    toggle_side: str = _keys("ctrl+b", "show or hide the side pane", "Toggle the side pane")
    settings: str = _keys("ctrl+s,f2", "sampling and the system prompt", "Settings")
    copy_answer: str = _keys("ctrl+t", "copy the last answer to the clipboard", "Copy answer")
    copy_code: str = _keys("ctrl+g", "copy a code block of the answer", "Copy code block")
    regenerate: str = _keys(
        "ctrl+r", "answer the last message again (the old answer is kept)", "Regenerate"
    )
    edit_last: str = _keys(
        "f4", "edit the last message and send it again (Up in an empty box too)", "Edit last"
    )
    show_replaced: str = _keys(
        "f3", "show or hide answers replaced by a regenerate or an edit", "Show replaced"
    )
    export: str = _keys("f5", "write this conversation to a Markdown file", "Export")
    switch_model: str = _keys("ctrl+l", "carry on with another model", "Switch model")
    stop: str = _keys("escape", "stop the answer being written (what came is kept)", "Stop")
    role: str = _keys("f8", "this conversation's role: a system prompt and sampling", "Role")
    continue_answer: str = _keys(
        "f12", "go on with the last answer, stopped or cut at max tokens", "Continue answer"
    )
    fork: str = _keys("f11", "carry on in a copy of this conversation, under it", "Fork")
    # shift+f1 and shift+f2 (f13, f14 as terminals send them)
    pin: str = _keys("f13", "pin this conversation to the top of the list, or unpin it", "Pin")
    archive: str = _keys(
        "f14", "archive this conversation out of the list, or restore it", "Archive"
    )
    editor: str = _keys(
        "ctrl+backslash", "write the message in $VISUAL or $EDITOR", "Open in editor"
    )
    # the message box's own keys (not palette commands)
    send: str = _keys("enter", "send the message (one being edited replaces the last)", "Send")
    newline: str = _keys("shift+enter,ctrl+j,alt+enter", "a new line in the message", "New line")


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
    kind: ServerKind = setting("auto", "the kind of server (auto: detected)", choices=SERVER_KINDS)


@dataclass(frozen=True)
class Settings:
    """Everything phichat needs to run, after all layers are merged. `models` holds the named
    models (`--model NAME`): the shipped ones and the user's own."""

    device: Device = "cpu"
    model: ModelSettings = field(default_factory=ModelSettings)
    models: dict[str, ModelSettings] = field(default_factory=shipped_models)
    roles: dict[str, RoleSettings] = field(default_factory=shipped_roles)
    embedder: EmbedderSettings = field(default_factory=EmbedderSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    sampling: Sampling = field(default_factory=Sampling)
    chat: ChatSettings = field(default_factory=ChatSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    keys: KeySettings = field(default_factory=KeySettings)
    server: ServerSettings = field(default_factory=ServerSettings)


# The sections of declared settings ([models] and [roles] are tables of named entries instead).
SECTIONS: dict[str, type] = {
    name: kind
    for name, kind in get_type_hints(Settings).items()
    if name not in ("device", "models", "roles")
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
    """The declared type of a settings field: int, float, bool, str, a Literal of strings or
    `X | None`."""
    return get_type_hints(section)[name]


def schema() -> Iterator[tuple[str, Field[Any]]]:
    """Every setting as (section name, field), in declaration order."""
    for section, kind in SECTIONS.items():
        for f in fields(kind):
            yield section, f


def value_type(section: type, name: str) -> type[Any]:
    """The type a setting holds when set: float for `float`, int for `int | None`, str for a
    Literal of strings (its Spec's choices), and so on."""
    declared = field_type(section, name)
    if get_origin(declared) is Literal:
        return str
    args = [a for a in getattr(declared, "__args__", ()) if a is not type(None)]
    return args[0] if args else declared


def check_text(text: str, name: str) -> str:
    """`text` from the user, refused in one line where it is not valid UTF-8 (Python keeps
    undecodable argv and stdin bytes as lone surrogates) or holds NUL characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{name} is not valid UTF-8 text") from None
    if "\0" in text:
        raise UsageError(f"{name} must not contain NUL characters")
    return text


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def check_value(section: type, f: Field[Any], value: Any, name: str) -> Any:
    """`value` checked against the type and bounds of field `f` of `section` (ints become floats
    where the field is a float); UsageError naming the setting `name` otherwise."""
    kind = value_type(section, f.name)
    spec = spec_of(f)
    if value is None:
        if type(None) not in get_args(field_type(section, f.name)):
            raise UsageError(f"{name} must be {_type_name(kind)}")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise UsageError(f"{name} must be {_type_name(kind)}, not {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, not {value}")
    if kind is str:
        check_text(value, name)
        if value and is_blank(value):
            raise UsageError(f"{name} is blank (only whitespace or control characters)")
    if spec.choices is not None and value not in spec.choices:
        raise UsageError(f"{name} must be one of {', '.join(spec.choices)}, not {value!r}")
    if spec.check is not None and (problem := spec.check(value)) is not None:
        raise UsageError(f"{name}: {problem}")
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
    """The user's own config file, config.toml in phichat's config folder (`phichat.paths`)."""
    return config_dir() / "config.toml"


def as_device(name: str) -> Device:
    """`name` as a device; UsageError naming the devices where it is none."""
    for device in DEVICES:
        if name == device:
            return device
    raise UsageError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")


def packaged_config(name: str) -> str:
    """The text of the packaged configs/<device>.toml."""
    from importlib.resources import files

    device = as_device(name)
    try:
        folder: Any = files("phichat.configs")
    except ModuleNotFoundError:  # run from a checkout (python -m phichat there): not mapped in
        folder = Path(__file__).resolve().parent.parent / "configs"
    return folder.joinpath(f"{device}.toml").read_text(encoding="utf-8")


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML, turning a syntax error into one line that names the file and the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of [ or {
        raise UsageError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """Read and parse a user's TOML config file. A FIFO is opened without waiting for a writer
    (one that has none reads as empty); `--config <(...)` is read as it is written."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: cannot read config file: {exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"{path}: not a config file (more than {MAX_CONFIG_BYTES} bytes)")
    return parse_toml(text, str(path))


def apply_layer(settings: Settings, layer: dict[str, Any], source: str) -> Settings:
    """Overlay one parsed config file on settings, checking every section, key and value."""
    try:
        if "models" in layer:  # first: [model] name may pick an entry defined alongside
            settings = replace(settings, models=_with_models(settings.models, layer["models"]))
        if "roles" in layer:
            settings = replace(settings, roles=_with_roles(settings.roles, layer["roles"]))
        for section, values in layer.items():
            if section in ("models", "roles"):
                continue
            if section not in SECTIONS:
                known = ", ".join(["models", "roles", *SECTIONS])
                raise UsageError(f"unknown section [{section}] (known: {known})")
            if not isinstance(values, dict):
                raise UsageError(f"[{section}] must be a table")
            current = getattr(settings, section)
            declared = {f.name: f for f in fields(current)}
            changes = {}
            for key, value in values.items():
                if key not in declared:
                    known = ", ".join(declared)
                    raise UsageError(f"unknown key {section}.{key} (known: {known})")
                changes[key] = check_value(type(current), declared[key], value, f"{section}.{key}")
            settings = _with_changes(settings, section, changes)
        return validate(settings)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None


def _with_models(models: dict[str, ModelSettings], table: Any) -> dict[str, ModelSettings]:
    """`models` with the entries of a [models] table added (an entry of the same name is
    replaced whole): each needs `repo`, `file` and `revision`, or a `path`."""
    if not isinstance(table, dict):
        raise UsageError("[models] must be a table of named models")
    declared = {f.name: f for f in fields(ModelSettings)}
    models = dict(models)
    for name, entry in table.items():
        where = f"models.{name}"
        if not MODEL_NAME.fullmatch(name):
            raise UsageError(f"[{where}]: a model name is letters, digits, '.', '_' and '-'")
        if not isinstance(entry, dict):
            raise UsageError(f"[{where}] must be a table (repo, file, revision, or path)")
        unknown = [key for key in entry if key not in MODEL_SOURCE]
        if unknown:
            known = ", ".join(MODEL_SOURCE)
            raise UsageError(f"unknown key {where}.{unknown[0]} (known: {known})")
        values = {
            key: check_value(ModelSettings, declared[key], value, f"{where}.{key}")
            for key, value in entry.items()
        }
        hub = [key for key in ("repo", "file", "revision") if key in values]
        if "path" in values and hub:
            raise UsageError(f"[{where}] has a path and a {hub[0]}: give one or the other")
        if "path" not in values and len(hub) < 3:
            missing = next(key for key in ("repo", "file", "revision") if key not in values)
            raise UsageError(
                f"[{where}] needs a {missing} (repo, file and a pinned revision, or a path)"
            )
        models[name] = ModelSettings(name=name, **values)
    return models


def _with_roles(roles: dict[str, RoleSettings], table: Any) -> dict[str, RoleSettings]:
    """`roles` with the entries of a [roles] table added (one of the same name is replaced
    whole)."""
    if not isinstance(table, dict):
        raise UsageError("[roles] must be a table of named roles")
    return {**roles, **{name: _role(name, entry) for name, entry in table.items()}}


def _with_changes(settings: Settings, section: str, changes: dict[str, Any]) -> Settings:
    """`settings` with checked `changes` to one section. In [model], a name picks a named
    entry (`validate` resolves it) and setting repo, file, revision or path leaves it."""
    if not changes:
        return settings
    if section == "model":
        source = [key for key in MODEL_SOURCE if key in changes]
        if changes.get("name") is not None and source:
            raise UsageError(f"model.name and model.{source[0]} do not go together")
        if source:
            changes = {**changes, "name": None}
    return replace(settings, **{section: replace(getattr(settings, section), **changes)})


def validate(settings: Settings) -> Settings:
    """Raise UsageError where settings disagree with each other; return settings, with the
    named model (`[model] name`, `--model`) resolved to its entry."""
    sampling, engine, server = settings.sampling, settings.engine, settings.server
    if sampling.repeat_last_n > engine.n_ctx:
        raise UsageError(
            f"repeat-last-n ({sampling.repeat_last_n}) must be <= the context window "
            f"({engine.n_ctx}), or -1 for all of it"
        )
    if engine.kv_type != "f16" and not engine.flash_attn:
        raise UsageError(
            f'engine.kv_type = "{engine.kv_type}" needs engine.flash_attn = true '
            "(llama.cpp quantizes the V cache only with flash attention)"
        )
    taken: dict[str, str] = {}
    for f in fields(KeySettings):
        for key in key_list(getattr(settings.keys, f.name)):
            if key in RESERVED_KEYS:
                raise UsageError(f"keys.{f.name}: {key} {RESERVED_KEYS[key]}")
            if key in taken:
                raise UsageError(f"keys.{taken[key]} and keys.{f.name} are both {key}")
            taken[key] = f.name
    name = settings.model.name
    if name is not None:
        if name not in settings.models:
            known = ", ".join(settings.models)
            raise UsageError(f"unknown model {name!r} (known: {known}; add it under [models])")
        settings = replace(settings, model=settings.models[name])
    if server.url is not None and settings.device == SERVER:  # unused otherwise (history)
        split_server_url(server.url)
    return settings


def split_server_url(url: str) -> tuple[str, str]:
    """(OpenAI API base, server root) of a server URL given with or without its /v1; a URL
    httpx would refuse (a bad port, IPv6 bracket or IPv4 address; too long) is a UsageError
    that shows it without its password."""
    import httpx

    if len(url) > URL_LIMIT:
        raise UsageError(f"server URL of {len(url)} characters: too long (at most {URL_LIMIT})")
    looks = f"server URL {redact_url(url)!r} must look like http://host:port/v1"
    try:
        parts = urlsplit(url.strip())
        httpx.URL(url.strip())
    except (ValueError, httpx.InvalidURL) as exc:
        raise UsageError(f"{looks} ({redact_url(str(exc))})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(looks)
    try:
        port = parts.port  # ValueError unless ASCII digits within 0-65535
    except ValueError:
        port = 0
    if port == 0:
        raise UsageError(f"{looks} (the port is a number from 1 to 65535)")
    root = f"{parts.scheme}://{parts.netloc}"
    path = parts.path.rstrip("/")
    return (root + (path or "/v1"), root)


def server_host(url: str) -> str:
    """The host:port of a server URL, without any user:password@ in it."""
    return urlsplit(url.strip()).netloc.rpartition("@")[2]


def redact_url(url: str) -> str:
    """A URL to show: its password as ***, cut to one short line."""
    shown = re.sub(r"(//[^/@:]*:)[^/]*@", r"\1***@", url)
    return clipped(shown, 100)


def load_settings(
    device: str,
    config_file: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Settings:
    """Merge packaged device config, the user's config file, --config and flag overrides."""
    settings = Settings(device=as_device(device))
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
        if section == "model" and changes.get("name") is not None and "path" in changes:
            raise UsageError("--model and --model-file do not go together")
        settings = _with_changes(settings, section, changes)
    return settings


def declared_name(section: str, f: Field[Any]) -> str:
    """How errors name a setting: its flag where it has one, else section.key."""
    return spec_of(f).flag or f"{section}.{f.name}"
