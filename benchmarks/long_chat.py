"""Long conversations on the Phi-3-mini shape: how long a user waits for the prompt to be read.

On benchmarks/phi3_shape.py's model with phichat's cpu config (n_ctx 4096; --set changes it),
--threads threads, greedy, answers capped at --answer-tokens. Every scenario prints each answer's
first-token time (from the user's action to the first streamed text), prompt tokens, tokens
re-read (prompt - cached in llama.cpp's KV cache) and decode tokens/s, then ratios against a
baseline measured in the same run, as issue 9's targets state them:

overflow  one conversation of --turns turns of realistic user messages that overflows the window
          around turn 16, in the app's way: background embedder on (older turns are recalled),
          given the time to finish between turns that it has while the user types. Median first
          token of turns 20-40 against turns 2-10 (target <= 2x).
switch    two conversations of --conversation-tokens tokens, built in the store, visited in turn
          as the side pane does (ChatSession.switch, then send), --switch-rounds times back and
          forth. The first visit to each is the read from scratch (the baseline); every later
          switch back against it (target <= 0.1x). With --typed, a switch back's message is
          typed at --cps after the switch (its saved state loaded first, as the app does on a
          switch) and read ahead; its first token is timed from Enter.
continue  a conversation of --conversation-tokens tokens continued in new processes: `phichat
          --continue ID --prompt ... --stats` twice (the first finds nothing saved: it reads
          from scratch, the baseline), then the app reopened on it (headless, the real loader;
          opened from the side pane's list, then a message sent). First token against the
          baseline's (target <= 0.1x): for the CLI from process start (model load included),
          for the app from opening the conversation (its startup is the same for any).
decode    phichat's decode against raw llama.cpp (llama_decode loop, greedy, a second context on
          the same loaded model), then phichat's while the background embedder backfills
          --backfill messages, rounds alternating (targets >= 0.97x and >= 0.95x).
typing    after a short conversation, a 40-token message typed at 5 characters a second, and
          a --paste-tokens paste with a 20-token question typed after it, read ahead as the
          app does (ChatSession.read_ahead on the draft, on the engine's thread, not through
          Textual); first token from Enter against the same turn sent untyped, with the same
          history in the cache (targets <= 0.2x and <= 0.15x).
typing-overflow  the overflow conversation with every message typed at --cps characters a
          second, read ahead as the app does from the end of the last answer on (the empty
          draft first: where the next turn moves the cut, the window it keeps is read then).
          Slowest first token (from Enter) of turns 20-40 against the median of turns 2-10
          (target <= 2x). At 5 characters a second it takes hours: --cps 20 --turns 24 runs
          it short (less typing time to read in: a harder test).
paste-read  a --paste-tokens paste read three ways, in turn, --read-rounds times: ahead in
          calls of 64 tokens (the app's jobs before), ahead in one call (steps of n_batch),
          and cold as a prompt (a one-token answer); tokens/s of each against the cold read.

Every row also shows `others`: the CPU cores other processes kept busy meanwhile (/proc/stat).
On a shared 2-core machine llama.cpp's two threads stall whenever anything else runs, so a row
with others above ~0.2 is suspect; before each measurement the benchmark waits up to
--quiet-wait seconds for a quiet second.

    python benchmarks/long_chat.py [--only overflow,switch,continue,decode,typing,...] [--turns 40]
        [--answer-tokens 32] [--conversation-tokens 3000] [--switch-rounds 2]
        [--decode-tokens 64] [--decode-rounds 3] [--backfill 2000] [--paste-tokens 1500]
        [--cps 5] [--typed] [--read-rounds 2]
        [--threads 2] [--model PATH]
        [--quiet-wait 15] [--set SECTION.KEY=VALUE ...]

Default model: phi3_shape.py's q4_k_m file (written first if missing). History, config, logs
and any saved state go to a temporary directory, removed at the end; the Hub is not contacted.
Run it under the CPU lock. Reading a prompt dominates: ~55 tokens/s over a 3,300-token prompt
on 2 quiet cores, so a cold read of a 3,000-token conversation takes ~60 s and the full window
~80 s. The default run takes about 20 minutes (overflow 10, continue 2, switch 4, decode 4);
`--only` and `--turns 24` run it in parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import phi3_shape
from packaged import minilm_dir
from phi3_shape import Others

if TYPE_CHECKING:
    from phichat.config import Settings
    from phichat.llama_engine import LlamaEngine
    from phichat.session import ChatSession

HERE = Path(__file__).resolve().parent
SCENARIOS = ("overflow", "switch", "continue", "decode", "typing", "typing-overflow", "paste-read")
DECODE_PROMPT = "Write a long story about a lighthouse keeper and a storm."
APP_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); import long_chat; long_chat.app_child()"

# --- what users write ---------------------------------------------------------------------------

USER_SENTENCES = [
    "I'm planning a week in Lisbon in October and would like to avoid the worst of the crowds.",
    "My Python script reads a two gigabyte CSV file with pandas and runs out of memory.",
    "We adopted a rescue dog last month and she still barks at every bicycle that passes.",
    "Could you explain the difference between a Roth IRA and a traditional one in plain words?",
    "The sourdough starter I keep on the counter smells like nail polish remover this week.",
    "Our team is arguing about whether to split the monolith into services before the launch.",
    "I have to give a ten minute talk on climate adaptation to a room of city planners.",
    "The tomato plants on my balcony have yellow leaves at the bottom and small black spots.",
    "My daughter is nine and wants to learn to code, but she gets bored with block languages.",
    "When I run the tests in CI they pass, but on my laptop two of them fail with a timeout.",
    "I keep waking up at four in the morning and cannot fall asleep again for an hour or two.",
    "Please keep the answer short, I am reading this on my phone between two meetings.",
    "Last time you suggested a budget spreadsheet, but I never managed to keep it up to date.",
    "The landlord says the mould in the bathroom is our fault because we do not ventilate.",
    "I am learning Spanish with an app, and I can read quite well but I freeze when I speak.",
    "Our bakery wants to sell online, and we do not know how to ship bread without it going stale.",
    "What would you pack for three days of hiking in the Scottish Highlands in late spring?",
    "I wrote a cover letter for a data analyst job and it sounds stiff; can you loosen it up?",
    "The function returns the right result for small inputs but takes minutes for a million rows.",
    "My grandmother's recipe says a glass of flour, and I do not know how big her glass was.",
    "The electric bill doubled this winter even though we set the thermostat two degrees lower.",
    "Is it worth replacing the old laptop's hard disk with an SSD, or should I buy a new one?",
    "I'm torn between a used electric car and a small petrol hatchback for a forty minute commute.",
    "Explain it to me as if I had never heard of a hash table, then give me the real definition.",
    "The meeting notes from Tuesday say we agreed on the blue design, but nobody remembers that.",
    "Can you write me a polite email that declines the invitation without burning the bridge?",
    "I need a vegetarian dinner for eight people, two of whom do not eat gluten or nuts.",
    "The query is fast on staging and slow in production, with the same indexes on both.",
    "We want to paint the kitchen ourselves; how long should the primer dry before the topcoat?",
    "I have read that stretching before running does not prevent injuries; is that true?",
    "My novel's second act drags, and my writing group says the villain appears too late.",
    "Give me three options with their trade-offs, and tell me which one you would pick and why.",
]
ASSISTANT_SENTENCES = [
    "That is a common situation, and there are a few things worth checking before changing much.",
    "The short answer is yes, but the details depend on how often you need the result.",
    "First, measure where the time actually goes, because the obvious suspect is often innocent.",
    "A simple way to start is to write down what happened on each day for one week.",
    "Many people find that a smaller change they keep up beats a big plan they abandon.",
    "If the problem only shows on one machine, compare the versions and the environment first.",
    "Here is a plan in three steps, from the cheapest to try to the most involved.",
    "Keep in mind that the cheapest option today can cost more over five or ten years.",
    "You can test this safely on a small sample before you commit to the whole thing.",
    "The key idea is that each piece of data is stored where its key says it should be.",
    "Ventilation matters more than most people expect, especially after showers and cooking.",
    "A good rule of thumb is to leave twice as much time as the label suggests.",
    "Speaking practice is a separate skill from reading, so it needs its own routine.",
    "If you tell me more about the constraints, I can narrow these options down.",
    "Try to keep the first version boring and reliable, and optimise only what you measure.",
    "Children usually stay motivated when they build something they can show to friends.",
    "The trade-off is between flexibility now and the cost of coordination later.",
    "Write the email in three short paragraphs: thanks, the decision, and a door left open.",
    "Most recipes of that era assumed a glass of about two hundred millilitres.",
    "Check the query plan in both places; a different row count can change the plan entirely.",
    "Layering clothes works better than one warm jacket when the weather changes by the hour.",
    "A story's middle often drags when the protagonist reacts instead of making choices.",
    "In short: the first option is the safest, the second the cheapest, the third the fastest.",
    "Let me know how it goes, and we can adjust the plan once you have tried it for a week.",
]


def user_message(rng: random.Random) -> str:
    """A user message of 3 to 13 sentences (about 60 to 300 tokens)."""
    return " ".join(rng.sample(USER_SENTENCES, rng.randint(3, 13)))


def assistant_message(rng: random.Random) -> str:
    """A stored assistant answer of 4 to 10 sentences (about 80 to 200 tokens)."""
    return " ".join(rng.sample(ASSISTANT_SENTENCES, rng.randint(4, 10)))


@dataclass
class Turn:
    """One answer as the user saw it."""

    first_token_s: float
    prompt: int
    cached: int
    generated: int
    decode_tps: float
    recalled: int = 0
    dropped: int = 0
    others: float = 0.0  # CPU cores other processes kept busy meanwhile

    @property
    def reread(self) -> int:
        return self.prompt - self.cached


def wait_for_quiet(limit_s: float) -> None:
    """Wait, at most `limit_s`, for a second in which other processes use under 0.2 cores
    (the `others` column shows what remained while a figure was measured)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with Others() as others:
            time.sleep(1.0)
        if others.cores < 0.2:
            return


# --- phichat's API: everything this benchmark asks of phichat is in this section ---------------


SETTINGS_CHANGES: dict[str, dict[str, Any]] = {}  # --set: changes to the cpu config


def bench_settings(model: Path, threads: int, answer_tokens: int, store: Path) -> Settings:
    """phichat's cpu config (with --set's changes) and this run's model, threads, greedy
    answers and history file."""
    from phichat.config import load_settings

    overrides: dict[str, dict[str, Any]] = {
        "engine": {"threads": threads},
        "sampling": {"temperature": 0.0, "max_tokens": answer_tokens},
        "model": {"path": str(model)},
        "embedder": {"path": str(minilm_dir())},
        "store": {"path": str(store)},
    }
    for section, values in SETTINGS_CHANGES.items():
        overrides[section] = {**overrides.get(section, {}), **values}
    return load_settings("cpu", overrides=overrides)


def config_file(settings: Settings, path: Path) -> Path:
    """The same settings as a --config file for phichat in another process."""
    from dataclasses import asdict

    lines = []
    for section in ("model", "embedder", "store", "engine", "sampling", "chat"):
        lines.append(f"[{section}]")
        lines += [
            f"{key} = {json.dumps(value)}"
            for key, value in asdict(getattr(settings, section)).items()
            if value is not None and (section != "model" or key == "path")
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_change(text: str) -> tuple[str, str, Any]:
    """`section.key=value` (a TOML value) from --set."""
    import tomllib

    name, _, value = text.partition("=")
    section, _, key = name.strip().partition(".")
    if not value or not key:
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    try:
        return section, key, tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def load_engine(settings: Settings) -> LlamaEngine:
    from phichat.llama_engine import LlamaEngine

    return LlamaEngine.load(Path(settings.model.path or ""), "cpu", settings.engine)


def llama_model(engine: LlamaEngine) -> Any:
    """The engine's loaded llama_model, for a raw context on the same weights."""
    return engine.llama.model


def prompt_tokens(engine: LlamaEngine, messages: list[tuple[str, str]]) -> list[int]:
    """The chat prompt phichat builds for these (role, content) messages."""
    return engine.prompt_tokens([{"role": role, "content": text} for role, text in messages])


def open_session(
    settings: Settings, engine: LlamaEngine, store: Path, remember: bool
) -> ChatSession:
    """A session on history file `store`; `remember`: the background embedder, as in the app."""
    from phichat.session import ChatSession
    from phichat.store import Store

    return ChatSession(settings, engine, Store.open(store), remember=remember)


def add_conversation(store: Path, messages: list[tuple[str, str]]) -> int:
    """Store a conversation of (role, content) messages at once; its id."""
    from phichat.store import Store

    with Store.open(store) as db:
        conversation = db.create_conversation(title=messages[0][1][:40], device="cpu")
        db.add_messages(conversation.id, messages)
    return conversation.id


def backlog(session: ChatSession) -> int:
    """How many stored messages wait for the session's embedder (0 without one); waits for it
    to load."""
    memory = session.memory.get() if session.memory else None
    if memory is None or memory.embedder is None or session.store is None:
        return 0
    return len(session.store.missing_vectors(memory.embedder.model_id, 1_000_000))


def embedder_idle(session: ChatSession) -> bool:
    """Whether the background embedder has loaded and embedded every stored message (what it
    does while the user reads and types); True without one."""
    memory = session.memory.get() if session.memory else None
    if memory is None or memory.embedder is None or session.store is None:
        return True
    return not session.store.missing_vectors(memory.embedder.model_id, 1)


def settle(session: ChatSession, timeout: float = 900.0) -> None:
    """Wait until the background embedder is idle."""
    deadline = time.monotonic() + timeout
    while not embedder_idle(session):
        if time.monotonic() > deadline:
            sys.exit("the background embedder did not finish")
        time.sleep(0.05)


def send(session: ChatSession, text: str, before: Callable[[], None] | None = None) -> Turn:
    """Send `text` (after `before()`, e.g. a switch, timed with it); the answer's figures."""
    with Others() as others:
        started = time.perf_counter()
        if before is not None:
            before()
        first = None
        for _chunk in session.send(text):
            if first is None:
                first = time.perf_counter() - started
    stats, fit = session.last_stats, session.last_fit
    assert stats is not None and fit is not None
    return Turn(
        first if first is not None else time.perf_counter() - started,
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.generated_tokens,
        stats.decode_tps,
        fit.recalled,
        fit.dropped,
        others.cores,
    )


def type_and_send(session: ChatSession, text: str, paste: str = "", cps: float = 5.0) -> Turn:
    """Paste `paste`, type `text` at `cps` characters a second, reading the draft ahead as the
    app does (at once on the paste, then whenever the draft grew, READ_AHEAD_PAUSE_S apart),
    then press Enter, which stops a read-ahead under way; first token from Enter."""
    from phichat.tui.reading import READ_AHEAD_PAUSE_S

    started = time.perf_counter()
    enter = threading.Event()
    timer = threading.Timer(len(text) / cps, enter.set)
    timer.start()
    read = None
    while not enter.is_set():
        draft = paste + text[: int((time.perf_counter() - started) * cps)]
        if draft != read:
            read = draft
            session.read_ahead(draft, enter)
        enter.wait(READ_AHEAD_PAUSE_S)
    return send(session, paste + text)


def read_ahead_rate(engine: LlamaEngine, text: str, job: int | None) -> tuple[int, float]:
    """A message `text` read ahead from an empty cache in calls of `job` tokens (None: one
    call): the tokens read and the seconds it took."""
    messages = [{"role": "user", "content": text}]
    engine.llama.n_tokens = 0
    cancel = threading.Event()
    read = 0
    started = time.perf_counter()
    while step := engine.read_ahead(messages, cancel, limit=job):
        read += step
    return read, time.perf_counter() - started


def cold_read_rate(engine: LlamaEngine, text: str) -> tuple[int, float]:
    """A message `text` read cold as a prompt: its tokens and the seconds to the first token
    of a one-token answer."""
    from phichat.config import Sampling
    from phichat.engine import GenerationStats

    engine.llama.n_tokens = 0
    stats = GenerationStats()
    messages = [{"role": "user", "content": text}]
    for _chunk in engine.stream(messages, Sampling(temperature=0.0, max_tokens=1), stats=stats):
        pass
    return stats.prompt_tokens, stats.ttft_s


def switch(session: ChatSession, conversation_id: int) -> None:
    """As the side pane does: switch, then load its saved state ahead of the message."""
    session.switch(conversation_id)
    session.prepare()


def new_conversation(session: ChatSession) -> None:
    session.new_conversation()


def close(session: ChatSession) -> None:
    session.close()


def continue_command(config: Path, conversation_id: int, text: str) -> list[str]:
    """`phichat --continue ID --prompt TEXT --stats` in a new process."""
    return [
        *(sys.executable, "-m", "phichat", "--config", str(config), "--device", "cpu"),
        *("--continue", str(conversation_id), "--prompt", text, "--stats"),
    ]


STATS_LINE = re.compile(
    r"prompt tokens: (\d+) \(cached (\d+)(?:, restored \d+)?\), generated tokens: (\d+), "
    r"time to first token: (\d+) ms, decode: ([\d.]+) tokens/s"
)


def app_child() -> None:
    """In a fresh process (argv: dir, config, conversation id, text): the app, headless, with
    the real loader; open the conversation from the side pane's list, send the text; print the
    figures as JSON."""
    config, conversation_id, text = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from phichat.config import load_settings
    from phichat.tui.app import PhichatApp
    from phichat.tui.prompt import PromptInput
    from phichat.tui.side import ConversationList

    app = PhichatApp(load_settings("cpu", config))

    async def until(condition: Callable[[], object]) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def drive() -> dict[str, float]:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.chat.session is not None)
            session = app.chat.session
            assert session is not None
            await until(lambda: embedder_idle(session))
            await pilot.press("ctrl+b")
            listing = app.query_one(ConversationList)
            listing.focus()
            listing.highlighted = listing.get_option_index(str(conversation_id))
            opened = time.perf_counter()
            await pilot.press("enter")
            await until(lambda: session.conversation_id == conversation_id)
            shown = time.perf_counter()
            app.query_one(PromptInput).focus()
            app.query_one(PromptInput).insert(text)
            previous = session.last_stats
            sent = time.perf_counter()
            await pilot.press("enter")

            def answering() -> bool:
                stats = session.last_stats
                return stats is not previous and stats is not None and stats.generated_tokens > 0

            await until(lambda: answering() or not app.chat.busy)
            first = time.perf_counter()
            await until(lambda: not app.chat.busy)
            stats, fit = session.last_stats, session.last_fit
            assert stats is not None and fit is not None
            await pilot.press("ctrl+q")
        return {
            "open_s": shown - opened,
            "first_token_s": first - sent,
            "prompt": stats.prompt_tokens,
            "cached": stats.cached_tokens,
            "generated": stats.generated_tokens,
            "decode_tps": stats.decode_tps,
        }

    figures = asyncio.run(drive())
    app.shutdown()
    print(json.dumps(figures))


# --- the scenarios ------------------------------------------------------------------------------


class Bench:
    """The run's settings, scratch folder and engine (loaded once, shared by the scenarios)."""

    def __init__(self, args: argparse.Namespace, model: Path, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.settings = bench_settings(
            model, args.threads, args.answer_tokens, scratch / "history.sqlite"
        )
        started = time.perf_counter()
        self.engine = load_engine(self.settings)
        self.load_s = time.perf_counter() - started
        self.results: list[tuple[str, float, str]] = []  # (what, ratio, target)

    def conversation(self, rng: random.Random, tokens: int) -> list[tuple[str, str]]:
        """User and assistant messages whose chat prompt is at least `tokens` tokens."""
        messages: list[tuple[str, str]] = []
        while len(prompt_tokens(self.engine, messages)) < tokens:
            messages += [("user", user_message(rng)), ("assistant", assistant_message(rng))]
        return messages

    def quiet(self) -> None:
        """Before a measurement: wait a little for other processes to calm down."""
        wait_for_quiet(self.args.quiet_wait)

    def result(self, what: str, ratio: float, target: str) -> None:
        self.results.append((what, ratio, target))
        print(f"{what}: {ratio:.2f}x (target {target})", flush=True)


HEADER = (
    f"{'':<24}{'first token s':>14}{'prompt':>8}{'cached':>8}{'re-read':>8}{'tok/s':>7}"
    f"{'others':>8}"
)


def row(label: str, turn: Turn, extra: str = "") -> str:
    return (
        f"{label:<24}{turn.first_token_s:>14.1f}{turn.prompt:>8}{turn.cached:>8}"
        f"{turn.reread:>8}{turn.decode_tps:>7.2f}{turn.others:>8.2f}{extra}"
    )


def overflow(bench: Bench) -> None:
    """A conversation that outgrows the window, in the app's way (embedder on)."""
    args = bench.args
    print(f"\n== overflow: {args.turns} turns, answers <= {args.answer_tokens} tokens")
    print(HEADER + f"{'dropped':>9}{'recalled':>9}", flush=True)
    session = open_session(bench.settings, bench.engine, bench.scratch / "overflow.sqlite", True)
    rng = random.Random(1)
    turns = []
    try:
        for number in range(1, args.turns + 1):
            settle(session)
            bench.quiet()
            turn = send(session, user_message(rng))
            turns.append(turn)
            extra = f"{turn.dropped:>9}{turn.recalled:>9}"
            print(row(f"turn {number}", turn, extra), flush=True)
    finally:
        close(session)
    overflowed = next((i for i, t in enumerate(turns, 1) if t.dropped), None)
    print(f"the window overflowed at turn {overflowed}")
    early = [t.first_token_s for t in turns[1:10]]
    late = [t.first_token_s for t in turns[19:40]]
    if not early or not late:
        print("too few turns for the ratio (it needs 20 or more)")
        return
    print(
        f"median first token, turns 2-{min(10, len(turns))}: {statistics.median(early):.1f} s; "
        f"turns 20-{min(40, len(turns))}: {statistics.median(late):.1f} s; median re-read "
        f"{statistics.median(t.reread for t in turns[1:10]):.0f} and "
        f"{statistics.median(t.reread for t in turns[19:40]):.0f} tokens"
    )
    bench.result(
        f"overflow: first token, turns 20-{min(40, len(turns))} / turns 2-10",
        statistics.median(late) / statistics.median(early),
        "<= 2",
    )


def switch_back_and_forth(bench: Bench) -> None:
    """Two long conversations, visited in turn as the side pane does."""
    args = bench.args
    store = bench.scratch / "switch.sqlite"
    rng = random.Random(2)
    ids = [add_conversation(store, bench.conversation(rng, args.conversation_tokens)) for _ in "ab"]
    print(
        f"\n== switch: two conversations of >= {args.conversation_tokens} tokens, "
        f"{args.switch_rounds} rounds back and forth"
    )
    print(HEADER, flush=True)
    session = open_session(bench.settings, bench.engine, store, True)
    cold, back = [], []
    try:
        for visit, conversation_id in enumerate(ids * (args.switch_rounds + 1)):
            settle(session)
            bench.quiet()
            if visit >= 2 and args.typed:
                switch(session, conversation_id)
                turn = type_and_send(session, user_message(rng), cps=args.cps)
            else:
                turn = send(
                    session, user_message(rng), lambda c=conversation_id: switch(session, c)
                )
            label = f"{'first visit' if visit < 2 else 'switch back'} to #{conversation_id}"
            label += " (typed)" if visit >= 2 and args.typed else ""
            (cold if visit < 2 else back).append(turn)
            print(row(label, turn, "  (overflowed)" if turn.dropped else ""), flush=True)
    finally:
        close(session)
    baseline = statistics.median(t.first_token_s for t in cold)
    worst = max(t.first_token_s for t in back)
    print(f"read from scratch (median of the first visits): {baseline:.1f} s")
    bench.result(
        "switch: first token after a switch back"
        + (" (typed, from Enter)" if args.typed else "")
        + " / from scratch (median)",
        statistics.median(t.first_token_s for t in back) / baseline,
        "<= 0.1",
    )
    bench.result("switch: the same, worst switch back", worst / baseline, "<= 0.1")


def run_cli(command: list[str]) -> tuple[float, Turn]:
    """(process start to first answer byte, the --stats figures) of one `phichat` process."""
    with Others() as others:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert child.stdout is not None
        child.stdout.read(1)
        first = time.perf_counter() - started
        _, err = child.communicate()
    found = STATS_LINE.search(err.decode("utf-8", "replace"))
    if child.returncode != 0 or found is None:
        sys.exit(f"phichat failed ({child.returncode}):\n{err.decode('utf-8', 'replace')}")
    prompt, cached, generated, _ttft_ms, tps = found.groups()
    return first, Turn(
        first, int(prompt), int(cached), int(generated), float(tps), 0, 0, others.cores
    )


def run_app(config: Path, conversation_id: int, text: str) -> tuple[float, Turn]:
    """(open to shown, the answer's figures) of the app reopened on a conversation."""
    command = [sys.executable, "-c", APP_CHILD, str(HERE), str(config), str(conversation_id), text]
    with Others() as others:
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the app child failed:\n{result.stderr}")
    f = json.loads(result.stdout.strip().splitlines()[-1])
    wait = f["open_s"] + f["first_token_s"]
    turn = Turn(wait, f["prompt"], f["cached"], f["generated"], f["decode_tps"], 0, 0, others.cores)
    return f["open_s"], turn


def continue_in_new_process(bench: Bench) -> None:
    """A long conversation carried on by new processes: the CLI twice, then the app."""
    args = bench.args
    store = bench.scratch / "continue.sqlite"
    rng = random.Random(3)
    conversation_id = add_conversation(store, bench.conversation(rng, args.conversation_tokens))
    settings = bench_settings(
        Path(bench.settings.model.path or ""), args.threads, args.answer_tokens, store
    )
    config = config_file(settings, bench.scratch / "continue.toml")
    print(f"\n== continue: conversation #{conversation_id} of >= {args.conversation_tokens} tokens")
    print(HEADER, flush=True)
    baseline = None
    for label in ("--continue, 1st process", "--continue, 2nd process"):
        bench.quiet()
        _, turn = run_cli(continue_command(config, conversation_id, user_message(rng)))
        print(row(label, turn, "  (first token from process start)"), flush=True)
        if baseline is None:
            baseline = turn.first_token_s
        else:
            bench.result(
                "continue: first token, 2nd process / 1st", turn.first_token_s / baseline, "<= 0.1"
            )
    assert baseline is not None
    bench.quiet()
    opened, turn = run_app(config, conversation_id, user_message(rng))
    print(row("app reopened on it", turn, f"  (open {opened:.2f} s + first token after Enter)"))
    bench.result(
        "continue: app reopened, open + first token / 1st process",
        turn.first_token_s / baseline,
        "<= 0.1",
    )


def decode(bench: Bench) -> None:
    """Decode speed: raw llama.cpp, phichat, phichat with the embedder backfilling."""
    args = bench.args
    n = args.decode_tokens
    settings = bench_settings(
        Path(bench.settings.model.path or ""), args.threads, n, bench.scratch / "decode.sqlite"
    )
    tokens = prompt_tokens(bench.engine, [("user", DECODE_PROMPT)])
    print(
        f"\n== decode: {n} tokens after a {len(tokens)}-token prompt, {args.decode_rounds} rounds; "
        f"the embedder backfills {args.backfill} messages"
    )
    print(
        f"{'round':<8}{'raw tok/s':>11}{'phichat':>9}{'busy':>9}  others (raw, phichat, busy)"
        "  embedder backlog during the busy answer"
    )
    session = open_session(settings, bench.engine, bench.scratch / "decode.sqlite", False)
    raw_tps, ours, busy = [], [], []
    rng = random.Random(4)
    try:
        engine = settings.engine
        model = llama_model(bench.engine)
        with phi3_shape.raw_context(model, args.threads, engine.kv_type, engine.flash_attn) as raw:
            for number in range(1, args.decode_rounds + 1):
                bench.quiet()
                with Others() as others:
                    raw.clear()
                    raw.decode(tokens)
                    _, seconds = raw.greedy(n)
                raw_tps.append((n - 1) / seconds)
                new_conversation(session)
                bench.quiet()
                plain = check_length(send(session, DECODE_PROMPT), n)
                ours.append(plain.decode_tps)
                turn, note = decode_while_backfilling(bench, settings, number, rng)
                busy.append(check_length(turn, n).decode_tps)
                print(
                    f"{number:<8}{raw_tps[-1]:>11.2f}{ours[-1]:>9.2f}{busy[-1]:>9.2f}"
                    f"  {others.cores:.2f}, {plain.others:.2f}, {turn.others:.2f}  {note}"
                )
    finally:
        close(session)
    raw_median = statistics.median(raw_tps)
    bench.result("decode: phichat / raw llama.cpp", statistics.median(ours) / raw_median, ">= 0.97")
    bench.result(
        "decode: phichat with the embedder backfilling / raw llama.cpp",
        statistics.median(busy) / raw_median,
        ">= 0.95",
    )


def typing(bench: Bench) -> None:
    """A message typed at 5 characters a second, and a paste with a question typed after it,
    each against the same turn sent without read-ahead (the same history in the cache)."""
    from phichat.session import ChatSession
    from phichat.store import Message, Role

    rng = random.Random(4)
    session = ChatSession(bench.settings, bench.engine, None, remember=False)
    history = [
        Message(i, 0, Role.USER if i % 2 == 0 else Role.ASSISTANT, text, 0.0)
        for i, text in enumerate(
            m for _ in range(2) for m in (user_message(rng), assistant_message(rng))
        )
    ]
    question = USER_SENTENCES[11]  # about 20 tokens
    cases = [
        ("a 40-token message typed", "", " ".join(USER_SENTENCES[3:5])),
        ("a paste, a question typed", paste_text(bench.engine, bench.args.paste_tokens), question),
    ]
    print(f"\n== typing: after {len(history)} messages, at 5 characters a second")
    print(HEADER, flush=True)

    def fresh() -> None:
        """The history alone in the cache, as after the last answer."""
        session.history = list(history)
        bench.engine.llama.n_tokens = 0
        session.read_ahead("", threading.Event())

    for label, paste, text in cases:
        fresh()
        bench.quiet()
        cold = send(session, paste + text)
        print(row(f"{label}, sent", cold), flush=True)
        fresh()
        bench.quiet()
        typed = type_and_send(session, text, paste)
        print(row(f"{label}, typed", typed), flush=True)
        target = "<= 0.15" if paste else "<= 0.2"
        bench.result(
            f"typing: {label}, first token", typed.first_token_s / cold.first_token_s, target
        )


def typing_overflow(bench: Bench) -> None:
    """The overflow conversation typed, read ahead from the end of each answer on."""
    args = bench.args
    print(f"\n== typing-overflow: {args.turns} turns typed at {args.cps:g} characters a second")
    print(HEADER + f"{'dropped':>9}{'recalled':>9}", flush=True)
    store = bench.scratch / "typing-overflow.sqlite"
    session = open_session(bench.settings, bench.engine, store, True)
    rng = random.Random(1)  # the overflow scenario's conversation
    turns = []
    try:
        for number in range(1, args.turns + 1):
            settle(session)
            bench.quiet()
            turn = type_and_send(session, user_message(rng), cps=args.cps)
            turns.append(turn)
            print(row(f"turn {number}", turn, f"{turn.dropped:>9}{turn.recalled:>9}"), flush=True)
    finally:
        close(session)
    early = [t.first_token_s for t in turns[1:10]]
    late = [t.first_token_s for t in turns[19:40]]
    if not early or not late:
        print("too few turns for the ratio (it needs 20 or more)")
        return
    slowest = max(range(len(late)), key=late.__getitem__)
    print(
        f"median first token, turns 2-{min(10, len(turns))}: {statistics.median(early):.1f} s; "
        f"turns 20-{min(40, len(turns))}: median {statistics.median(late):.1f} s, slowest "
        f"{late[slowest]:.1f} s (turn {slowest + 20})"
    )
    bench.result(
        f"typing-overflow: slowest first token, turns 20-{min(40, len(turns))} / median 2-10",
        late[slowest] / statistics.median(early),
        "<= 2",
    )


def paste_read(bench: Bench) -> None:
    """A paste read ahead in small calls, in one call, and cold: tokens/s of each."""
    text = paste_text(bench.engine, bench.args.paste_tokens)
    ways: list[tuple[str, Callable[[], tuple[int, float]]]] = [
        ("ahead, calls of 64", lambda: read_ahead_rate(bench.engine, text, 64)),
        ("ahead, one call", lambda: read_ahead_rate(bench.engine, text, None)),
        ("cold, as a prompt", lambda: cold_read_rate(bench.engine, text)),
    ]
    print(
        f"\n== paste-read: a {bench.args.paste_tokens}-token paste, {bench.args.read_rounds} rounds"
    )
    rates: dict[str, list[float]] = {label: [] for label, _ in ways}
    for number in range(1, bench.args.read_rounds + 1):
        for label, read in ways:
            bench.quiet()
            with Others() as others:
                tokens, seconds = read()
            rates[label].append(tokens / seconds)
            print(
                f"round {number}, {label:<20}{tokens:>6} tokens {seconds:>7.1f} s "
                f"{tokens / seconds:>7.1f} tokens/s  others {others.cores:.2f}",
                flush=True,
            )
    cold = statistics.median(rates["cold, as a prompt"])
    for label in ("ahead, calls of 64", "ahead, one call"):
        bench.result(
            f"paste-read: {label} / cold, tokens/s", statistics.median(rates[label]) / cold, "~1"
        )


def paste_text(engine: LlamaEngine, tokens: int) -> str:
    """Assistant-like prose of about `tokens` tokens, as pasted from a document."""
    rng = random.Random(5)
    text = ""
    while engine.count_tokens(text) < tokens:
        text += assistant_message(rng) + "\n\n"
    return text


def check_length(turn: Turn, n: int) -> Turn:
    if turn.generated != n:
        sys.exit(f"phichat stopped after {turn.generated} of {n} tokens; try another prompt")
    return turn


def decode_while_backfilling(
    bench: Bench, settings: Settings, number: int, rng: random.Random
) -> tuple[Turn, str]:
    """One answer while the background embedder works through --backfill stored messages."""
    store = bench.scratch / f"backfill-{number}.sqlite"
    per_conversation = 40
    total = 0
    while total < bench.args.backfill:
        messages = [
            ("user", user_message(rng)) if i % 2 == 0 else ("assistant", assistant_message(rng))
            for i in range(per_conversation)
        ]
        total += len(messages)
        add_conversation(store, messages)
    bench.quiet()  # before the embedder starts: it must still be busy when measured
    session = open_session(settings, bench.engine, store, True)
    try:
        deadline = time.monotonic() + 120
        while backlog(session) >= total:  # until it has loaded and stored its first vectors
            if time.monotonic() > deadline:
                sys.exit("the background embedder did not start")
            time.sleep(0.05)
        before = backlog(session)
        turn = send(session, DECODE_PROMPT)
        after = backlog(session)
        note = f"{before} -> {after} messages"
        if after == 0:
            note += " (it finished during the answer: use a larger --backfill)"
        settle(session)
    finally:
        close(session)
    return turn, note


def state_on_disk(scratch: Path) -> int:
    """Bytes under the scratch PHICHAT_HOME's cache folder (saved conversation state)."""
    folder = scratch / "cache"
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--conversation-tokens", type=int, default=3000)
    parser.add_argument("--switch-rounds", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--backfill", type=int, default=2000)
    parser.add_argument("--paste-tokens", type=int, default=1500)
    parser.add_argument("--cps", type=float, default=5.0, help="typing rate")
    parser.add_argument("--typed", action="store_true", help="switch: type each switch back")
    parser.add_argument("--read-rounds", type=int, default=2)
    parser.add_argument(
        "--set",
        type=parse_change,
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change a setting of the cpu config (e.g. engine.flash_attn=false)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        metavar="S",
        help="before each measurement, wait up to S seconds for other processes to calm down",
    )
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {SCENARIOS}")
    for section, key, value in args.set:
        SETTINGS_CHANGES.setdefault(section, {})[key] = value
    model = args.model or phi3_shape.ensure()
    scratch = Path(tempfile.mkdtemp(prefix="phichat-long-chat-"))
    os.environ["PHICHAT_HOME"] = str(scratch)
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    try:
        bench = Bench(args, model, scratch)
        engine = bench.settings.engine
        print(
            f"model: {model.name}, phichat's cpu config, threads {args.threads}, n_ctx "
            f"{bench.engine.n_ctx}, kv_type {engine.kv_type}, flash_attn {engine.flash_attn}, "
            f"state_cache_mb {engine.state_cache_mb}, recall_tokens "
            f"{bench.settings.chat.recall_tokens}, greedy; engine loaded in {bench.load_s:.1f} s",
            flush=True,
        )
        runs = {
            "overflow": overflow,
            "switch": switch_back_and_forth,
            "continue": continue_in_new_process,
            "decode": decode,
            "typing": typing,
            "typing-overflow": typing_overflow,
            "paste-read": paste_read,
        }
        for name in chosen:
            runs[name](bench)
        print(f"\n== summary ({(time.perf_counter() - started) / 60:.0f} min)")
        for what, ratio, target in bench.results:
            print(f"{what:<66}{ratio:>7.2f}x  (target {target})")
        print(f"conversation state on disk at the end: {state_on_disk(scratch) / 1e6:.0f} MB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
