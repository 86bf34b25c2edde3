"""Remote engine speed: phichat's RemoteEngine against a bare httpx stream of the same request.

Both read the same server (started here on a loopback port: llama-cpp-python's llama_cpp.server,
or llama.cpp's llama-server once .ci/llama-server has built it) with the same request body,
greedy, so every round streams the same answer. The anchor is the least a client can do: one
kept-alive httpx client, `data:` lines parsed with json.loads, nothing else. phichat adds its
fresh connection per answer (so that a stop can shut it), the cancel watcher, stats and the
SSE checks. Rounds alternate; the medians of each round's ratio to the anchor are reported
(the pairs share whatever else the machine is doing at the time):

    tokens/s (phichat shows / bare) >= 0.97        first token (phichat / bare) <= 1.05

    python benchmarks/remote.py [--server llama-cpp-python|llama-server] [--tokens 128]
                                [--rounds 15] [--threads 1] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from packaged import smollm_path
from servers import LocalServer

from phichat.config import Sampling, ServerSettings
from phichat.engine import GenerationStats
from phichat.remote_engine import RemoteEngine

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def bare_stream(client: httpx.Client, url: str, body: dict) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) of a plain httpx SSE read."""
    started = time.perf_counter()
    first = last = 0.0
    count = 0
    with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                    count += 1
    return first - started, (count - 1) / (last - first), count


def phichat_stream(engine: RemoteEngine, sampling: Sampling) -> tuple[float, float, int]:
    """(time to first token, tokens/s phichat shows, tokens) through RemoteEngine.stream."""
    stats = GenerationStats()
    for _ in engine.stream(PROMPT, sampling, threading.Event(), stats):
        pass
    return stats.ttft_s, stats.decode_tps, stats.generated_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["llama-cpp-python", "llama-server"],
                        default="llama-cpp-python")  # fmt: skip
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="server threads")
    args = parser.parse_args()

    log = Path(tempfile.mkdtemp(prefix="phichat-bench-")) / "server.log"
    server = LocalServer(args.server, args.model or smollm_path(), log, threads=args.threads)
    engine = RemoteEngine.connect(ServerSettings(url=server.url, timeout=120), 2048)
    client = httpx.Client(timeout=120)
    sampling = Sampling(temperature=0.0, repeat_penalty=1.0, seed=1, max_tokens=args.tokens)
    body = engine.request_body(PROMPT, sampling, seed=1)
    try:
        bare_stream(client, server.url, body)  # warm-up: load, cache the prompt
        phichat_stream(engine, sampling)
        ours, anchor = [], []
        for _ in range(args.rounds):
            anchor.append(bare_stream(client, server.url, body))
            ours.append(phichat_stream(engine, sampling))
    finally:
        client.close()
        engine.close()
        server.stop()
    counts = {run[2] for run in ours + anchor}
    if counts != {args.tokens}:
        sys.exit(f"answers stopped early ({sorted(counts)} tokens); use a longer prompt")

    def median(runs: list[tuple[float, float, int]], field: int) -> float:
        return statistics.median(run[field] for run in runs)

    print(f"{args.server} on SmolLM2, {args.tokens} tokens, {args.rounds} rounds alternated")
    print(f"{'':12}{'first token ms':>16}{'tokens/s':>12}")
    for name, runs in (("bare httpx", anchor), ("phichat", ours)):
        print(f"{name:12}{median(runs, 0) * 1000:16.2f}{median(runs, 1):12.1f}")
    tps = statistics.median(o[1] / a[1] for o, a in zip(ours, anchor, strict=True))
    ttft = statistics.median(o[0] / a[0] for o, a in zip(ours, anchor, strict=True))
    print(f"median ratio per round: tokens/s {tps:.3f} (target >= 0.97), ", end="")
    print(f"first token {ttft:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
