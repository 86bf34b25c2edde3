"""Read-ahead in a real terminal (issue 18): the installed `phichat` under tmux, on SmolLM2, a
400-character message typed one key at a time at 10 characters a second; on Enter the status
line says "re-read N" with N <= 16 (the message's last words and the template's end). The time
it takes is benchmarks/keystroke_latency.py's business; here Enter waits until the app has
finished reading ahead (its process idle), so a loaded machine cannot fail the test."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Tmux, wait_until

SENTENCES = (
    "I'm planning a week in Lisbon in October and would like to avoid the worst of the crowds. "
    "My Python script reads a two gigabyte CSV file with pandas and runs out of memory. "
    "We adopted a rescue dog last month and she still barks at every bicycle that passes. "
    "Which of these three problems should I solve first, and how would you go about it?"
)
TEXT = SENTENCES[:400]
STATS = re.compile(r"re-read (\d+)\)")


def cpu_seconds(pid: int) -> float:
    """CPU time of process `pid` and its threads, in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return float(int(fields[11]) + int(fields[12]))


def idle(pid: int) -> bool:
    """The process used (almost) no CPU for a second (the cursor blinks): it is not reading
    ahead, nor about to (a read-ahead starts 0.3 s after typing)."""
    for _ in range(2):
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if cpu_seconds(pid) - before > 2:
            return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_message_typed_at_ten_keys_a_second_leaves_its_end_to_read_on_enter(
    smollm_config: Path, tmp_path: Path
) -> None:
    exe = Path(sys.executable).parent / "phichat"
    tmux = Tmux(tmp_path / "tmux.sock")
    try:
        tmux.start([str(exe), "--config", str(smollm_config), "--max-tokens", "4"])
        tmux.wait(lambda s: "· ready" in s, "the model")
        [pid] = subprocess.run(
            [*tmux.base, "display-message", "-p", "#{pane_pid}"], capture_output=True, text=True
        ).stdout.split()
        wait_until(lambda: idle(int(pid)), "the app to settle after loading", every=0)
        due = time.monotonic()
        seen_reading = False
        for char in TEXT:
            time.sleep(max(0.0, due - time.monotonic()))
            tmux.keys("-l", char)
            due += 0.1
            seen_reading = seen_reading or "reading ahead" in tmux.screen()
        last_words = "".join(TEXT.split())[-30:]
        tmux.wait(lambda s: last_words in "".join(s.split()), "the whole message")
        wait_until(lambda: idle(int(pid)), "the read-ahead to end", every=0)
        tmux.keys("Enter")
        screen = tmux.wait(lambda s: STATS.search(s) is not None and "· ready" in s, "the answer")
    finally:
        tmux.kill()
    assert seen_reading, "the status line never said it was reading ahead"
    found = STATS.search(screen)
    assert found is not None and int(found.group(1)) <= 16, screen
