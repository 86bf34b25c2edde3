"""Import speed: `phichat import` of a ChatGPT export of 10,000 chat messages, embedding included.

    .venv/bin/python benchmarks/import_speed.py [--messages 10000]

Writes a conversations.json (ChatGPT's format, 100 messages a conversation) whose messages are
drawn as benchmarks/embed.py draws its chat corpus (60% of 3-30 words, 30% of 30-120, 10% of
120-400), then times `phichat import` into a fresh history in a new process, with the packaged
all-MiniLM-L6-v2. Anchor: <= 2 minutes for 10,000 messages on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaged import minilm_dir

SENTENCE = (
    "the model keeps repeating itself after about two hundred tokens so I lowered the temperature"
    " and raised the repeat penalty but now answers feel flat can you explain why sampling works"
    " this way and what top p does when the distribution is sharp I also want to know how the"
    " embedder finds old messages by meaning instead of keywords whether search runs offline on"
    " my laptop how much memory the index needs what happens with emoji like 🏒 or accents like"
    " café naïve résumé and Chinese 中文 text which backend is faster CUDA or Metal quantized"
    " weights load from the hub cache once then everything stays local"
)
WORDS = SENTENCE.split()


def text(rng: random.Random) -> str:
    draw = rng.random()
    low, high = (3, 30) if draw < 0.6 else (30, 120) if draw < 0.9 else (120, 400)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def chatgpt_export(messages: int, seed: int = 1234) -> list[dict]:
    """ChatGPT conversations with `messages` messages in all, 100 a conversation."""
    rng = random.Random(seed)
    conversations, when, made = [], 1.7e9, 0
    while made < messages:
        nodes = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
        parent = "root"
        for i in range(min(100, messages - made)):
            when += 30
            node = f"{len(conversations)}-{i}"
            author = {"role": ("user", "assistant")[i % 2]}
            content = {"content_type": "text", "parts": [text(rng)]}
            message = {"author": author, "create_time": when, "content": content}
            nodes[node] = {"id": node, "parent": parent, "children": [], "message": message}
            nodes[parent]["children"].append(node)
            parent = node
            made += 1
        conversations.append(
            {
                "title": f"Chat {len(conversations)}",
                "create_time": when,
                "mapping": nodes,
                "current_node": parent,
            }
        )
    return conversations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phichat-import-") as tmp:
        export = Path(tmp) / "conversations.json"
        export.write_text(json.dumps(chatgpt_export(args.messages), ensure_ascii=False))
        config = Path(tmp) / "config.toml"
        config.write_text(f"[store]\npath = {json.dumps(str(Path(tmp) / 'history.db'))}\n")
        phichat = Path(sys.executable).parent / "phichat"  # the installed command
        command = [str(phichat), "import", str(export), "--config", str(config)]
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        started = time.perf_counter()
        subprocess.run([*command, "--embedder-dir", str(minilm_dir())], check=True)
        seconds = time.perf_counter() - started
        print(
            f"imported {args.messages:,} messages in {seconds:.1f} s"
            f" ({args.messages / seconds:.0f} messages/s; anchor 120 s for 10,000)"
        )


if __name__ == "__main__":
    main()
