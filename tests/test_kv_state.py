"""Saved KV states: a switch or a restart does not read a conversation again, and no saved state
can change an answer or outgrow its cap (real llama.cpp on SmolLM2 and the wired tiny Phi-3)."""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import pytest
from helpers import phichat
from tiny_phi3 import ANSWER

from phichat.config import Settings, load_settings
from phichat.llama_engine import open_log
from phichat.session import ChatSession
from phichat.store import Store, default_path

pytestmark = pytest.mark.slow  # each test reads and saves whole conversations: seconds each

QUESTIONS = ["Name three rivers in Europe.", "And three mountains?", "Which of them is highest?"]
NEXT = "Tell me one more fact about the first river."


def settings_for(smollm_path: Path, state_mb: int = 100, n_ctx: int = 1024) -> Settings:
    return load_settings(
        "cpu",
        overrides={
            "model": {"path": str(smollm_path)},
            "engine": {"n_ctx": n_ctx, "threads": 2, "state_cache_mb": state_mb},
            "sampling": {"temperature": 0.0, "max_tokens": 24},
        },
    )


def logged() -> str:
    """What this process wrote to its log (llama.cpp's lines and phichat's own)."""
    log = open_log()
    assert log is not None
    return log.read_text()


def states() -> list[Path]:
    """The saved state files, temporary ones included."""
    folder = Path(os.environ["PHICHAT_HOME"]) / "cache" / "kv-states"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def talk(settings: Settings, texts: list[str], continue_id: int | None = None) -> ChatSession:
    """A session (its own engine) that sends `texts`, left open for the caller to inspect."""
    session = ChatSession.open(settings, continue_id=continue_id, remember=False)
    for text in texts:
        assert "".join(session.send(text))
    return session


def history_copy(conversation_id: int) -> int:
    """A new conversation with the same messages (a cold read of the same prompt)."""
    with Store.open(default_path()) as store:
        messages = store.messages(conversation_id)
        copy = store.create_conversation(title="copy")
        store.add_messages(copy.id, [(m.role, m.content) for m in messages])
    return copy.id


def answer_unrestored(settings: Settings, conversation_id: int, text: str) -> str:
    """The answer to `text` in the conversation, asserting no saved state was restored."""
    session = talk(settings, [], conversation_id)
    try:
        answer = "".join(session.send(text))
        assert session.last_stats is not None and session.last_stats.restored_tokens == 0
        return answer
    finally:
        session.close()


def cold_answer(smollm_path: Path, conversation_id: int, text: str) -> str:
    """The answer from a cold read of the same messages (a copy, no states saved)."""
    copy = history_copy(conversation_id)
    return answer_unrestored(settings_for(smollm_path, state_mb=0), copy, text)


@pytest.fixture
def saved(smollm_path: Path) -> int:
    """A three-turn conversation whose state was saved when its process ended."""
    session = talk(settings_for(smollm_path), QUESTIONS)
    conversation = session.conversation_id
    session.close()
    assert conversation is not None and [p.suffix for p in states()] == [".kv"]
    return conversation


def test_a_restored_state_reads_only_the_new_message_and_answers_as_a_cold_read(
    smollm_path: Path, saved: int
) -> None:
    session = talk(settings_for(smollm_path), [], saved)
    try:
        answer = "".join(session.send(NEXT))
        stats = session.last_stats
        assert stats is not None and stats.restored_tokens > 100
        new_tokens = session.engine.count_tokens(NEXT)
        assert stats.prompt_tokens - stats.cached_tokens <= new_tokens + 12  # + the template
    finally:
        session.close()
    assert answer == cold_answer(smollm_path, saved, NEXT)


@pytest.mark.parametrize("damage", ["body", "header"])
def test_a_damaged_state_is_ignored_with_a_log_line(
    smollm_path: Path, saved: int, damage: str
) -> None:
    (state,) = states()
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2] if damage == "body" else b"\x00" * 64)
    answer = answer_unrestored(settings_for(smollm_path), saved, NEXT)
    assert answer == cold_answer(smollm_path, saved, NEXT)
    assert re.search(r"phichat: ignoring KV state .*\.kv", logged())


def test_a_state_of_another_setup_is_never_loaded(smollm_path: Path, saved: int) -> None:
    session = talk(settings_for(smollm_path, n_ctx=2048), [NEXT], saved)
    try:
        assert session.last_stats is not None
        assert (session.last_stats.restored_tokens, session.last_stats.cached_tokens) == (0, 0)
    finally:
        session.close()
    assert len(states()) == 2  # each setup keeps its own


def test_states_stay_under_the_cap_least_recently_used_first(smollm_path: Path) -> None:
    session = talk(settings_for(smollm_path), QUESTIONS[:1])
    session.close()
    (first,) = states()
    size = first.stat().st_size
    cap_mb = (2.5 * size) / 1e6  # room for two states like it, not three
    settings = settings_for(smollm_path, state_mb=max(1, int(cap_mb + 0.5)))
    if settings.engine.state_cache_mb * 1e6 < 2 * size:
        pytest.skip("states too small for a whole-MB cap that holds exactly two")
    for text in ("Name three lakes.", "Name three deserts.", "Name three islands."):
        session = talk(settings, [text])
        session.close()
        total = sum(p.stat().st_size for p in states())
        assert total <= settings.engine.state_cache_mb * 1_000_000
    assert first not in states()  # the least recently used went first
    assert len(states()) == 2

    tiny = settings_for(smollm_path, state_mb=1)
    session = talk(tiny, ["Write a long list of forty rivers of the world, with countries."])
    session.close()
    assert sum(p.stat().st_size for p in states()) <= 1_000_000


def test_deleting_a_conversation_deletes_its_state(smollm_path: Path, saved: int) -> None:
    session = talk(settings_for(smollm_path), [], saved)
    try:
        session.delete(saved)
        assert states() == []
    finally:
        session.close()
    assert states() == []  # closing saved nothing for a deleted conversation


def test_a_half_written_state_of_a_killed_process_is_never_used_and_is_cleaned(
    smollm_path: Path, saved: int
) -> None:
    (state,) = states()
    dead = 2**22 + 12345  # beyond pid_max on Linux defaults: no such process
    leftover = state.with_name(f".{state.name}.{dead}.tmp")
    leftover.write_bytes(state.read_bytes()[:1000])
    state.unlink()
    assert answer_unrestored(settings_for(smollm_path), saved, NEXT)
    assert leftover not in states() and [p.suffix for p in states()] == [".kv"]


def test_an_unwritable_cache_keeps_the_answer_and_says_why_in_the_log(
    smollm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "blocked-home"
    blocked.mkdir()
    (blocked / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("PHICHAT_HOME", str(blocked))
    session = talk(settings_for(smollm_path), QUESTIONS[:1])
    conversation = session.conversation_id
    session.close()
    assert conversation is not None
    assert "could not save the conversation's KV state" in logged()
    with Store.open(default_path()) as store:
        assert [m.role for m in store.messages(conversation)] == ["user", "assistant"]


def test_an_unwritable_cache_is_one_warning_line_after_the_answer(
    smollm_config: Path, tmp_path: Path
) -> None:
    blocked = tmp_path / "blocked-home"
    blocked.mkdir()
    (blocked / "cache").write_text("a file where the cache folder should be")
    with smollm_config.open("a") as config:
        config.write("state_cache_mb = 100\n")  # [engine] is the last table
    flags = ["--config", str(smollm_config), "--temperature", "0", "--max-tokens", "8"]
    env = {**os.environ, "PHICHAT_HOME": str(blocked)}
    result = phichat(*flags, "--prompt", QUESTIONS[0], env=env)
    assert result.returncode == 0 and result.stdout.strip()
    assert result.stderr.startswith("phichat: warning: could not save the conversation's KV state")
    assert result.stderr.count("\n") == 1 and "read again next time" in result.stderr


def test_continue_in_a_new_process_reports_the_history_as_cached(smollm_config: Path) -> None:
    with smollm_config.open("a") as config:
        config.write("state_cache_mb = 100\n")  # [engine] is the last table
    flags = ["--config", str(smollm_config), "--temperature", "0", "--max-tokens", "16"]
    first = phichat(*flags, "--prompt", QUESTIONS[0], "--stats")
    assert first.returncode == 0, first.stderr
    with Store.open(default_path()) as store:
        conversation = store.conversations()[0].id
    again = phichat(*flags, "--continue", str(conversation), "--prompt", NEXT, "--stats")
    assert again.returncode == 0, again.stderr
    cached, restored = map(int, re.findall(r"\(cached (\d+), restored (\d+)\)", again.stderr)[0])
    first_prompt = int(re.findall(r"prompt tokens: (\d+)", first.stderr)[0])
    assert cached >= first_prompt and restored >= cached


def test_a_state_of_another_model_under_this_ones_name_is_ignored(
    smollm_path: Path, tiny_phi3_path: Path, saved: int
) -> None:
    tiny = load_settings(
        "cpu",
        overrides={
            "model": {"path": str(tiny_phi3_path)},
            "engine": {"n_ctx": 1024, "threads": 2, "state_cache_mb": 100},
        },
    )
    other = talk(tiny, ["Hello there"])
    other.close()
    (ours,) = [p for p in states() if p.stat().st_mtime == min(q.stat().st_mtime for q in states())]
    (theirs,) = [p for p in states() if p != ours]
    header, tokens_end = 12, lambda data: 12 + 4 * int.from_bytes(data[8:12], "little")
    mine, foreign = ours.read_bytes(), theirs.read_bytes()
    forged = mine[: tokens_end(mine)] + foreign[tokens_end(foreign) :]
    assert len(mine) >= header
    theirs.unlink()
    ours.unlink()
    name = ours.name.rsplit("-", 2)[0] + f"-{len(forged)}-{zlib.crc32(forged):08x}.kv"
    (ours.parent / name).write_bytes(forged)  # our tokens, another model's KV cache, checksummed
    answer = answer_unrestored(settings_for(smollm_path), saved, NEXT)
    assert answer == cold_answer(smollm_path, saved, NEXT)
    assert "llama.cpp could not load it" in logged()


def test_a_state_with_rotted_kv_data_is_ignored_and_the_answer_is_the_cold_one(
    tiny_phi3_path: Path,
) -> None:
    """NaN over the end of the KV data (the last layer's V), size and header intact: without the
    checksum llama.cpp loads it and the wired model's answer changes."""
    settings = load_settings(
        "cpu",
        overrides={
            "model": {"path": str(tiny_phi3_path)},
            "engine": {"n_ctx": 1024, "threads": 2, "state_cache_mb": 100},
            "sampling": {"temperature": 0.0, "max_tokens": 8},
        },
    )
    session = talk(settings, QUESTIONS)
    conversation = session.conversation_id
    session.close()
    assert conversation is not None
    (state,) = states()
    data = bytearray(state.read_bytes())
    data[-256:] = b"\xff" * 256  # f16 NaN
    state.write_bytes(data)
    session = talk(settings, [], conversation)
    try:
        assert "".join(session.send(NEXT)) == ANSWER  # what a cold read answers
        assert session.last_stats is not None and session.last_stats.restored_tokens == 0
    finally:
        session.close()
    assert re.search(r"phichat: ignoring KV state .*\.kv: checksum", logged())
    assert states() and states() != [state]  # removed, and the turn saved a sound one


def test_a_fifo_named_like_a_state_does_not_block_continue(smollm_config: Path) -> None:
    with smollm_config.open("a") as config:
        config.write("state_cache_mb = 100\n")  # [engine] is the last table
    flags = ["--config", str(smollm_config), "--temperature", "0", "--max-tokens", "8"]
    assert phichat(*flags, "--prompt", QUESTIONS[0]).returncode == 0
    with Store.open(default_path()) as store:
        conversation = store.conversations()[0].id
    (state,) = states()
    state.unlink()
    fifo = state.with_name(state.name.rsplit("-", 2)[0] + "-0-00000000.kv")  # its size: 0
    os.mkfifo(fifo)
    flags += ["--continue", str(conversation), "--prompt", NEXT, "--stats"]
    again = phichat(*flags, timeout=60)  # it used to wait in open() forever, deaf to signals
    assert again.returncode == 0, again.stderr
    assert "restored 0" in again.stderr and not fifo.exists()


def test_a_leftover_temporary_file_of_a_live_process_blocks_no_save(
    smollm_path: Path, saved: int
) -> None:
    (state,) = states()
    leftover = state.with_name(f".{state.name}.1.tmp")  # pid 1 is alive
    with leftover.open("wb") as handle:
        handle.truncate(200_000_000)  # sparse, over the 100 MB cap
    before = len(logged())
    talk(settings_for(smollm_path), [NEXT], saved).close()
    (new,) = [p for p in states() if p.suffix == ".kv"]
    assert new != state and leftover in states()  # saved; another's file left alone
    assert "could not save" not in logged()[before:]


def test_a_failed_save_keeps_the_good_state(
    smollm_path: Path, saved: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llama_cpp

    (state,) = states()
    monkeypatch.setattr(llama_cpp, "llama_state_seq_get_data", lambda *args: 0)
    before = len(logged())
    talk(settings_for(smollm_path), [NEXT], saved).close()
    assert "could not save the conversation's KV state" in logged()[before:]
    assert states() == [state]  # the good one, and no temporary file
