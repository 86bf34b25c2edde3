"""A switch saves in the background (issue 18, item 4): the state of the conversation left is
copied to memory and written by a thread of its own, so the first answer in the next one does
not wait for it; the file appears whole (renamed when written), restores the same answer, and a
close right after a switch waits for it (real llama.cpp on SmolLM2)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from phichat.config import Settings, load_settings
from phichat.kv_state import StateCache
from phichat.session import ChatSession

pytestmark = pytest.mark.slow  # each test reads and saves whole conversations: seconds each

QUESTIONS = ["Name three rivers in Europe.", "And three mountains?"]
NEXT = "Which of them is highest?"


def settings_for(smollm_path: Path, state_mb: int = 100) -> Settings:
    return load_settings(
        "cpu",
        overrides={
            "model": {"path": str(smollm_path)},
            "engine": {"n_ctx": 1024, "threads": 2, "state_cache_mb": state_mb},
            "sampling": {"temperature": 0.0, "max_tokens": 16},
        },
    )


def state_files() -> list[Path]:
    """The saved state files, temporary ones included."""
    folder = Path(os.environ["PHICHAT_HOME"]) / "cache" / "kv-states"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def talked(settings: Settings, texts: list[str], continue_id: int | None = None) -> ChatSession:
    session = ChatSession.open(settings, continue_id=continue_id, remember=False)
    for text in texts:
        assert "".join(session.send(text))
    return session


def assert_restored(smollm_path: Path, conversation: int) -> None:
    """NEXT is answered in `conversation` in a new session from its saved state."""
    session = talked(settings_for(smollm_path), [], conversation)
    try:
        assert "".join(session.send(NEXT))
        assert session.last_stats is not None and session.last_stats.restored_tokens > 50
    finally:
        session.close()


def greedy(llama: Any, count: int) -> list[int]:
    """`count` tokens decoded greedily after what the context holds."""
    import llama_cpp

    found = []
    for _ in range(count):
        logits = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
        token = max(range(llama.n_vocab()), key=lambda i: logits[i])
        found.append(token)
        llama.eval([token])
    return found


def test_a_state_written_in_the_background_is_llama_cpps_own_file_and_goes_on_the_same(
    smollm_path: Path, tmp_path: Path
) -> None:
    import llama_cpp
    from llama_cpp import Llama

    llama = Llama(str(smollm_path), n_ctx=256, n_threads=2, verbose=False)
    tokens = llama.tokenize(b"The three longest rivers in Europe are the Volga, the")
    llama.eval(tokens[:-1])
    llama.eval(tokens[-1:])  # alone, as it is read again after a restore (the same logits)
    cache = StateCache(tmp_path / "states", "sig", 10_000_000, lambda line: None)
    assert cache.save(llama.ctx, "k", tokens)
    cache.wait()
    (written,) = (tmp_path / "states").iterdir()
    own = tmp_path / "own.kv"
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    assert llama_cpp.llama_state_seq_save_file(llama.ctx, bytes(own), 0, array, len(tokens))
    assert written.read_bytes() == own.read_bytes()

    expected = greedy(llama, 8)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llama.ctx), 0, -1, -1)
    llama.n_tokens = 0
    assert cache.load(llama.ctx, "k", 256) == tokens
    llama.n_tokens = len(tokens) - 1  # eval() drops the last one's cells first
    llama.eval(tokens[-1:])  # logits to go on from, as a restored prompt's last token is read
    assert greedy(llama, 8) == expected
    llama.close()


def test_the_next_answer_does_not_wait_for_the_state_left_which_is_restored_later(
    smollm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, writing = threading.Event(), threading.Event()
    write = StateCache._write

    def held_write(self: StateCache, *args: Any) -> bool:
        writing.set()
        release.wait(120)  # held until the next answer is in, or the test gives up
        return write(self, *args)

    monkeypatch.setattr(StateCache, "_write", held_write)
    session = talked(settings_for(smollm_path), QUESTIONS)
    left = session.conversation_id
    assert left is not None
    try:
        session.new_conversation()
        assert "".join(session.send("Hello!"))  # switches: the state of `left` is saved
        assert writing.is_set() and not release.is_set()
        assert not [p for p in state_files() if p.name.startswith(f"{session._state_key(left)}-")]
    finally:
        release.set()
        session.close()
    assert_restored(smollm_path, left)


def test_a_close_right_after_a_switch_waits_for_the_state_being_written(
    smollm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = StateCache._write
    slow = threading.Event()

    def slow_write(self: StateCache, *args: Any) -> bool:
        slow.wait(1.0)  # a slow disk
        return write(self, *args)

    monkeypatch.setattr(StateCache, "_write", slow_write)
    session = talked(settings_for(smollm_path), QUESTIONS)
    left = session.conversation_id
    assert left is not None
    session.new_conversation()
    session.prepare()  # the engine leaves `left`: its state is being written
    session.close()  # at once
    assert [p.suffix for p in state_files()] == [".kv"]  # whole: no temporary file left
    assert_restored(smollm_path, left)
