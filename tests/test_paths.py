"""Where phichat keeps its files: the platform's folders, or all under PHICHAT_HOME."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from phichat import paths
from phichat.config import user_config_path
from phichat.llama_engine import log_path
from phichat.store import Store, default_path

if TYPE_CHECKING:
    from conftest import CliRun


def test_phichat_home_holds_every_folder(isolated_dirs: Path) -> None:
    assert os.environ["PHICHAT_HOME"] == str(isolated_dirs)
    assert user_config_path() == isolated_dirs / "config" / "config.toml"
    assert default_path() == isolated_dirs / "data" / "history.db"
    assert log_path() == isolated_dirs / "state" / "llama.log"
    assert paths.cache_dir() == isolated_dirs / "cache"


def test_a_relative_phichat_home_is_taken_from_where_phichat_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHICHAT_HOME", "here")
    assert paths.data_dir() == tmp_path / "here" / "data"


def test_without_phichat_home_the_platform_folders_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import platformdirs

    for name in ("CONFIG", "DATA", "STATE", "CACHE"):
        monkeypatch.setenv(f"XDG_{name}_HOME", str(tmp_path / name.lower()))
    for unset in (None, ""):
        if unset is None:
            monkeypatch.delenv("PHICHAT_HOME")
        else:
            monkeypatch.setenv("PHICHAT_HOME", unset)
        assert paths.config_dir() == platformdirs.user_config_path("phichat")
        assert paths.data_dir() == platformdirs.user_data_path("phichat")
        assert paths.state_dir() == platformdirs.user_state_path("phichat")
        assert paths.cache_dir() == platformdirs.user_cache_path("phichat")


def test_the_cli_reads_the_history_and_config_under_phichat_home(
    phichat_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    with Store.open(mine / "data" / "history.db") as store:
        kept = store.create_conversation(title="Kept under mine")
        store.add_message(kept.id, "user", "Where is this kept?")

    monkeypatch.setenv("PHICHAT_HOME", str(mine))
    listed = phichat_cli("history", "--json")
    assert [json.loads(line)["title"] for line in listed.stdout.splitlines()] == ["Kept under mine"]
    (mine / "config").mkdir()
    (mine / "config" / "config.toml").write_text("[sampling]\ntop_p = 7\n")
    refused = phichat_cli("history", "--json")
    assert refused.returncode == 2
    assert str(mine / "config" / "config.toml") in refused.stderr and "top_p" in refused.stderr

    monkeypatch.setenv("PHICHAT_HOME", str(other))
    assert phichat_cli("history", "--json").stdout == ""
