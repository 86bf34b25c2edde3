"""Hostile input and signals, class by class (issue 13): values that used to reach llama.cpp
unchecked, bounds that depend on the model and the machine, prompt text, stdout that fails, and
SIGINT/SIGTERM/SIGHUP at any moment; then a property-based test that throws arbitrary values at
every flag and config key of the schema.

In-process through `cli.main` where the case allows; subprocesses for signals and pipes. Signal
tests check the history database, not just the exit code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import Field
from pathlib import Path
from typing import Any

import pytest
from helpers import Tmux, assert_refused, run, wait_until
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from phichat import preflight
from phichat.config import (
    MAX_CTX,
    SECTIONS,
    THREADS_PER_CORE,
    EngineSettings,
    schema,
    spec_of,
    usable_cores,
    value_type,
)
from phichat.errors import PhichatError
from phichat.llama_engine import _load_error
from phichat.store import Store, default_path

ROOT = Path(__file__).resolve().parent.parent
PHI3_VOCAB = ROOT / ".cache" / "ggml-vocab-phi-3.gguf"
LONG_PROMPT = "Write a long story about a lighthouse keeper."
TIMEOUT_S = 60.0
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def saved() -> list[tuple[str, str, str]]:
    """(role, status, content) of every message in the history database, oldest first."""
    path = default_path()
    if not path.exists():
        return []
    with Store.open(path) as store:
        return [
            (m.role, m.status, m.content)
            for c in reversed(store.conversations())
            for m in store.messages(c.id)
        ]


def config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hostile.toml"
    path.write_text(text)
    return str(path)


# --- values that reached llama.cpp unchecked: now one line and exit 2 ------------------------


@pytest.mark.parametrize(
    ("flags", "config", "fragment"),
    [
        (["--ctx", "4294967312"], "", "--ctx must be >= 16 and <= 1048576"),  # was GGML_ASSERT
        (["--ctx", "4294967296"], "", "--ctx must be"),  # ran with n_ctx 8192
        (["--ctx", "99999999999"], "", "--ctx must be"),  # blamed the model file
        ([], "[engine]\nthreads = 65535\n", "engine.threads must be >= 0 and <= 256"),  # SIGSEGV
        ([], "[engine]\nthreads = -5\n", "engine.threads must be >= 0"),  # meant all cores
        ([], "[engine]\nthreads = 4096\n", "engine.threads must be"),  # never answered
        ([], "[engine]\nbatch = -1\n", "engine.batch must be >= 1"),  # error, then SIGSEGV
        ([], "[engine]\nbatch = 0\n", "engine.batch must be >= 1"),  # blamed the model file
        ([], "[engine]\nn_gpu_layers = 4294967296\n", "engine.n_gpu_layers must be"),
        (["--repeat-last-n", "2147483648"], "", "--repeat-last-n must be"),  # wrapped to 0
        (["--repeat-last-n", "4294967295"], "", "--repeat-last-n must be"),
        (["--seed", "4294967296"], "", "--seed must be >= 0 and <= 4294967295"),
        (["--seed", "-1"], "", "--seed must be >= 0"),
        (["--max-tokens", "9" * 5000], "", "--max-tokens must be an integer, not '999"),
        (["--temperature", "inf"], "", "--temperature must be a finite number"),
        (["--temperature", "nan"], "", "--temperature must be a finite number"),
        (["--top-p", "1e400"], "", "--top-p must be a finite number"),
        ([], "[sampling]\nrepeat_penalty = -inf\n", "sampling.repeat_penalty must be a finite"),
        ([], "[sampling]\ntemperature = inf\n", "sampling.temperature must be a finite number"),
        (  # llama.cpp refused the context, blamed on its size
            [],
            '[engine]\nkv_type = "q8_0"\nflash_attn = false\n',
            'engine.kv_type = "q8_0" needs engine.flash_attn = true',
        ),
    ],
)
def test_out_of_range_values_never_reach_llama_cpp(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    flags: list[str],
    config: str,
    fragment: str,
) -> None:
    args = ["--config", config_file(tmp_path, config)] if config else []
    result = run(capsys, *args, *flags, "--prompt", "hi", "--no-history")
    line = assert_refused(result, fragment)
    assert "truncated" not in line


@pytest.mark.slow
def test_threads_are_bounded_by_the_machine(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_phi3_path: Path
) -> None:
    cores = usable_cores()
    bound = THREADS_PER_CORE * cores
    config = config_file(tmp_path, f"[engine]\nthreads = {bound + 1}\n")
    line = assert_refused(run(capsys, "--config", config, "--prompt", "hi"), f"<= {bound}")
    assert f"{cores} usable cores" in line
    config = config_file(tmp_path, f"[engine]\nthreads = {bound}\n")
    assert run(capsys, "--config", config, "--prompt", "hi", "--no-history")[:2] == (
        0,
        "Hello world\n",
    )


@pytest.mark.slow  # a model loaded and run for each case
@pytest.mark.parametrize(
    ("flags", "config"),
    [
        (["--ctx", "16", "--repeat-last-n", "16", "--max-tokens", "1"], ""),
        (["--ctx", "64", "--repeat-last-n", "-1"], "[engine]\nbatch = 1\n"),
        (["--ctx", "64", "--repeat-last-n", "0"], f"[engine]\nbatch = {MAX_CTX}\n"),
        (["--seed", "0"], "[engine]\nthreads = 1\nn_gpu_layers = 1024\n"),
        (["--seed", "4294967295", "--top-p", "1e-300", "--temperature", "100"], ""),
        (["--repeat-penalty", "100", "--max-tokens", "1"], "[engine]\nflash_attn = false\n"),
    ],
)
def test_edge_values_run_without_a_native_crash(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_phi3_path: Path,
    flags: list[str],
    config: str,
) -> None:
    args = ["--config", config_file(tmp_path, config)] if config else []
    code, _, err = run(capsys, *args, *flags, "--prompt", "hi", "--no-history")
    if code == 2:  # a 16-token window is too small for Phi-3's prompt: said so
        assert "context" in err and len(err.strip().splitlines()) == 1, err
    else:
        assert (code, err) == (0, ""), err


# --- bounds from the model and the machine ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_the_kv_estimate_is_what_llama_cpp_allocates(
    smollm_path: Path, tmp_path: Path, kv_type: str
) -> None:
    config = config_file(tmp_path, f'[engine]\nkv_type = "{kv_type}"\nflash_attn = true\n')
    args = ["--config", config, "--model-file", str(smollm_path), "--ctx", "1000"]
    args += ["--max-tokens", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "phichat", *args, "--verbose", "--prompt", "hi", "--no-history"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("llama_kv_cache: size =")]
    mib = float(line.split("=")[1].split("MiB")[0])
    shape = preflight.read_shape(smollm_path)
    assert shape is not None
    # 1024 cells (llama.cpp pads to 256) x 30 layers
    assert shape.kv_bytes(1000, kv_type=kv_type) == pytest.approx(
        mib * 2**20, rel=1e-3
    )  # MiB to 2 places


def test_phi3_mini_needs_1_5_gib_of_kv_cache_for_4096_tokens() -> None:
    if not PHI3_VOCAB.is_file():
        pytest.skip(f"{PHI3_VOCAB} is missing: run .ci/run")
    shape = preflight.read_shape(PHI3_VOCAB)  # llama.cpp's Phi-3 vocab file has its real sizes
    assert shape is not None
    assert (shape.architecture, shape.n_layer, shape.n_ctx_train) == ("phi3", 32, 4096)
    assert shape.kv_bytes(4096) == 1.5 * 2**30
    # No machine has the 384 GiB that --ctx 1048576 would take: refused before any allocation.
    with pytest.raises(PhichatError, match=r"--ctx 1048576 needs 384.0 GiB .* is available"):
        preflight.check_memory(shape, 2_400_000_000, "cpu", EngineSettings(n_ctx=MAX_CTX))


def test_a_context_too_big_for_memory_is_refused_before_allocating(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smollm_path: Path
) -> None:
    monkeypatch.setattr(preflight, "available_memory", lambda: 2 * 2**30)
    started = time.perf_counter()
    line = assert_refused(
        run(capsys, "--model-file", str(smollm_path), "--ctx", "1000000", "--prompt", "hi"),
        "--ctx 1000000 needs 21.5 GiB of memory for its KV cache besides 0.1 GiB for the model",
    )
    assert "but 2.0 GiB is available (at most about --ctx 88832 fits)" in line
    assert time.perf_counter() - started < 5  # it was 85 s and 21.7 GiB of allocation
    assert saved() == []


def test_the_memory_available_is_known_on_linux() -> None:
    if not Path("/proc/meminfo").exists():
        pytest.skip("not Linux")
    available = preflight.available_memory()
    assert available is not None
    assert 0 < available <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_a_context_above_the_training_length_is_a_warning(
    capsys: pytest.CaptureFixture[str], tiny_phi3_path: Path
) -> None:
    code, out, err = run(capsys, "--ctx", "4352", "--prompt", "hi", "--no-history")
    assert (code, out) == (0, "Hello world\n"), err
    assert err.splitlines() == [
        "phichat: warning: --ctx 4352 is above the 4096 tokens Phi-3-mini-4k-instruct-q4.gguf was "
        "trained on; its answers may lose track past 4096"
    ]


def test_only_a_model_that_fails_to_parse_is_blamed_on_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, smollm_path: Path
) -> None:
    data = smollm_path.read_bytes()
    header_cut = tmp_path / "header-cut.gguf"
    header_cut.write_bytes(data[:100_000])  # inside the vocabulary
    assert_refused(
        run(capsys, "--model-file", str(header_cut), "--prompt", "hi"),
        "its GGUF header does not parse",
        code=1,
    )
    tensors_cut = tmp_path / "tensors-cut.gguf"
    tensors_cut.write_bytes(data[:5_000_000])  # the header is whole, the weights are not
    assert_refused(
        run(capsys, "--model-file", str(tensors_cut), "--prompt", "hi"),
        "llama.cpp could not load this model; the file may be truncated",
        code=1,
    )
    settings = EngineSettings(n_ctx=200_000, batch=200_000)
    context = _load_error(ValueError("Failed to create llama_context"), smollm_path, settings, 8)
    assert "could not set up a 200000-token context (batch 8" in str(context)
    assert "truncated" not in str(context)


@pytest.mark.slow
def test_a_context_llama_cpp_cannot_set_up_does_not_blame_the_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_phi3_path: Path
) -> None:
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("with overcommit_memory=1 any allocation succeeds")
    # The KV cache fits (512 MiB), but a batch this size asks for a 2 TB compute buffer.
    config = config_file(tmp_path, f"[engine]\nbatch = {MAX_CTX}\n")
    line = assert_refused(
        run(capsys, "--config", config, "--ctx", str(MAX_CTX), "--prompt", "hi"),
        f"llama.cpp could not set up a {MAX_CTX}-token context (batch {MAX_CTX}",
        code=1,
    )
    assert "truncated" not in line and "smaller --ctx or batch" in line


def test_special_files_are_not_models_or_configs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would wait forever for a writer
    assert_refused(run(capsys, "--model-file", str(fifo), "--prompt", "hi"), "not a regular file")
    assert_refused(
        run(capsys, "--config", "/dev/zero", "--prompt", "hi"), "/dev/zero: not a config file"
    )


# --- prompt text --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (["--prompt", "-"], b"\0\0\0\0", "the prompt is empty"),
        (["--prompt", "-"], b"\x00 \x01\x1b\t\r\n\x7f\xc2\x85", "the prompt is empty"),
        (["--prompt", "\x00\x00"], None, "must not contain NUL"),
        (["--prompt", "\u200b\u2060 \x0c"], None, "the prompt is empty"),
        (["--prompt", "-"], b"\xff\xfe hi", "stdin is not valid UTF-8 text"),
        (["--prompt", os.fsdecode(b"caf\xe9")], None, "--prompt is not valid UTF-8 text"),
        (["--prompt", "hi", "--system", os.fsdecode(b"\xff")], None, "--system is not valid UTF-8"),
        (["--prompt", "hi", "--system", " \x00 "], None, "--system must not contain NUL"),
        (["--prompt", "hi", "--system", "\t\x01 "], None, "--system is blank"),
        (["search", os.fsdecode(b"\xc3\x28")], None, "query is not valid UTF-8 text"),
        (["--prompt", "hi", "--model-file", os.fsdecode(b"\xff.gguf")], None, "not valid UTF-8"),
    ],
)
def test_prompt_text_with_nothing_to_read_or_not_utf8_is_refused(
    capsys: pytest.CaptureFixture[str], args: list[str], stdin: bytes | None, fragment: str
) -> None:
    assert_refused(run(capsys, *args, stdin=stdin), fragment)
    assert saved() == []


@pytest.mark.slow
def test_invalid_utf8_in_the_real_argv_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "phichat", "--prompt", b"\xff\xfe hi"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "phichat: error: --prompt is not valid UTF-8 text\n"


def test_text_around_nul_bytes_is_refused_as_in_an_argument(
    capsys: pytest.CaptureFixture[str], tiny_phi3_path: Path
) -> None:
    """NUL in a prompt on stdin is refused, as where text cannot hold one (issue 22)."""
    assert_refused(run(capsys, "--prompt", "-", stdin=b"hi\0there"), "stdin must not contain NUL")
    assert saved() == []


def test_endless_stdin_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    sys.stdin = open("/dev/zero", encoding="utf-8")  # noqa: SIM115 - run() puts stdin back
    try:
        assert_refused(run(capsys, "--prompt", "-"), "stdin holds more than 16 MiB")
    finally:
        sys.stdin.close()


def test_an_over_long_prompt_is_bad_input(
    capsys: pytest.CaptureFixture[str], tiny_phi3_path: Path
) -> None:
    result = run(capsys, "--ctx", "64", "--prompt", "word " * 200, "--no-history")
    assert_refused(result, "the message is 201 tokens, but the 64-token context")


# --- stdout that fails -------------------------------------------------------------------------


def phichat_process(*args: str, **popen: Any) -> subprocess.Popen[bytes]:
    """`phichat ARGS` as a child process; its pipes unbuffered on this side, so bytes read
    before communicate() are not lost in a buffer communicate() does not see."""
    return subprocess.Popen([sys.executable, "-m", "phichat", *args], bufsize=0, **popen)


def read_at_least(process: subprocess.Popen[bytes], size: int) -> bytes:
    """The first `size` bytes (or more) of the process's stdout."""
    assert process.stdout is not None
    data = b""
    while len(data) < size:
        chunk = process.stdout.read(size - len(data))
        assert chunk, f"stdout ended after {data!r}"
        data += chunk
    return data


@pytest.mark.slow
def test_an_answer_to_a_full_device_is_one_line_and_kept(tiny_phi3_path: Path) -> None:
    with open("/dev/full", "wb") as full:
        process = phichat_process("--prompt", "hi", stdout=full, stderr=subprocess.PIPE)
        _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 1
    assert err.decode() == "phichat: error: cannot write to stdout: No space left on device\n"
    # The answer is kept, as far as it went before the first failed write.
    assert [(role, status) for role, status, _ in saved()] == [
        ("user", "finished"),
        ("assistant", "stopped"),
    ]


@pytest.mark.slow
def test_history_to_a_full_device_is_one_line(tiny_phi3_path: Path) -> None:
    with Store.open(default_path()) as store:
        store.create_conversation(title="one")
    with open("/dev/full", "wb") as full:
        process = phichat_process("history", stdout=full, stderr=subprocess.PIPE)
        _, err = process.communicate(timeout=TIMEOUT_S)
    assert (process.returncode, err.decode()) == (
        1,
        "phichat: error: cannot write to stdout: No space left on device\n",
    )


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly_like_other_unix_tools(tiny_phi3_path: Path) -> None:
    with Store.open(default_path()) as store:
        for i in range(2000):  # ~130 kB of listing: more than a pipe holds
            store.create_conversation(title=f"conversation number {i} about nothing much")
    process = phichat_process("history", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline()  # `phichat history | head -1`
    process.stdout.close()
    assert process.wait(timeout=TIMEOUT_S) == 141
    assert process.stderr.read() == b""


@pytest.mark.slow
def test_a_closed_pipe_mid_answer_keeps_the_answer(tiny_phi3_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read the answer
    process = phichat_process("--prompt", "hi", stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    _, err = process.communicate(timeout=TIMEOUT_S)
    assert (process.returncode, err) == (141, b"")
    assert [(role, status) for role, status, _ in saved()] == [
        ("user", "finished"),
        ("assistant", "stopped"),
    ]


# --- signals -----------------------------------------------------------------------------------


def handles_stop_signals(pid: int) -> bool:
    """Whether phichat's first line has run: the process catches SIGTERM (Python itself only
    catches SIGINT), read from /proc/PID/status."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True  # already gone: the test's assertions say how
    [caught] = [line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def answer_process(smollm_config: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A one-shot answer from SmolLM2 that runs for many seconds unless stopped."""
    return phichat_process(
        "--config",
        str(smollm_config),
        "--prompt",
        LONG_PROMPT,
        "--max-tokens",
        "2000",
        "--temperature",
        "0",
        "--repeat-penalty",
        "1.3",
        *extra,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


@pytest.mark.slow
@needs_proc
@pytest.mark.parametrize("signum", list(EXIT))
def test_a_stop_signal_during_imports_exits_quietly(smollm_config: Path, signum: int) -> None:
    process = answer_process(smollm_config)
    wait_until(lambda: handles_stop_signals(process.pid), "phichat's first line", every=0.002)
    process.send_signal(signum)
    assert_stopped_early(process, signum)


def assert_stopped_early(process: subprocess.Popen[bytes], signum: int) -> None:
    """The exit code of the signal, nothing on stderr, and no answer: either nothing saved (it
    came before the question was), or the question and an empty answer marked stopped (on a
    busy machine, it came while the prompt was read)."""
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert (process.returncode, out.strip(), err) == (EXIT[signum], b"", b"")
    assert saved() in ([], [("user", "finished", LONG_PROMPT), ("assistant", "stopped", "")])


@pytest.mark.slow
@needs_proc
def test_sigint_in_the_first_moments_never_prints_a_traceback(smollm_config: Path) -> None:
    """From phichat's first line on, every few milliseconds into imports, model load and the
    prompt: exit 130, nothing on stderr (before that line the interpreter is still starting)."""
    for delay_ms in (0, 5, 10, 20, 40, 80, 160, 320):
        process = answer_process(smollm_config, "--no-history")
        wait_until(
            lambda p=process: handles_stop_signals(p.pid), "phichat's first line", every=0.002
        )
        time.sleep(delay_ms / 1000)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=TIMEOUT_S)
        assert (delay_ms, process.returncode, err) == (delay_ms, 130, b"")


@pytest.mark.slow
def test_sigint_while_the_model_loads_is_not_swallowed(smollm_config: Path) -> None:
    from phichat.llama_engine import log_path

    log = log_path()
    process = answer_process(smollm_config)
    wait_until(
        lambda: log.exists() and "llama_model_load" in log.read_text(),
        "the model load",
        every=0.002,
    )
    process.send_signal(signal.SIGINT)  # lands in llama.cpp's log callback, mid-load
    assert_stopped_early(process, signal.SIGINT)  # it used to be swallowed: a whole answer


@pytest.mark.slow
@pytest.mark.parametrize("signum", list(EXIT))
def test_a_stop_signal_mid_answer_saves_what_was_streamed(smollm_config: Path, signum: int) -> None:
    process = answer_process(smollm_config)
    first = read_at_least(process, 40)
    process.send_signal(signum)
    rest, err = process.communicate(timeout=TIMEOUT_S)
    assert (process.returncode, err) == (EXIT[signum], b"")
    streamed = (first + rest).decode()
    [user, answer] = saved()
    assert user == ("user", "finished", LONG_PROMPT)
    assert answer[:2] == ("assistant", "stopped")
    assert len(answer[2]) >= 40 and streamed.rstrip("\n") == answer[2]


# --- the app: signals and a terminal that goes away --------------------------------------------


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    server = Tmux(tmp_path / "tmux.sock")
    try:
        yield server
    finally:
        server.kill()


def answer_in_the_app(tmux: Tmux, smollm_config: Path, done: Path) -> None:
    """Start the app under `sh` (which writes its exit code to `done`) and a long answer."""
    exe = Path(sys.executable).parent / "phichat"
    flags = f"--config {smollm_config} --max-tokens 2000 --temperature 0 --repeat-penalty 1.3"
    tmux.start(["sh", "-c", f"{exe} {flags}; echo $? > {done}"])
    tmux.wait(lambda screen: "· ready" in screen, "the app to be ready")
    tmux.keys("-l", LONG_PROMPT)
    tmux.keys("Enter")
    wait_until(lambda: len(saved()) == 1, "the question saved")
    # SmolLM2's greedy answer is streaming
    tmux.wait(lambda screen: "Once upon a time" in screen, "the answer on screen")


def app_pid() -> int:
    exe = str(Path(sys.executable).parent / "phichat")
    found = subprocess.run(["pgrep", "-f", f"python.* {exe} --config"], capture_output=True)
    return int(found.stdout.split()[0])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_the_app_stops_saves_and_exits_on_a_signal(
    tmux: Tmux, smollm_config: Path, tmp_path: Path, signum: int
) -> None:
    done = tmp_path / "exit-code"
    answer_in_the_app(tmux, smollm_config, done)
    os.kill(app_pid(), signum)
    wait_until(done.exists, "the app to exit")
    wait_until(lambda: done.read_text().strip(), "the exit code")
    assert done.read_text().strip() == str(EXIT[signum])
    [user, answer] = saved()
    assert user[:2] == ("user", "finished")
    assert answer[:2] == ("assistant", "stopped") and answer[2]


@pytest.mark.slow
def test_the_app_killed_with_its_terminal_saves_the_answer(
    tmux: Tmux, smollm_config: Path, tmp_path: Path
) -> None:
    answer_in_the_app(tmux, smollm_config, tmp_path / "exit-code")
    pid = app_pid()
    # SIGHUP to the pane's processes; the terminal is gone
    subprocess.run([*tmux.base, "kill-session"], capture_output=True)

    def ended() -> bool:
        status = Path(f"/proc/{pid}/status")
        return not status.exists() or "State:\tZ" in status.read_text()

    wait_until(ended, "the app to exit")
    [user, answer] = saved()
    assert user[:2] == ("user", "finished")
    assert answer[:2] == ("assistant", "stopped") and answer[2]


# --- no bare internal errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["show", str(10**23)], "ID must be between 1 and"),
        (["export", "-5"], "ID must be"),
        (["search", "x", "-k", str(10**23)], "-k must be between 1 and 10000"),
        (["--continue", str(10**23), "--prompt", "hi"], "--continue must be between"),
    ],
)
def test_huge_ids_are_refused(
    capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    assert_refused(run(capsys, *args), fragment)


# --- anything at all, at every flag and config key ----------------------------------------------

SETTINGS = list(schema())
HOSTILE_TEXT = ["\udcff", "a\udc80b", "\0", "a\0b", " \t", "\x1b\x7f", "\u200b", "-x", "", "\n"]
PATHS = {("model", "path"), ("embedder", "path"), ("store", "path")}


def toml_literal(value: object) -> str:
    """`value` as TOML source (strings as basic strings, escapes included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(
            value
        )  # \uXXXX escapes: a lone surrogate is invalid TOML, as it should be
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return str(value)


def numbers(kind: type, f: Field[Any]) -> st.SearchStrategy[Any]:
    """Numbers within the setting's bounds, around them and far beyond them."""
    spec = spec_of(f)
    edges = [b for b in (spec.low, spec.high, spec.above) if b is not None]
    near = [int(e) + d for e in edges for d in (-1, 0, 1)] + [2**31, 2**32 + 16, 2**63, 10**23]
    low = spec.low if spec.low is not None else spec.above
    if kind is int:
        inside = st.integers(min_value=low, max_value=spec.high)
        return st.one_of(inside, inside, st.sampled_from(near), st.integers())
    inside = st.floats(min_value=low, max_value=spec.high, exclude_min=spec.above is not None)
    anything = st.floats(allow_nan=True, allow_infinity=True)
    return st.one_of(inside, inside, st.sampled_from(near), anything, st.integers())


def paths(tmp: Path, section: str) -> st.SearchStrategy[str]:
    """Paths to hostile things, inside the test's own directory when anything could be written."""
    names = st.text(st.characters(blacklist_characters="/\0"), min_size=1, max_size=12)
    inside = names.map(lambda name: str(tmp / name))
    fixed = [str(tmp), str(tmp / "fifo"), str(tmp / "notes.txt"), str(tmp / "a" / "b" / "c.db")]
    if section != "store":  # read only: anything on the machine will do
        fixed += ["/", "/dev/zero", "/dev/null", "/etc/passwd", "/proc/self/mem", "."]
    return st.one_of(inside, st.sampled_from(fixed))


def values(tmp: Path, section: str, f: Field[Any]) -> st.SearchStrategy[Any]:
    kind = value_type(SECTIONS[section], f.name)
    text = st.one_of(st.text(max_size=30), st.sampled_from(HOSTILE_TEXT))
    wrong = st.one_of(st.booleans(), st.integers(), st.floats(), text, st.lists(st.integers()))
    if (section, f.name) in PATHS:
        return st.one_of(paths(tmp, section), wrong)
    own = st.booleans() if kind is bool else text if kind is str else numbers(kind, f)
    return st.one_of(own, own, wrong)


def hostile_run(data: st.DataObject, tmp: Path) -> tuple[list[str], str]:
    """One or two settings, each with an arbitrary value, as a flag or in a config file."""
    chosen = data.draw(st.lists(st.sampled_from(SETTINGS), min_size=1, max_size=2, unique_by=id))
    flags: list[str] = []
    tables: dict[str, list[str]] = {}
    for section, f in chosen:
        value = data.draw(values(tmp, section, f), label=f"{section}.{f.name}")
        flag = spec_of(f).flag
        if flag is not None and data.draw(st.booleans(), label="as a flag"):
            shown = toml_literal(value) if isinstance(value, (bool, list)) else str(value)
            flags += [flag, shown]
        else:
            tables.setdefault(section, []).append(f"{f.name} = {toml_literal(value)}")
    config = "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in tables.items())
    return flags, config


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the property test's paths point: a FIFO, a text file, room for databases."""
    tmp = tmp_path_factory.mktemp("hostile")
    os.mkfifo(tmp / "fifo")
    (tmp / "notes.txt").write_text("not a model, not a database\n")
    return tmp


@pytest.mark.slow
@settings(
    max_examples=int(os.environ.get("PHICHAT_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_value_at_any_flag_or_config_key(
    data: st.DataObject,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_phi3_path: Path,
    hostile_dir: Path,
) -> None:
    """Exit 0, 1, 2 or 130; at most three lines on stderr; no traceback, no internal error,
    no native crash (which would take pytest down with it).

    The tiny Phi-3 answers where the values pass; `--max-tokens 8` comes last so an answer stays
    short (the values before it are still checked). The machine is said to have 64 MiB free, so
    the memory check is reached, and a context that passes it stays small.
    """
    flags, config = hostile_run(data, hostile_dir)
    monkeypatch.setattr(preflight, "available_memory", lambda: 64 * 2**20)
    monkeypatch.chdir(hostile_dir)
    config_path = hostile_dir / "hostile.toml"
    config_path.write_bytes(config.encode("utf-8", "surrogateescape"))
    args = ["--config", str(config_path), *flags, "--prompt", "hi", "--max-tokens", "8"]
    code, _, err = run(capsys, *args)
    event(f"exit {code}")  # --hypothesis-show-statistics: how many runs got how far
    lines = err.strip().splitlines()
    assert code in (0, 1, 2, 130), (args, config, err)
    assert len(lines) <= 3, (args, config, err)
    assert "Traceback" not in err and "internal error" not in err, (args, config, err)
