"""The chat flow with history: logging, --continue, history/show/search/export, long talks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import assert_one_line_error, phichat, wait_until

from phichat.config import load_settings
from phichat.llama_engine import LlamaEngine
from phichat.memory import Memory
from phichat.session import ChatSession
from phichat.store import Message, Store, default_path

if TYPE_CHECKING:
    from conftest import CliRun


@pytest.mark.slow
def test_prompts_are_logged_and_listed_shown_and_exported(
    tiny_phi3_path: Path, phichat_cli: CliRun
) -> None:
    logged = phichat_cli("--prompt", "How do I reverse a list in Python?", "--stats")
    assert logged.returncode == 0, logged.stderr
    assert phichat_cli("--prompt", "Quiet one", "--no-history").returncode == 0
    listing = phichat_cli("history")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == 1
    assert "How do I reverse a list in Python?" in lines[0] and "2 msgs" in lines[0]
    conversation = lines[0].split()[0]
    shown = phichat_cli("show", conversation).stdout
    assert "How do I reverse a list in Python?" in shown and "Hello world" in shown
    exported = json.loads(phichat_cli("export", conversation, "--format", "json").stdout)
    roles = [m["role"] for m in exported["messages"]]
    assert roles == ["user", "assistant"]
    drawn = int(logged.stderr.split("seed: ")[1].split()[0])  # a fresh one
    assert exported["messages"][1]["sampling"]["seed"] == drawn
    assert "Hello world" in phichat_cli("export", conversation, "--format", "md").stdout


@pytest.mark.slow
def test_continue_carries_a_conversation_on(tiny_phi3_path: Path, phichat_cli: CliRun) -> None:
    first = phichat_cli("--prompt", "Remember the number 42.", "--stats")
    conversation = phichat_cli("history").stdout.split()[0]
    second = phichat_cli("--continue", conversation, "--prompt", "Which number?", "--stats")
    assert second.stdout == "Hello world\n"
    prompt_tokens = [int(r.stderr.split("prompt tokens: ")[1].split()[0]) for r in (first, second)]
    assert prompt_tokens[1] > prompt_tokens[0] + 5
    shown = phichat_cli("show", conversation).stdout
    assert shown.index("Remember the number 42.") < shown.index("Which number?")
    assert len(phichat_cli("history").stdout.splitlines()) == 1


def test_unknown_conversation_and_bad_continue(tiny_phi3_path: Path, phichat_cli: CliRun) -> None:
    assert_one_line_error(phichat_cli("show", "99"), "no conversation 99")
    assert_one_line_error(phichat_cli("--continue", "99", "--prompt", "hi"), "no conversation 99")
    assert_one_line_error(phichat_cli("--continue", "1"), "--continue goes with --prompt")


@pytest.mark.slow
def test_search_ranks_the_on_topic_message_first(
    tiny_phi3_path: Path, minilm_dir: Path, phichat_cli: CliRun
) -> None:
    for prompt in (
        "What should I feed my new puppy?",
        "How do I fix a flat bicycle tyre?",
        "Recommend a sci-fi novel for the weekend.",
        "My build fails with error ERR_4711 in module loader.",
    ):
        assert phichat_cli("--prompt", prompt).returncode == 0
    result = phichat_cli("search", "repairing a punctured bike wheel", "-k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert "bicycle tyre" in lines[0] and lines[0].startswith("  1. 0.")
    rare = [
        json.loads(line) for line in phichat_cli("search", "ERR_4711", "--json").stdout.splitlines()
    ]
    assert "ERR_4711" in rare[0]["content"]
    assert [hit["rank"] for hit in rare] == list(range(1, len(rare) + 1))
    assert rare[0]["exact_words"] and 0 < rare[0]["similarity"] <= 1
    # every message is embedded before the search: each hit has its similarity; and only the
    # message with the word is an exact-words match
    assert all(hit["similarity"] is not None for hit in rare)
    assert [hit["exact_words"] for hit in rare] == [True] + [False] * (len(rare) - 1)


@pytest.mark.slow
def test_killed_mid_answer_keeps_the_answer_saved_as_it_grew(smollm_config: Path) -> None:
    first = phichat("--config", str(smollm_config), "--prompt", "Hi", "--max-tokens", "5")
    assert first.returncode == 0, first.stderr
    question = "Tell me a very long story about the sea."
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "phichat",
            "--config",
            str(smollm_config),
            "--prompt",
            question,
            "--max-tokens",
            "2000",
            "--temperature",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    with Store.open(default_path()) as store:

        def saved_answer() -> str:
            messages = store.messages(store.conversations()[0].id)
            return messages[-1].content if messages[-1].role == "assistant" else ""

        # saved again after its first words: a second passed
        wait_until(lambda: len(saved_answer()) >= 100 or process.poll() is not None, "the answer")
        assert process.poll() is None, "it ended before its answer was saved"
        process.send_signal(signal.SIGKILL)
        process.wait()
        printed = process.stdout.read()
        saved = [
            [(m.role, m.content, m.status) for m in store.messages(c.id)]
            for c in reversed(store.conversations())  # oldest first
        ]
    assert saved[0] == [("user", "Hi", "finished"), ("assistant", first.stdout[:-1], "finished")]
    (user, answer) = saved[1]
    assert user == ("user", question, "finished")
    assert answer[0] == "assistant" and answer[2] == "stopped"  # a killed stream reads as stopped
    assert len(answer[1]) >= 100 and printed.startswith(answer[1])


@pytest.mark.slow
def test_ctrl_c_saves_the_partial_answer_marked_stopped(smollm_config: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "phichat",
            "--config",
            str(smollm_config),
            "--prompt",
            "Write a long poem about autumn.",
            "--max-tokens",
            "2000",
            "--temperature",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.read(30)  # the answer is streaming
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=30)
    assert process.returncode == 130
    with Store.open(default_path()) as store:
        answer = store.messages(store.conversations()[0].id)[-1]
    assert (answer.role, answer.status) == ("assistant", "stopped")
    assert answer.content and first + rest == answer.content + "\n"  # saved what was shown


@pytest.mark.slow
def test_a_200_turn_conversation_fits_and_keeps_an_early_fact(
    tiny_phi3_path: Path, minilm_dir: Path
) -> None:
    settings = load_settings("cpu", overrides={"engine": {"n_ctx": 2048, "threads": 2}})
    engine = LlamaEngine.load(tiny_phi3_path, "cpu", settings.engine)
    with Store.open(default_path()) as store:
        conversation = store.create_conversation(title="long talk")
        turns = []
        for i in range(200):
            user = f"Turn {i}: tell me something about topic number {i} in astronomy."
            if i == 3:
                user = "By the way, my cat is named Pixel and she loves boxes."
            turns += [("user", user), ("assistant", f"Here is a fact about topic {i}.")]
        store.add_messages(conversation.id, turns)
    session = ChatSession.open(settings, engine, continue_id=conversation.id)
    try:
        fitted = session.fit("What is the name of my cat?")
        assert fitted.dropped > 0 and fitted.recalled > 0
        assert any("Pixel" in m["content"] for m in fitted.messages)
        assert "".join(session.send("What is the name of my cat?")) == "Hello world"
        assert session.last_stats is not None
        assert session.last_stats.prompt_tokens <= engine.n_ctx
    finally:
        session.close()


def test_an_embedder_that_cannot_load_is_reported_and_history_is_still_saved(
    tiny_phi3_path: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-minilm"
    settings = load_settings(
        "cpu",
        overrides={"engine": {"n_ctx": 512, "threads": 2}, "embedder": {"path": str(missing)}},
    )
    engine = LlamaEngine.load(tiny_phi3_path, "cpu", settings.engine)
    session = ChatSession.open(settings, engine)
    try:
        assert session.memory is not None
        assert session.memory.get(timeout=30) is not None  # exact-word search still works
        assert session.problem is not None and str(missing) in session.problem
        for text in ("first message", "second message"):
            assert "".join(session.send(text)) == "Hello world"
        assert [hit.message.content for hit in session.search("second")] == ["second message"]
    finally:
        session.close()
    with Store.open(default_path()) as store:
        contents = [m.content for m in store.messages(store.conversations()[0].id)]
    assert contents == ["first message", "Hello world", "second message", "Hello world"]


@pytest.mark.slow
def test_the_background_embedder_outlives_a_failure(
    tiny_phi3_path: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remember = Memory.remember
    calls: list[int] = []

    def fails_once(self: Memory, messages: list[Message]) -> int:
        calls.append(len(messages))
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return remember(self, messages)

    monkeypatch.setattr(Memory, "remember", fails_once)
    settings = load_settings("cpu", overrides={"engine": {"n_ctx": 512, "threads": 2}})
    engine = LlamaEngine.load(tiny_phi3_path, "cpu", settings.engine)
    session = ChatSession.open(settings, engine)
    memory, store = session.memory, session.store
    assert memory is not None and store is not None
    try:
        for text in ("first message", "second message", "third message"):
            assert "".join(session.send(text)) == "Hello world"
        memory.close()  # finishes what is queued
        assert session.problem is not None and "disk on fire" in session.problem
        indexed = memory.get()
        assert indexed is not None and indexed.embedder is not None
        unindexed = store.missing_vectors(indexed.embedder.model_id)
        assert session.history[-1].id not in [m.id for m in unindexed]
    finally:
        session.close()
