"""A conversation that outgrows the window: each turn reads only what is new (the kept turns
stay a stable prefix, the recall travels with its message), and background embedding never
competes with an answer. Real llama.cpp on the tiny Phi-3 (Phi-3's tokenizer and template)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import assert_one_line_error, phichat, wait_until

from phichat.config import Settings, load_settings
from phichat.llama_engine import LlamaEngine
from phichat.memory import RECALL_OPEN
from phichat.session import ChatSession
from phichat.store import Store, default_path

FACT = "By the way, my cat is named Pixel and she sleeps in a cardboard box."
QUESTION = "What is the name of my cat and where does she sleep?"
SLACK = 16  # template tokens around a message, and an answer re-tokenized differently


def filler(i: int) -> str:
    """A user message of about 40 tokens on a topic of its own."""
    topics = ["rivers", "volcanoes", "bridges", "orchards", "lighthouses", "glaciers", "bakeries"]
    topic = topics[i % len(topics)]
    return (
        f"Message {i}: tell me something about {topic} and their history, how people "
        f"lived near the {topic} a century ago, and what changed for them since then."
    )


def settings_with(recall_tokens: int, n_ctx: int = 1024) -> Settings:
    return load_settings(
        "cpu",
        overrides={
            "engine": {"n_ctx": n_ctx, "threads": 2},
            "sampling": {"temperature": 0.0, "max_tokens": 8},
            "chat": {"recall_tokens": recall_tokens},
        },
    )


@pytest.fixture
def session(tiny_phi3_path: Path, minilm_dir: Path) -> Iterator[ChatSession]:
    settings = settings_with(recall_tokens=96, n_ctx=2048)
    engine = LlamaEngine.load(tiny_phi3_path, "cpu", settings.engine)
    opened = ChatSession.open(settings, engine)
    yield opened
    opened.close()
    engine.close()


def count_tokens(session: ChatSession, text: str) -> int:
    return session.engine.count_tokens(text)


@pytest.mark.slow
def test_after_overflow_each_turn_reads_only_the_new_message_and_its_recall(
    session: ChatSession,
) -> None:
    overflowed = slides = 0
    first_kept = None
    for i in range(80):
        text = FACT if i == 2 else filler(i)
        assert "".join(session.send(text)) == "Hello world"
        fitted, stats = session.last_fit, session.last_stats
        assert fitted is not None and stats is not None
        reread = stats.prompt_tokens - stats.cached_tokens
        if not fitted.dropped:
            assert reread <= count_tokens(session, text) + SLACK
            continue
        overflowed += 1
        if fitted.messages[0]["content"] != first_kept:  # the cut moved: all is read again
            slides += 1
            first_kept = fitted.messages[0]["content"]
            continue
        # the new message, its recall, the last answer: never the kept turns again
        assert reread <= count_tokens(session, fitted.messages[-1]["content"]) + SLACK
        assert reread <= count_tokens(session, text) + 96 + SLACK
    assert overflowed >= 40
    # the cut moves half a window at a time: a turn costs at most ~170 tokens of 2048
    assert slides <= overflowed // 5


@pytest.mark.slow
def test_the_recall_sits_before_the_new_message_and_stays_with_it(
    session: ChatSession, tiny_phi3_path: Path
) -> None:
    first_kept = []
    for i in range(60):  # up to a turn that moved the cut, so the next two keep it
        assert "".join(session.send(FACT if i == 2 else filler(i)))
        assert session.last_fit is not None
        first_kept.append(session.last_fit.messages[0]["content"])
        if i >= 40 and first_kept[-1] != first_kept[-2]:
            break
    assert session.last_fit.dropped > 4  # FACT is long gone
    "".join(session.send(QUESTION))
    fitted = session.last_fit
    assert fitted is not None and fitted.recalled >= 1
    asked = fitted.messages[-1]["content"]
    assert asked.startswith(RECALL_OPEN) and asked.endswith(QUESTION)  # earlier context first
    assert FACT in asked
    assert all(FACT not in m["content"] for m in fitted.messages[:-1])
    # the next turn shows the question exactly as it was sent, and reads on from there
    "".join(session.send(filler(99)))
    after = session.last_fit
    assert after is not None and after.messages[-3]["content"] == asked
    assert after.messages[: len(fitted.messages)] == fitted.messages
    stats = session.last_stats
    assert stats is not None
    reread = stats.prompt_tokens - stats.cached_tokens
    assert reread <= count_tokens(session, filler(99)) + 96 + SLACK
    # an answer given again is given to the same prompt, recall included
    assert "".join(session.regenerate())
    assert session.last_fit is not None and session.last_fit.messages == after.messages
    # kept in the history: a new process shows the question with the same recall
    conversation = session.conversation_id
    assert conversation is not None
    with Store.open(default_path()) as store:
        question = next(m for m in store.messages(conversation) if m.content == QUESTION)
    assert question.recalled == fitted.recall
    reopened = ChatSession.open(session.settings, session.engine, continue_id=conversation)
    try:
        assert (
            reopened.fit("One more thing.").messages[: len(after.messages) - 1]
            == (after.messages[:-1])
        )
    finally:
        reopened.close()


@pytest.mark.slow
def test_recall_tokens_is_honoured(tiny_phi3_path: Path, minilm_dir: Path) -> None:
    blocks = {}
    for budget in (0, 48, 160):
        settings = settings_with(recall_tokens=budget)
        engine = LlamaEngine.load(tiny_phi3_path, "cpu", settings.engine)
        session = ChatSession.open(settings, engine)
        try:
            for i in range(30):
                "".join(session.send(FACT if i == 2 else filler(i)))
            fitted = session.fit(QUESTION)
            assert fitted.dropped > 0
            block = count_tokens(session, fitted.messages[-1]["content"]) - count_tokens(
                session, QUESTION
            )
            assert block <= budget
            blocks[budget] = (block, fitted.recalled)
        finally:
            session.close()
            engine.close()
    assert blocks[0] == (0, 0)
    assert 0 < blocks[48][0] < blocks[160][0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("[chat]\nrecall_tokens = -1\n", "chat.recall_tokens must be >= 0"),
        ('[chat]\nrecall_tokens = "lots"\n', "chat.recall_tokens must be an integer, not str"),
        ("[chat]\nrecall_tokens = 1.5\n", "chat.recall_tokens must be an integer, not float"),
    ],
)
def test_a_bad_recall_budget_is_one_line(tmp_path: Path, config: str, fragment: str) -> None:
    path = tmp_path / "recall.toml"
    path.write_text(config)
    result = phichat("--config", str(path), "--prompt", "hi")
    assert result.returncode == 2
    assert_one_line_error(result, str(path), fragment)


def test_the_device_configs_set_a_small_recall_on_cpu_and_a_larger_one_on_gpus() -> None:
    from phichat.config import apply_layer, packaged_config, parse_toml

    budgets = {
        device: apply_layer(
            Settings(device=device), parse_toml(packaged_config(device), device), device
        ).chat.recall_tokens
        for device in ("cpu", "cuda", "metal")
    }
    assert 0 < budgets["cpu"] < budgets["cuda"] == budgets["metal"]


@pytest.mark.slow
def test_the_embedder_waits_while_an_answer_is_written_then_catches_up(
    tiny_phi3_path: Path, minilm_dir: Path
) -> None:
    with Store.open(default_path()) as store:
        old = store.create_conversation(title="old")
        store.add_messages(old.id, [("user", filler(i)) for i in range(50)])  # to backfill
    settings = settings_with(recall_tokens=0, n_ctx=512)
    engine = LlamaEngine.load(tiny_phi3_path, "cpu", settings.engine)
    session = ChatSession.open(settings, engine)
    assert session.memory is not None and session.store is not None
    backlog = session.store.missing_vectors
    answer = session.send("Where do lighthouses usually stand?")
    try:
        assert next(answer) == "Hello"  # the engine is writing the answer
        memory = session.memory.get(timeout=60)
        assert memory is not None and memory.embedder is not None
        model_id = memory.embedder.model_id
        # with work to do (the backfill, the question) it waits, or, were it not to, embeds
        wait_until(
            lambda: session.memory.waiting.is_set() or len(backlog(model_id, 100)) < 51,
            "the embedder to wait or to embed",
        )
        assert session.memory.waiting.is_set()
        assert len(backlog(model_id, 100)) == 51  # nothing was embedded meanwhile
        assert "".join(answer) == " world"
        # then it catches up, the answer included
        wait_until(lambda: not backlog(model_id, 1), "the embedder to catch up")
        assert not session.memory.waiting.is_set()
        hits = session.search("lighthouses", conversation_id=session.conversation_id)
        assert [hit.message.content for hit in hits][:1] == ["Where do lighthouses usually stand?"]
        assert all(hit.similarity is not None for hit in hits)  # found by meaning too
    finally:
        answer.close()  # a failed check leaves it open, holding the engine
        session.close()
        engine.close()
