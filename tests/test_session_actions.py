"""Regenerate, edit-and-resend and switching models in the chat core, on the real store and real
llama.cpp models: nothing replaced is lost, and a conversation moves between models cleanly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tiny_phi3 import ANSWER

from phichat.config import DEFAULT_MODEL, PHI3_FILE, Settings, load_settings
from phichat.errors import PhichatError, UsageError
from phichat.session import ChatSession
from phichat.store import Store, default_path

pytestmark = pytest.mark.slow  # a real model loaded for every test


def smollm_settings(config: Path, **sampling: object) -> Settings:
    values = {"temperature": 0.9, "max_tokens": 24, **sampling}
    return load_settings("cpu", config, {"sampling": values})


@pytest.fixture
def session(smollm_config: Path) -> Iterator[ChatSession]:
    opened = ChatSession.open(smollm_settings(smollm_config), remember=False)
    yield opened
    opened.close()


def stored(session: ChatSession) -> list[tuple[str, bool]]:
    assert session.conversation_id is not None
    return [(m.role, m.replaced) for m in session.messages(session.conversation_id)]


def test_regenerate_keeps_the_old_answer_marked_replaced(session: ChatSession) -> None:
    first = "".join(session.send("Tell me a short story about a cat."))
    second = "".join(session.regenerate())
    assert first and second and second != first  # a fresh seed: another answer
    assert stored(session) == [("user", False), ("assistant", True), ("assistant", False)]
    messages = session.messages(session.conversation_id)  # type: ignore[arg-type]
    assert [messages[1].content, messages[2].content] == [first, second]
    assert messages[1].sampling["seed"] != messages[2].sampling["seed"]  # type: ignore[index]
    assert [m.content for m in session.history] == [messages[0].content, second]
    context = [m["content"] for m in session.fit("And then?").messages]
    assert first not in context and second in context
    word = max(first.split(), key=len).strip(".,!?\"'")
    found = session.store.keyword_search(word)  # type: ignore[union-attr]
    assert messages[1].id in [message_id for message_id, _ in found]  # still searchable


def test_regenerate_stopped_before_its_first_token_changes_nothing(session: ChatSession) -> None:
    answer = "".join(session.send("Name a colour."))
    stop = threading.Event()
    stop.set()
    assert "".join(session.regenerate(stop)) == ""
    assert stored(session) == [("user", False), ("assistant", False)]
    assert session.history[-1].content == answer


def test_edit_last_replaces_the_exchange_and_keeps_it(session: ChatSession) -> None:
    "".join(session.send("What is the capital of Frnace?"))
    "".join(session.send("And of Itly?"))
    answer = "".join(session.edit_last("And of Italy?"))
    assert stored(session) == [
        ("user", False),
        ("assistant", False),
        ("user", True),
        ("assistant", True),
        ("user", False),
        ("assistant", False),
    ]
    assert [m.content for m in session.history][-2:] == ["And of Italy?", answer]
    assert len(session.history) == 4
    context = [m["content"] for m in session.fit("Thanks").messages]
    assert "And of Itly?" not in context and "And of Italy?" in context


def test_nothing_to_regenerate_or_edit_in_a_new_conversation(session: ChatSession) -> None:
    with pytest.raises(UsageError, match="no message to answer again"):
        "".join(session.regenerate())
    with pytest.raises(UsageError, match="no message to edit"):
        "".join(session.edit_last("hello"))


def test_a_reopened_conversation_leaves_replaced_messages_out_of_the_context(
    session: ChatSession,
) -> None:
    "".join(session.send("Pick a number."))
    "".join(session.regenerate())
    conversation = session.conversation_id
    assert conversation is not None
    session.new_conversation()
    session.switch(conversation)
    assert [m.role for m in session.history] == ["user", "assistant"]
    assert not any(m.replaced for m in session.history)


def test_switching_models_answers_with_the_new_one_in_its_own_template(
    smollm_config: Path, tiny_phi3_path: Path
) -> None:
    settings = smollm_settings(smollm_config, temperature=0.0)
    session = ChatSession.open(settings, remember=False)
    try:
        smol = "".join(session.send("Say something."))
        assert smol != ANSWER
        phi3 = load_settings("cpu", overrides={"model": {"name": DEFAULT_MODEL}}).model
        session.switch_model(replace(settings, model=phi3))
        assert session.engine.model_label == PHI3_FILE
        fitted = session.fit("And now?")
        assert "".join(session.send("And now?")) == ANSWER
        stats = session.last_stats
        assert stats is not None and stats.cached_tokens == 0  # nothing of the old model's cache
        expected = session.engine.prompt_tokens(fitted.messages)  # type: ignore[attr-defined]
        assert stats.prompt_tokens == len(expected)  # the whole talk, in Phi-3's format
        messages = session.messages(session.conversation_id)  # type: ignore[arg-type]
        assert [m.model for m in messages] == [None, settings.model.file, None, PHI3_FILE]
        assert messages[1].content == smol
    finally:
        session.close()


def test_a_model_that_fails_to_load_leaves_the_old_one_answering(
    smollm_config: Path, tmp_path: Path
) -> None:
    settings = smollm_settings(smollm_config, temperature=0.0)
    broken = tmp_path / "broken.gguf"
    broken.write_text("not a model")
    session = ChatSession.open(settings, remember=False)
    try:
        before = "".join(session.send("Hello there."))
        bad = load_settings("cpu", smollm_config, {"model": {"path": str(broken)}})
        with pytest.raises(PhichatError, match="not a GGUF model file"):
            session.switch_model(bad)
        assert session.settings.model == settings.model
        session.new_conversation()
        assert "".join(session.send("Hello there.")) == before
    finally:
        session.close()
    with Store.open(default_path()) as store:
        assert len(store.conversations()) == 2


def test_editing_the_first_message_renames_the_conversation_after_it(session: ChatSession) -> None:
    "".join(session.send("Whta is a haiku?"))
    "".join(session.edit_last("What is a haiku?"))
    assert session.conversation_id is not None
    assert session.conversation(session.conversation_id).title == "What is a haiku?"
    session.rename(session.conversation_id, "Poems")
    "".join(session.edit_last("What is a sonnet?"))  # a name given by hand stays
    assert session.conversation(session.conversation_id).title == "Poems"


def test_exports_keep_replaced_answers_marked(session: ChatSession) -> None:
    "".join(session.send("Name a planet."))
    "".join(session.regenerate())
    assert session.conversation_id is not None
    markdown = session.export(session.conversation_id)
    assert markdown.count("## Assistant") == 2
    assert "## Assistant (replaced)" in markdown
