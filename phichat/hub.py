"""Every Hugging Face download: the HF cache first (no network at all), then the Hub.

Files land in the standard cache (HF_HOME / HF_HUB_CACHE respected) and are used from it
afterwards. huggingface_hub draws its progress bar on stderr; a front end may pass its own
tqdm class instead (the TUI does). A Hub whose host does not resolve (a machine offline) is
said at once, in the one line every failure gets, rather than after huggingface_hub's retries
and their log lines.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from phichat.config import expand_path
from phichat.errors import PhichatError

if TYPE_CHECKING:
    from phichat.config import ModelSettings


def _missing(repo: str, what: str, revision: str, reason: str) -> PhichatError:
    return PhichatError(
        f"{what} from {repo} (revision {revision[:12]}) is not in the Hugging Face cache "
        f"and could not be downloaded ({reason}); run `phichat pull` with network access"
    )


def _reason(exc: Exception) -> str:
    """A short, single-line reason for a failed download."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return "offline"
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _unreachable() -> str | None:
    """Why the Hub cannot be reached at all (its host name does not resolve), or None; its
    retry messages, meant for a flaky network, are kept off the terminal."""
    from huggingface_hub import constants

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    host = urlsplit(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"cannot resolve {host}: offline?"
    return None


def resolve_file(repo: str, filename: str, revision: str, tqdm_class: Any = None) -> Path:
    """Local path of `filename` in `repo` at `revision`, downloading it once if needed."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or cache unreadable): try the Hub
        pass
    if (reason := _unreachable()) is not None:
        raise _missing(repo, filename, revision, reason)
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, tqdm_class=tqdm_class))
    except Exception as exc:  # noqa: BLE001 - any network/Hub failure becomes one clear line
        raise _missing(repo, filename, revision, _reason(exc)) from None


def resolve_snapshot(
    repo: str, revision: str, allow_patterns: list[str], tqdm_class: Any = None
) -> Path:
    """Local directory of `repo` at `revision` holding the files matching `allow_patterns`."""
    from huggingface_hub import snapshot_download

    def complete(path: Path) -> bool:
        return all(any(path.glob(pattern)) for pattern in allow_patterns)

    try:
        local = Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=allow_patterns, local_files_only=True
            )
        )
        if complete(local):
            return local
    except Exception:  # noqa: BLE001 - not cached: try the Hub
        pass
    if (reason := _unreachable()) is not None:
        raise _missing(repo, ", ".join(allow_patterns), revision, reason)
    try:
        local = Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=allow_patterns, tqdm_class=tqdm_class
            )
        )
    except Exception as exc:  # noqa: BLE001 - any network/Hub failure becomes one clear line
        raise _missing(repo, ", ".join(allow_patterns), revision, _reason(exc)) from None
    if not complete(local):
        raise _missing(repo, ", ".join(allow_patterns), revision, "incomplete snapshot")
    return local


def fetch_model(model: ModelSettings, tqdm_class: Any = None) -> Path:
    """The GGUF to load: `[model] path` (--model-file) as given, else the Hub file, downloaded
    into the HF cache the first time."""
    if model.path:
        return expand_path(model.path)
    return resolve_file(model.repo, model.file, model.revision, tqdm_class=tqdm_class)


def is_cached(model: ModelSettings) -> bool:
    """Whether the model's GGUF is on this machine already (a local path, or the Hub file at
    its revision in the HF cache): no download needed."""
    if model.path:
        return expand_path(model.path).is_file()
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model.repo, model.file, revision=model.revision)
    return isinstance(found, str)
