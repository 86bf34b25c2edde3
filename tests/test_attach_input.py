"""What the prompt box can attach besides `/file`: Tab completion of the paths after `/file`
and `@`, `!COMMAND` (what a shell command prints, capped in bytes and time), a long paste; and
the bad input of issue 19 that attaching meets (one line each, the rest goes on). Real files,
real processes."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import wait_until

from phichat.command_output import command_name, command_output
from phichat.errors import PhichatError
from phichat.files import read_attachments, read_text_file
from phichat.tui.attach import PASTED, Chip, command_request, pasted, preview, screenful
from phichat.tui.completion import Completion, complete_path


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder to complete in (the current one): notes.md, notebook/, nothing.txt,
    'my file.txt', .hidden, src/app.py, and a home with docs/ in it."""
    (tmp_path / "notes.md").write_text("n\n")
    (tmp_path / "notebook").mkdir()
    (tmp_path / "nothing.txt").write_text("")
    (tmp_path / "my file.txt").write_text("m\n")
    (tmp_path / ".hidden").write_text("h\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app.py").write_text("x = 1\n")
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def completed(before: str) -> str:
    """The text before the cursor after one Tab."""
    found = complete_path(before)
    assert found is not None, before
    return before[: found.start] + found.word


def test_tab_completes_paths_after_file_and_at(tree: Path) -> None:
    assert completed("/file no") == "/file not"  # notes.md, notebook/, nothing.txt agree on "not"
    assert completed("/file note") == "/file note"  # notes.md and notebook/: nothing to add
    assert complete_path("/file note") == Completion(11 - 5, "note", ["notebook/", "notes.md"])
    assert completed("/file notes") == "/file notes.md "  # a file: its name ends, a space after
    assert completed("/file noteb") == "/file notebook/"  # a folder: a slash, no space
    assert completed("/file notes.md sr") == "/file notes.md src/"  # any name after /file
    assert completed("/file src/a") == "/file src/app.py "
    assert completed("/file my") == "/file 'my file.txt' "  # quoted, as /file reads it
    assert completed("/file 'my f") == "/file 'my file.txt' "
    assert completed("/file .h") == "/file .hidden "  # hidden names only when asked for
    assert ".hidden" not in complete_path("/file ").choices  # type: ignore[union-attr]
    assert completed("what does @src/a") == "what does @src/app.py "
    assert completed("what is @my") == "what is @my"  # a name with a space cannot follow @
    assert completed("@~") == "@~/"
    assert completed("/file ~/d") == "/file ~/docs/"  # ~ expanded to look, kept as typed
    assert completed("/file zzz") == "/file zzz"  # nothing matches: unchanged, no choices
    assert complete_path("/file zzz").choices == []  # type: ignore[union-attr]
    assert completed("/file nosuchdir/x") == "/file nosuchdir/x"


def test_tab_is_no_completion_where_no_path_is_typed(tree: Path) -> None:
    assert complete_path("hello wor") is None
    assert complete_path("/files no") is None
    assert complete_path("mail me@exam") is None  # an @ inside a word is no path
    assert complete_path("/file src/*.p") is None  # a glob is left as it is
    assert complete_path("say /file no") is None  # /file starts the message or is text


def test_a_shell_command_is_a_message_of_one_line_starting_with_a_bang() -> None:
    assert command_request("!git diff --stat") == "git diff --stat"
    assert command_request("  !ls -l  ") == "ls -l"
    assert command_request("! wow") is None
    assert command_request("!!! important") is None
    assert command_request("!ls\nand explain") is None
    assert command_request("explain !ls") is None
    assert command_name("printf '%s\\n' a  b" + " x" * 40).startswith("!printf '%s\\n' a b x")
    assert len(command_name("x " * 100)) <= 49


def test_a_paste_is_named_with_its_lines_and_previewed() -> None:
    text = "\n".join(f"line {i} \x1b[31m" for i in range(40)) + "\n"
    file = pasted(text)
    assert (file.name, file.text) == (PASTED, text)
    assert pasted(text).key == file.key != pasted(text + "x").key
    assert Chip._label(file, 1234).plain == "pasted text, 40 lines · 1,234 tokens ✕"
    odd = replace(file, name="[/b]\x1b[2J[bold]odd.txt")  # shown as it is, never as markup
    assert Chip._label(odd, None).plain == "[/b]\\x1b[2J[bold]odd.txt ✕"
    shown = preview(text)
    assert shown.startswith("line 0 \\x1b[31m\nline 1") and shown.endswith("… and 29 more lines")
    assert "\x1b" not in shown
    with pytest.raises(PhichatError, match=r"^pasted text: is a binary file, not text$"):
        pasted("a\0b")
    with pytest.raises(PhichatError, match=r"^pasted text: is over the 4 MiB cap"):
        pasted("x" * (4 << 20) + "y")


def test_more_than_a_screenful_is_a_paste_to_attach() -> None:
    assert not screenful("a\n" * 23, 80, 24)
    assert screenful("a\n" * 24, 80, 24)  # 24 lines and the cursor's: more than 24 rows
    assert not screenful("x" * 80 * 24, 80, 24)
    assert screenful("x" * (80 * 24 + 1), 80, 24)  # one endless line, wrapped


def run(command: str, **caps: float) -> tuple[str | None, list[str]]:
    said: list[PhichatError] = []
    output = command_output(command, said.append, **caps)  # type: ignore[arg-type]
    return (output.text if output else None), [str(exc) for exc in said]


def test_a_command_attaches_what_it_prints() -> None:
    text, said = run("printf 'one\\ntwo\\n'; echo noise >&2")
    assert (text, said) == ("one\ntwo\n", [])
    output = command_output("echo hi", lambda exc: None)
    assert output is not None and output.name == "!echo hi" and output.key.startswith("!echo hi#")


def test_a_command_that_fails_is_one_line_with_its_status_and_first_error_line() -> None:
    failing = "echo partial; echo 'first problem' >&2; echo second >&2; exit 3"
    text, said = run(failing)
    assert text == "partial\n"  # what it printed is kept (a failing diff still shows)
    assert said == [f"{command_name(failing)}: exited with status 3: first problem"]
    assert run("kill -9 $$") == (None, ["!kill -9 $$: killed by signal 9"])
    assert run("true") == (None, ["!true: printed nothing"])
    assert run("cat") == (None, ["!cat: printed nothing"])  # stdin is empty, not the terminal
    assert run("printf 'a\\0b'") == (None, ["!printf 'a\\0b': is a binary file, not text"])
    assert run("printf '\\377\\376'") == (None, ["!printf '\\377\\376': is not valid UTF-8 text"])
    assert run("   ") == (None, ["!: no command to run"])


def test_a_command_has_no_terminal_to_reach() -> None:
    text, said = run("echo leak > /dev/tty")
    assert text is None and len(said) == 1
    assert said[0].startswith("!echo leak > /dev/tty: exited with status")


def test_a_command_that_prints_too_much_is_cut_at_a_line_and_killed() -> None:
    text, said = run("yes 'a line'", max_bytes=10_000)
    assert said == ["!yes 'a line': printed over 10,000 bytes: the rest refused"]
    assert text is not None and len(text) <= 10_000 and text.endswith("a line\n")
    assert set(text.splitlines()) == {"a line"}


def test_a_command_that_runs_too_long_is_stopped_with_all_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    slow = f"echo started; sleep 60 & echo $! > {pid_file}; wait"
    text, said = run(slow, timeout_s=0.5)
    assert text == "started\n"
    assert said == [f"{command_name(slow)}: still running after 0.5 s: stopped"]
    sleeper = int(pid_file.read_text())

    def gone() -> bool:  # killed: no such process, or a zombie not reaped yet
        stat = Path(f"/proc/{sleeper}/stat")
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"
        except FileNotFoundError:
            return True
        except OSError:  # no /proc: ask the process table
            try:
                os.kill(sleeper, 0)
            except ProcessLookupError:
                return True
            return False

    wait_until(gone, "the command's child killed", timeout=10)


def test_a_cancelled_command_is_killed_and_attaches_nothing() -> None:
    said: list[PhichatError] = []
    assert command_output("sleep 60", said.append, cancel=lambda: True) is None
    assert said == []


def test_bad_attachments_not_met_elsewhere_are_one_line_each(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine\n")
    said: list[PhichatError] = []
    names = [str(tmp_path / "latin1.txt"), "/dev/null", str(tmp_path / "ok.txt")]
    files = read_attachments(names, said.append)
    assert [f.text for f in files] == ["fine\n"]
    assert [str(exc) for exc in said] == [
        f"{tmp_path / 'latin1.txt'}: is not valid UTF-8 text",
        "/dev/null: is not a regular file (a FIFO, socket or device)",
    ]


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="Linux's /proc")
def test_a_file_that_cannot_be_read_even_by_root_is_one_line() -> None:
    with pytest.raises(PhichatError, match=r"^/proc/self/mem: cannot read it: ") as caught:
        read_text_file(Path("/proc/self/mem"))  # a regular file whose read fails (EIO)
    assert caught.value.exit_code == 1


def test_a_glob_round_a_directory_loop_takes_each_file_once(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("a\n")
    (docs / "sub" / "b.txt").write_text("b\n")
    (docs / "sub" / "loop").symlink_to(docs)
    said: list[PhichatError] = []
    files = read_attachments([f"{docs}/**/*.txt"], said.append)
    assert sorted(f.text for f in files) == ["a\n", "b\n"]
    assert [str(exc) for exc in said] == [
        f"{docs}/**/*.txt: goes round a directory loop (a symlink back up): each file once"
    ]
    (docs / "sub" / "loop").unlink()
    (tmp_path / "elsewhere").symlink_to(docs / "sub")  # reached twice, but no loop: no line
    said.clear()
    files = read_attachments([f"{tmp_path}/**/b.txt"], said.append)
    assert [f.text for f in files] == ["b\n"] and said == []


@pytest.mark.slow
def test_a_glob_over_100000_files_is_one_line(tmp_path: Path) -> None:
    for i in range(100_000):
        os.close(os.open(tmp_path / f"{i}.txt", os.O_CREAT | os.O_WRONLY))
    said: list[PhichatError] = []
    assert read_attachments([f"{tmp_path}/*.txt", f"{tmp_path}/7.txt"], said.append)
    assert [str(exc) for exc in said] == [f"{tmp_path}/*.txt: matches more than 1,000 files"]
