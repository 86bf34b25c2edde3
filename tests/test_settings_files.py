"""Named models ([models], --model), remappable keys ([keys]) and saving settings to the user's
config file (keeping its comments and other keys)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOLLM_FILE, SMOLLM_REPO, SMOLLM_REVISION
from helpers import assert_one_line_error, phichat

from phichat.config import (
    DEFAULT_MODEL,
    PHI3_FILE,
    PHI3_FP16_FILE,
    PHI3_REPO,
    PHI3_REVISION,
    PUNCTUATION_KEYS,
    KeySettings,
    load_settings,
    user_config_path,
)
from phichat.errors import UsageError
from phichat.user_config import save_settings

ROOT = Path(__file__).resolve().parent.parent
SMOLLM_ENTRY = (
    f'[models.smol]\nrepo = "{SMOLLM_REPO}"\nfile = "{SMOLLM_FILE}"\n'
    f'revision = "{SMOLLM_REVISION}"\n'
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- named models ----------------------------------------------------------------------------


def test_shipped_models_default_to_phi3_q4_and_offer_its_fp16_file() -> None:
    settings = load_settings("cpu")
    assert settings.model.name == DEFAULT_MODEL
    assert (settings.model.repo, settings.model.file) == (PHI3_REPO, PHI3_FILE)
    fp16 = load_settings("cpu", overrides={"model": {"name": "phi-3-mini-4k-fp16"}}).model
    assert (fp16.repo, fp16.file, fp16.revision) == (PHI3_REPO, PHI3_FP16_FILE, PHI3_REVISION)


def test_user_entries_and_a_default_model_by_name(tmp_path: Path) -> None:
    local = tmp_path / "mine.gguf"
    config = write(
        user_config_path(),
        f'[model]\nname = "smol"\n\n{SMOLLM_ENTRY}\n[models.local]\npath = "{local}"\n',
    )
    settings = load_settings("cpu")
    assert set(settings.models) == {DEFAULT_MODEL, "phi-3-mini-4k-fp16", "smol", "local"}
    assert (settings.model.name, settings.model.file) == ("smol", SMOLLM_FILE)
    flag = load_settings("cpu", overrides={"model": {"name": "local"}}).model
    assert (flag.name, flag.path) == ("local", str(local))
    # --model-file (or [model] path) leaves the named entries for that one file
    file_flag = load_settings("cpu", overrides={"model": {"path": str(local)}}).model
    assert (file_flag.name, file_flag.path) == (None, str(local))
    assert config.is_file()


@pytest.mark.slow
def test_model_flag_answers_with_the_named_model(
    tiny_phi3_path: Path, smollm_path: Path, tmp_path: Path
) -> None:
    config = write(tmp_path / "models.toml", SMOLLM_ENTRY)
    args = ("--config", str(config), "--temperature", "0", "--max-tokens", "8", "--no-history")
    default = phichat(*args, "--prompt", "Say hi")
    assert default.stdout == "Hello world\n"  # the tiny Phi-3 is the shipped default's file
    smol = phichat(*args, "--model", "smol", "--prompt", "Say hi")
    assert smol.returncode == 0, smol.stderr
    assert smol.stdout.strip() and smol.stdout != default.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--model", "phi-9"],
            "unknown model 'phi-9' (known: phi-3-mini-4k-q4, phi-3-mini-4k-fp16",
        ),
        (["--model", DEFAULT_MODEL, "--model-file", "x.gguf"], "--model and --model-file"),
    ],
)
def test_bad_model_flags_give_one_line(args: list[str], fragment: str) -> None:
    assert_one_line_error(phichat(*args, "--prompt", "hi"), fragment)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[models.x]\nrepo = "a/b"\nfile = "c.gguf"\n', "[models.x] needs a revision"),
        ('[models.x]\npath = "/m.gguf"\nrepo = "a/b"\n', "has a path and a repo"),
        ('[models.x]\npath = "/m.gguf"\nsize = 3\n', "unknown key models.x.size"),
        ('[models]\nx = "/m.gguf"\n', "[models.x] must be a table"),
        ('[models.x]\npath = ""\n', "models.x.path: must not be empty"),
        ('[models."my model"]\npath = "/m.gguf"\n', "a model name is letters"),
        ('[model]\nname = "nope"\n', "unknown model 'nope'"),
        ('[model]\nname = "phi-3-mini-4k-q4"\npath = "/m.gguf"\n', "model.name and model.path"),
    ],
)
def test_bad_model_tables_name_the_file_and_the_entry(
    tmp_path: Path, text: str, fragment: str
) -> None:
    config = write(tmp_path / "mine.toml", text)
    with pytest.raises(UsageError) as raised:
        load_settings("cpu", config)
    assert str(raised.value).startswith(str(config)) and fragment in str(raised.value)


# --- keys ------------------------------------------------------------------------------------


def test_keys_are_remapped_and_checked(tmp_path: Path) -> None:
    config = write(tmp_path / "keys.toml", '[keys]\ncopy_answer = "ctrl+k,f9"\n')
    keys = load_settings("cpu", config).keys
    assert keys.copy_answer == "ctrl+k,f9" and keys.regenerate == KeySettings().regenerate


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[keys]\ncopy_answer = "crtl+k"\n', "'crtl' in 'crtl+k' is not a modifier"),
        ('[keys]\ncopy_answer = "ctrl+/"\n', "'/' in 'ctrl+/' is not a key"),
        ('[keys]\ncopy_answer = "ctrl+K"\n', "'K' in 'ctrl+K' is not a key"),
        ('[keys]\ncopy_answer = "ctrl+ctrl+ctrl+x"\n', "'ctrl' is given twice in"),
        ('[keys]\ncopy_answer = "f9,alt+shift+alt+k"\n', "'alt' is given twice in"),
        ('[keys]\ncopy_answer = ""\n', "has an empty key"),
        ("[keys]\ncopy_answer = 3\n", "keys.copy_answer must be a string"),
        ('[keys]\ncopy = "ctrl+k"\n', "unknown key keys.copy (known: new_conversation"),
        ('[keys]\ncopy_answer = "ctrl+r"\n', "keys.copy_answer and keys.regenerate are both"),
        ('[keys]\ncopy_answer = "ctrl+p"\n', "ctrl+p opens the command palette"),
    ],
)
def test_bad_keys_name_the_file_and_the_action(tmp_path: Path, text: str, fragment: str) -> None:
    config = write(tmp_path / "keys.toml", text)
    with pytest.raises(UsageError) as raised:
        load_settings("cpu", config)
    assert str(raised.value).startswith(str(config)) and fragment in str(raised.value)


def test_punctuation_key_names_are_textuals() -> None:
    import string

    from textual.keys import _character_to_key

    assert {_character_to_key(ch) for ch in string.punctuation} == PUNCTUATION_KEYS


# --- saving settings -------------------------------------------------------------------------

USER_FILE = """\
# my phichat settings
[sampling]
temperature = 0.3  # a bit warm
top_p = 0.9

[engine]
n_ctx = 2048  # small machine
"""


def test_save_keeps_comments_and_other_keys_and_is_read_back() -> None:
    path = write(user_config_path(), USER_FILE)
    changes = {"sampling": {"temperature": 0.5, "seed": 7}, "chat": {"system": "Be brief.\nOK?"}}
    assert save_settings(changes) == path
    text = path.read_text()
    assert "# my phichat settings" in text and "# small machine" in text
    assert "temperature = 0.5  # a bit warm" in text and "top_p = 0.9" in text
    settings = load_settings("cpu")
    assert (settings.sampling.temperature, settings.sampling.seed) == (0.5, 7)
    assert (settings.sampling.top_p, settings.engine.n_ctx) == (0.9, 2048)
    assert settings.chat.system == "Be brief.\nOK?"
    save_settings({"sampling": {"seed": None}})  # None: back to the default
    assert load_settings("cpu").sampling.seed is None
    assert "# a bit warm" in path.read_text()


def test_save_creates_the_file_and_refuses_to_clobber_a_broken_one() -> None:
    path = user_config_path()
    save_settings({"sampling": {"max_tokens": 99}})
    assert load_settings("cpu").sampling.max_tokens == 99
    path.write_text("[sampling]\ntemperature = \n")
    with pytest.raises(UsageError, match="line 2"):
        save_settings({"sampling": {"max_tokens": 5}})
    assert path.read_text() == "[sampling]\ntemperature = \n"


def test_save_writes_through_a_symlinked_config(tmp_path: Path) -> None:
    kept = write(tmp_path / "dotfiles" / "phichat.toml", USER_FILE)
    path = user_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(kept)
    save_settings({"sampling": {"seed": 7}})
    assert path.is_symlink() and path.resolve() == kept.resolve()
    assert "seed = 7" in kept.read_text() and "# a bit warm" in kept.read_text()
    assert load_settings("cpu").sampling.seed == 7
    assert [p.name for p in kept.parent.iterdir()] == ["phichat.toml"]  # no temp file left


@pytest.mark.slow
def test_the_device_configs_are_found_from_a_checkout(tmp_path: Path) -> None:
    # In a checkout, ./phichat shadows an installed phichat, and configs/ lies beside it rather
    # than inside (pip maps it in): -S leaves the editable install's mapping out, as a plain
    # `pip install .` would.
    for folder in ("phichat", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    read = "from phichat.config import packaged_config; print(packaged_config('cpu'))"
    done = subprocess.run(
        [sys.executable, "-S", "-c", read], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (ROOT / "configs" / "cpu.toml").read_text() + "\n"
