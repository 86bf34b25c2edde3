"""Hostile input, round two (issue 22): what used to end in an internal error or be quietly
taken is now one `phichat: error:` line and the exit code the README names."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_refused, run

from phichat.store import Store, default_path


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-tokens", "1_000", "--prompt", "hi"], "--max-tokens must be an integer"),
        (["--seed", "\u0663", "--prompt", "hi"], "--seed must be an integer"),  # Arabic-Indic 3
        (["--ctx", " 4096 ", "--prompt", "hi"], "--ctx must be an integer"),
        (["--temperature", "0_5", "--prompt", "hi"], "--temperature must be a number"),
        (["--top-p", "\u0660.5", "--prompt", "hi"], "--top-p must be a number"),
        (["show", "1_0"], "ID must be an integer"),
        (["search", "x", "-k", "\u0665"], "-k must be an integer"),
    ],
)
def test_numbers_are_ascii_digits_only(
    capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    assert_refused(run(capsys, *args), fragment)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[store]\npath = ""\n', "store.path: must not be empty"),  # meant the default
        ('[embedder]\npath = ""\n', "embedder.path: must not be empty"),
        ('[store]\npath = "~nosuchuser/h.db"\n', "store.path: '~nosuchuser/h.db': no home"),
        ('[models.x]\npath = "~nosuchuser/m.gguf"\n', "models.x.path: '~nosuchuser/m.gguf'"),
        ("a = " + "[" * 100_000 + "1" + "]" * 100_000 + "\n", "nested too deeply"),
        ("a = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n", "nested too deeply"),
    ],
)
def test_bad_config_files_are_one_line_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, fragment: str
) -> None:
    config = tmp_path / "mine.toml"
    config.write_text(text)
    line = assert_refused(run(capsys, "--config", str(config), "history"), fragment)
    assert line.startswith(f"phichat: error: {config}: ")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model-file", "~nosuchuser/m.gguf", "--prompt", "hi"], "--model-file: '~nosuchuser"),
        (["search", "x", "--embedder-dir", "~nosuchuser/e"], "--embedder-dir: '~nosuchuser/e'"),
        (["--config", "~nosuchuser/c.toml", "history"], "~nosuchuser/c.toml: config file not"),
    ],
)
def test_paths_under_an_unknown_home_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    assert_refused(run(capsys, *args), fragment)


@pytest.mark.parametrize(
    "damage",
    [
        "sampling = '{'",
        "sampling = '[1, 2]'",
        "recalled = 'x'",
        "recalled = '{\"a\": 1}'",
        "recalled = '[1, \"two\"]'",
        "recalled = '" + "[" * 100_000 + "'",
    ],
)
def test_a_damaged_json_cell_reads_as_absent(
    capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """The message itself is intact: show and export print it, without the damaged detail."""
    with Store.open(default_path()) as store:
        chat = store.create_conversation(title="fruit")
        asked = store.add_message(chat.id, "user", "Name a fruit")
        store.add_message(chat.id, "user", "And another", recalled=[asked.id])
        store.add_message(chat.id, "assistant", "Apple", sampling={"seed": 1})
    with sqlite3.connect(default_path()) as db:
        db.execute(f"UPDATE messages SET {damage}")
    db.close()

    code, out, err = run(capsys, "show", str(chat.id))
    assert (code, err) == (0, "") and "Apple" in out and "Name a fruit" in out
    code, out, err = run(capsys, "export", str(chat.id), "--format", "json")
    assert (code, err) == (0, "")
    messages = json.loads(out)["messages"]
    assert [m["content"] for m in messages] == ["Name a fruit", "And another", "Apple"]
    if damage.startswith("sampling"):
        assert all(m.get("sampling") is None for m in messages)
    with Store.open(default_path()) as store:
        recalled = [m.recalled for m in store.messages(chat.id)]
    assert recalled == ([(), (asked.id,), ()] if damage.startswith("sampling") else [(), (), ()])


@pytest.mark.slow
@pytest.mark.parametrize("args", [["history"], ["history", "--json"], ["export", "1"]])
def test_a_closed_stdout_is_one_line(args: list[str]) -> None:
    """`phichat history >&-`: Python starts with sys.stdout None."""
    with Store.open(default_path()) as store:
        chat = store.create_conversation(title="one")
        store.add_message(chat.id, "user", "hello")
    closed = 'exec "$0" -m phichat "$@" >&-'
    done = subprocess.run(
        ["sh", "-c", closed, sys.executable, *args], capture_output=True, timeout=60
    )
    assert (done.returncode, done.stderr.decode()) == (
        1,
        "phichat: error: cannot write to stdout: it is closed\n",
    )


@pytest.mark.slow
def test_a_closed_stdout_with_nothing_to_write_is_quiet() -> None:
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" -m phichat history >&-', sys.executable],
        capture_output=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, b"")
