"""A switch saves in the background (issue 18, item 4): the first token in a new conversation
right after leaving a long one, with the state of the one left saved before the answer (as
before) and in the background (now), in the same run.

On benchmarks/phi3_shape.py's model with phichat's cpu config (long_chat.py's settings and
conversations), --threads threads, greedy: a conversation of --conversation-tokens tokens is
visited (a message sent in it, so its state has changed), then a new conversation is started
and a message sent: its first token (from the switch) is timed, the state left being saved
synchronously (`StateCache.in_background` off) or in the background, --rounds times each,
alternating. The background write is waited for before the next visit (its time is shown).

    python benchmarks/switch_save.py [--conversation-tokens 3000] [--rounds 2] [--threads 2]
        [--model PATH] [--quiet-wait 15]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import long_chat
import phi3_shape
from long_chat import HEADER, Bench, add_conversation, open_session, row, send, user_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--conversation-tokens", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quiet-wait", type=float, default=15.0)
    args = parser.parse_args()
    model = args.model or phi3_shape.ensure()
    scratch = Path(tempfile.mkdtemp(prefix="phichat-switch-save-"))
    os.environ["PHICHAT_HOME"] = str(scratch)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        bench = Bench(args, model, scratch)
        states = bench.engine.states
        assert states is not None, "the cpu config saves conversation states"
        rng = random.Random(3)
        store = scratch / "switch-save.sqlite"
        long_id = add_conversation(store, bench.conversation(rng, args.conversation_tokens))
        session = open_session(bench.settings, bench.engine, store, False)
        print(f"model: {model.name}, threads {args.threads}, n_ctx {bench.engine.n_ctx}")
        print(HEADER + f"{'write s':>9}", flush=True)
        firsts: dict[bool, list[float]] = {False: [], True: []}
        try:
            for visit in range(2 * args.rounds):
                in_background = visit % 2 == 1
                states.in_background = in_background
                session.switch(long_id)
                session.prepare()
                turn = send(session, user_message(rng))
                print(row(f"visit the long one ({turn.prompt})", turn), flush=True)
                long_chat.wait_for_quiet(args.quiet_wait)
                turn = send(session, user_message(rng), session.new_conversation)
                started = time.perf_counter()
                states.wait()
                written = time.perf_counter() - started
                label = f"new one, {'background' if in_background else 'saved first'}"
                print(row(label, turn) + f"{written:>9.1f}", flush=True)
                firsts[in_background].append(turn.first_token_s)
        finally:
            session.close()
        before, now = (statistics.median(firsts[mode]) for mode in (False, True))
        print(
            f"first token in the new conversation: saved first {before:.2f} s, in the background "
            f"{now:.2f} s: {now / before:.2f}x"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
