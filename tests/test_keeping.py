"""Conversations as people keep them (issue 20): roles, forks, continuing an answer cut short,
pins and the archive, and the draft in $EDITOR. The store and the config in-process; the
command line on the tiny wired Phi-3 (real llama.cpp, real saved states); the app on the
scripted engine with the real store, driven by Pilot."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine
from helpers import SIZE, Tmux, ask, notes, ready, store_conversations, until

from phichat.config import load_settings
from phichat.errors import PhichatError, UsageError
from phichat.session import ChatSession
from phichat.store import MIGRATIONS, Store, default_path
from phichat.tui.app import PhichatApp
from phichat.tui.chat import AnswerMessage, ChatView, UserMessage
from phichat.tui.prompt import PLACEHOLDER, PromptInput
from phichat.tui.screens import PickScreen
from phichat.tui.side import ConversationList, SidePane
from phichat.tui.status import StatusLine

CliRun = Callable[..., Any]


def stats_of(stderr: str) -> dict[str, int]:
    """prompt / cached / restored / generated token counts from a --stats line."""
    line = stderr.split("prompt tokens: ")[1]
    prompt, rest = line.split(" (cached ")
    cached, rest = rest.split(", restored ")
    restored, rest = rest.split("), generated tokens: ")
    return {
        "prompt": int(prompt),
        "cached": int(cached),
        "restored": int(restored),
        "generated": int(rest.split(",")[0]),
    }


def last_id(phichat_cli: CliRun) -> int:
    return int(json.loads(phichat_cli("history", "--json").stdout.splitlines()[0])["id"])


# --- the store ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store.open(tmp_path / "history.db") as opened:
        yield opened


def test_a_fork_holds_the_history_up_to_its_message_with_ids_recalled_and_vectors(
    store: Store,
) -> None:
    chat = store.create_conversation(title="Cats", role="writer")
    first = store.add_message(chat.id, "user", "my cat is Pixel")
    store.add_message(chat.id, "assistant", "A fine name.")
    old = store.add_message(chat.id, "assistant", "Replaced soon.")
    again = store.add_message(chat.id, "assistant", "Pixel it is.", replaces=[old.id])
    asked = store.add_message(chat.id, "user", "what is my cat called?", recalled=[first.id])
    store.add_message(chat.id, "assistant", "Pixel.")
    store.add_vectors("minilm", [(first.id, b"\x01" * 8), (asked.id, b"\x02" * 8)])

    fork = store.fork_conversation(chat.id, asked.id)
    assert (fork.title, fork.role, fork.parent, fork.forked_at) == (
        "Cats",
        "writer",
        chat.id,
        asked.id,
    )
    copied = store.messages(fork.id)
    assert [m.content for m in copied] == [
        "my cat is Pixel",
        "A fine name.",
        "Pixel it is.",
        "what is my cat called?",
    ]  # the replaced answer left out, nothing after the message
    assert copied[3].recalled == (copied[0].id,)  # the fork's own copy of what was recalled
    assert copied[2].created == again.created
    blobs = {
        message: blob for _, messages, blob in store.vector_chunks("minilm") for message in messages
    }
    assert copied[0].id in blobs and copied[3].id in blobs
    assert [m.content for m in store.messages(store.fork_conversation(chat.id).id)][-1] == "Pixel."

    other = store.create_conversation()
    stranger = store.add_message(other.id, "user", "elsewhere")
    for at in (stranger.id, old.id, 10_000):
        with pytest.raises(UsageError, match=f"message {at} is not in conversation {chat.id}"):
            store.fork_conversation(chat.id, at)
    with pytest.raises(UsageError, match="has no messages to fork"):
        store.fork_conversation(store.create_conversation().id)
    store.delete_conversation(chat.id)
    assert store.conversation(fork.id).parent is None  # the fork stands on its own
    with pytest.raises(PhichatError, match=f"no conversation {chat.id}"):
        store.fork_conversation(chat.id)


def test_pinned_ones_come_first_and_archived_ones_leave_the_list(store: Store) -> None:
    ids = [store.create_conversation(title=t).id for t in ("old", "pinned", "new")]
    store.set_pinned(ids[1], True)
    store.set_archived(ids[2], True)
    assert [c.title for c in store.conversations()] == ["pinned", "old"]
    assert [c.title for c in store.conversations(archived=True)] == ["pinned", "new", "old"]
    store.set_archived(ids[2], False)
    store.set_pinned(ids[1], False)
    assert [c.title for c in store.conversations()] == ["new", "pinned", "old"]
    store.set_role(ids[0], "coder")
    assert store.conversation(ids[0]).role == "coder"
    with pytest.raises(PhichatError, match="no conversation 99"):
        store.set_pinned(99, True)


def test_an_older_read_only_file_reads_without_roles_or_pins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "history.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for step in MIGRATIONS[:8]:  # as the phichat before roles and forks wrote it
        for statement in step:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 8")
    conn.execute("INSERT INTO conversations (title, created) VALUES ('before roles', 0)")
    conn.close()
    monkeypatch.setattr("phichat.store.os.access", lambda *args: False)  # cannot be written
    with Store.open(path) as store:
        assert store.read_only
        (listed,) = store.conversations()
        assert (listed.title, listed.role, listed.parent, listed.pinned) == (
            "before roles",
            None,
            None,
            False,
        )


# --- roles in the config -----------------------------------------------------------------------


def test_roles_ship_and_come_from_the_config_checked_by_key(tmp_path: Path) -> None:
    settings = load_settings("cpu")
    assert {"coder", "writer", "shell"} <= set(settings.roles)
    assert settings.roles["shell"].sampling["temperature"] == 0.0
    config = tmp_path / "roles.toml"
    config.write_text('[roles.pirate]\nsystem = "Talk like a pirate."\ntop_p = 0.5\n')
    pirate = load_settings("cpu", config).roles["pirate"]
    assert (pirate.system, pirate.sampling) == ("Talk like a pirate.", {"top_p": 0.5})
    for body, named in [
        ('[roles.pirate]\ncolour = "red"\n', "unknown key roles.pirate.colour"),
        ("[roles.pirate]\ntemperature = -1\n", "roles.pirate.temperature must be >= 0"),
        ('[roles.pirate]\ntemperature = "hot"\n', "roles.pirate.temperature must be a number"),
        ('[roles.pirate]\nsystem = "  "\n', "roles.pirate.system is blank"),
        ("[roles.pirate]\n", "[roles.pirate] sets nothing"),
        ('[roles]\npirate = "arr"\n', "[roles.pirate] must be a table"),
        ('[roles."a b"]\nsystem = "x"\n', "a role name is letters"),
    ]:
        config.write_text(body)
        with pytest.raises(UsageError, match=named.replace("[", r"\[").replace(".", r"\.")):
            load_settings("cpu", config)


def test_an_unknown_role_is_one_line_before_any_model(phichat_cli: CliRun) -> None:
    result = phichat_cli("--prompt", "Hi", "--role", "pirate")
    assert result.returncode == 2
    assert result.stderr == (
        "phichat: error: unknown role 'pirate' (known: coder, writer, shell;"
        " add it under [roles])\n"
    )
    assert phichat_cli("--role", "coder").returncode == 2  # the app chooses roles per chat
    assert phichat_cli("--more").stderr == "phichat: error: --more goes with --continue ID\n"


# --- the command line on a real model ----------------------------------------------------------


@pytest.mark.slow  # three answers, each a model loaded
def test_a_role_reaches_phi3_and_is_kept_with_the_conversation(
    tiny_phi3_path: Path, phichat_cli: CliRun
) -> None:
    plain = phichat_cli("--prompt", "Hi", "--stats")
    coder = phichat_cli("--prompt", "Hi", "--role", "shell", "--max-tokens", "40", "--stats")
    assert coder.stdout == "Hello world\n"
    # Phi-3's template drops system messages: the role's prompt leads the user turn instead
    assert stats_of(coder.stderr)["prompt"] > stats_of(plain.stderr)["prompt"] + 15
    record = json.loads(phichat_cli("export", str(last_id(phichat_cli)), "--format", "json").stdout)
    assert record["conversation"]["role"] == "shell"
    sampling = record["messages"][1]["sampling"]
    assert (sampling["temperature"], sampling["max_tokens"]) == (0.0, 40)  # the flag won
    assert "role shell" in phichat_cli("show", str(last_id(phichat_cli))).stdout
    system = phichat_cli("--prompt", "Hi", "--role", "shell", "--system", "Be brief.", "--stats")
    assert stats_of(system.stderr)["prompt"] < stats_of(coder.stderr)["prompt"]  # --system won


@pytest.mark.slow  # four answers, each a model loaded and a state saved
def test_continue_goes_on_in_the_same_message_reading_nothing_again(
    tiny_phi3_path: Path, phichat_cli: CliRun
) -> None:
    cut = phichat_cli("--prompt", "Hi", "--max-tokens", "1", "--stats")
    assert cut.stdout == "Hello\n"
    conversation = last_id(phichat_cli)
    more = phichat_cli("--continue", str(conversation), "--more", "--stats")
    assert (more.returncode, more.stdout) == (0, " world\n")
    stats = stats_of(more.stderr)
    # all of it restored from the saved state; only the last token written, never read, is read
    assert (
        stats["cached"]
        == stats["restored"]
        == stats["prompt"] - 1
        == stats_of(cut.stderr)["prompt"]
    )
    (_, answer) = json.loads(phichat_cli("export", str(conversation), "--format", "json").stdout)[
        "messages"
    ]
    assert (answer["content"], answer["tokens"], answer["status"]) == ("Hello world", 2, "finished")
    assert answer["sampling"]["finish"] == "end"

    phichat_cli("--prompt", "Hi", "--max-tokens", "2")  # "Hello world", its end not seen
    whole = last_id(phichat_cli)
    more = phichat_cli("--continue", str(whole), "--more", "--stats")
    # the context holds "Hello"; " world" (sampled, never read) is all that is read
    assert (more.stdout, stats_of(more.stderr)["prompt"] - stats_of(more.stderr)["cached"]) == (
        "\n",
        1,
    )
    with Store.open(default_path()) as store:
        assert [m.content for m in store.messages(whole)] == ["Hi", "Hello world"]

    again = phichat_cli("--continue", str(conversation), "--more")
    assert (again.returncode, again.stderr) == (
        2,
        "phichat: error: the last answer is finished: there is nothing to continue (regenerate"
        " answers it again)\n",
    )
    with Store.open(default_path()) as store:
        store.update_message(answer["id"], "Hello", status="stopped")
    with sqlite3.connect(default_path()) as conn:
        conn.execute("UPDATE messages SET model = 'other.gguf' WHERE id = ?", (answer["id"],))
    other = phichat_cli("--continue", str(conversation), "--more")
    assert other.returncode == 2 and "written by other.gguf" in other.stderr
    assert phichat_cli("--continue", "999", "--more").returncode == 1  # no such conversation


@pytest.mark.slow  # three answers, each a model loaded and a state saved
def test_a_fork_at_the_current_point_reads_only_its_new_message(
    tiny_phi3_path: Path, phichat_cli: CliRun
) -> None:
    phichat_cli("--prompt", "Hi")
    parent = last_id(phichat_cli)
    fork = phichat_cli("fork", str(parent))
    assert fork.returncode == 0
    child = int(fork.stdout)
    in_fork = stats_of(phichat_cli("--continue", str(child), "--prompt", "Again", "--stats").stderr)
    in_parent = stats_of(
        phichat_cli("--continue", str(parent), "--prompt", "Again", "--stats").stderr
    )
    assert in_fork == {**in_parent, "generated": in_fork["generated"]}
    assert in_fork["restored"] == in_fork["cached"] > 0  # the parent's saved state, shared

    listing = phichat_cli("history").stdout
    assert f"(fork of {parent})" in listing
    with Store.open(default_path()) as store:
        question = store.messages(parent)[0].id
    at_question = int(phichat_cli("fork", str(parent), "--at", str(question)).stdout)
    with Store.open(default_path()) as store:
        assert [m.content for m in store.messages(at_question)] == ["Hi"]
    wrong = phichat_cli("fork", str(parent), "--at", "999")
    assert (wrong.returncode, wrong.stderr.count("\n")) == (2, 1)
    assert "message 999 is not in conversation" in wrong.stderr
    gone = phichat_cli("fork", "999")
    assert gone.returncode == 1 and "no conversation 999" in gone.stderr


def test_history_shows_pins_and_the_archive_with_all(phichat_cli: CliRun) -> None:
    ids = store_conversations()
    with Store.open(default_path()) as store:
        store.set_pinned(ids["Bike repair"], True)
        store.set_archived(ids["Puppy food"], True)
    lines = phichat_cli("history").stdout.splitlines()
    assert "Bike repair  (pinned)" in lines[0]
    assert not any("Puppy food" in line for line in lines)
    every = phichat_cli("history", "--all").stdout
    assert "Puppy food  (archived)" in every
    assert len(phichat_cli("history", "--all", "--json").stdout.splitlines()) == 3


# --- in one process: a fork reuses the KV cache --------------------------------------------------


def test_a_fork_in_the_app_reuses_the_context_without_saved_states(
    tiny_phi3_path: Path, tmp_path: Path
) -> None:
    config = tmp_path / "no-states.toml"
    config.write_text("[engine]\nstate_cache_mb = 0\n")
    settings = load_settings("cpu", config)
    session = ChatSession.open(settings, remember=False)
    try:
        "".join(session.send("Hi"))
        parent = session.conversation_id
        session.fork()
        session.prepare()
        assert session.conversation_id != parent
        "".join(session.send("Again"))
        stats = session.last_stats
        assert stats is not None
        new = stats.prompt_tokens - stats.cached_tokens
        assert 0 < new <= 6 and stats.restored_tokens == 0  # <|end|><|user|>Again<|end|>...
    finally:
        session.close()


def test_a_conversation_whose_role_left_the_config_goes_on_without_one(
    fake_engine: FakeEngine, minilm_dir: Path
) -> None:
    with Store.open(default_path()) as store:
        kept = store.create_conversation(title="kept", role="writer").id
        gone = store.create_conversation(title="gone", role="pirate").id
    session = ChatSession.open(load_settings("cpu"), fake_engine, remember=False)
    try:
        session.switch(kept)
        assert session.role is not None and session.role.name == "writer"
        assert session.answer_sampling.temperature == 0.8
        session.switch(gone)
        assert session.role is None
        assert session.take_notices() == [
            "this conversation's role 'pirate' is no longer in the config: it goes on without one"
        ]
        with pytest.raises(UsageError, match="unknown role 'pirate'"):
            session.role_named("pirate")
    finally:
        session.close()


def test_continue_of_a_finished_answer_or_with_nothing_asked_is_refused(
    fake_engine: FakeEngine, minilm_dir: Path
) -> None:
    settings = load_settings("cpu")
    session = ChatSession.open(settings, fake_engine, remember=False)
    try:
        with pytest.raises(UsageError, match="no answer to continue"):
            next(session.continue_answer())
        "".join(session.send("Hi"))
        with pytest.raises(UsageError, match="the last answer is finished"):
            next(session.continue_answer())
    finally:
        session.close()


# --- the app -------------------------------------------------------------------------------


async def choose(pilot: Any, label: str) -> None:
    """Pick `label` in the PickScreen on top."""
    screen = pilot.app.screen
    assert isinstance(screen, PickScreen)
    labels = [label for _, label in screen.choices]
    screen.query_one("#choices").highlighted = labels.index(label)
    await pilot.press("enter")
    await pilot.pause()


@pytest.mark.slow
async def test_a_role_chosen_in_the_app_is_shown_sent_and_kept(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await pilot.press("f8")
        await choose(pilot, "coder")
        assert "role coder" in str(app.query_one(StatusLine).render())
        await ask(pilot, "Reverse a list")
        system = fake_engine.prompts[-1][0]
        assert system == {"role": "system", "content": session.settings.roles["coder"].system}
        assert session.answer_sampling.temperature == 0.2
        conversation = session.conversation(session.conversation_id or 0)
        assert conversation.role == "coder"
        await pilot.press("f8")
        await choose(pilot, "(no role)")
        assert session.conversation(conversation.id).role is None
        assert "role" not in str(app.query_one(StatusLine).render())


@pytest.mark.slow
async def test_continue_in_the_app_grows_the_same_answer(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted(max_tokens=3)
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await ask(pilot, "Say something")
        assert app.query_one(ChatView).last_answer().text == "This is the "  # type: ignore[union-attr]
        fake_engine.answer = lambda messages: (
            "scripted answer." if messages[-1]["role"] == "assistant" else "?"
        )
        await pilot.press("f12")
        await until(
            lambda: not app.chat.busy and fake_engine.prompts[-1][-1]["role"] == "assistant", "it"
        )
        await pilot.pause()
        assert fake_engine.prompts[-1][-1] == {"role": "assistant", "content": "This is the "}
        answers = app.query(AnswerMessage)
        assert [a.text for a in answers] == ["This is the scripted answer."]
        stored = session.messages(session.conversation_id or 0)
        assert [m.content for m in stored] == ["Say something", "This is the scripted answer."]
        assert stored[1].tokens == 5 and not stored[1].cut_short
        await pilot.press("f12")
        await pilot.pause()
        assert any("the last answer is finished" in note for note in notes(app))


@pytest.mark.slow
async def test_a_fork_opens_under_its_parent_from_a_key_and_a_message(
    scripted: Callable[..., PhichatApp], fake_engine: FakeEngine
) -> None:
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await ask(pilot, "First question")
        parent = session.conversation_id
        await pilot.press("f11")
        await until(lambda: session.conversation_id != parent, "the fork")
        await until(lambda: fake_engine.forked, "the engine told of the fork")
        fork = session.conversation(session.conversation_id or 0)
        assert (fork.parent, fork.message_count) == (parent, 2)
        await pilot.press("ctrl+o")
        listing = app.query_one(ConversationList)
        labels = [str(listing.get_option_at_index(i).prompt) for i in range(listing.option_count)]
        assert labels == ["First question  (2)", "↳ First question  (2)"]

        chat = app.query_one(ChatView)
        chat.focus()
        await pilot.press("up", "enter")  # the question's actions
        await choose(pilot, "Fork the conversation here")
        await until(
            lambda: session.conversation(session.conversation_id or 0).parent == fork.id, "it"
        )
        assert [w.text for w in app.query(UserMessage)] == ["First question"]
        assert not app.query(AnswerMessage)


@pytest.mark.slow
async def test_pin_and_archive_from_the_list_and_restore_from_search(
    scripted: Callable[..., PhichatApp],
) -> None:
    ids = store_conversations()
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        session = await ready(pilot)
        await pilot.press("ctrl+o")
        listing = app.query_one(ConversationList)

        def titles() -> list[str]:
            return [str(listing.get_option_at_index(i).prompt) for i in range(listing.option_count)]

        listing.highlighted = titles().index("Bike repair  (2)")
        await pilot.press("p")
        assert titles()[0] == "★ Bike repair  (2)"
        listing.highlighted = titles().index("Puppy food  (2)")
        await pilot.press("a")
        assert not any("Puppy food" in t for t in titles())
        assert session.conversation(ids["Puppy food"]).archived
        app.query_one(SidePane).post_message(SidePane.Open(ids["Puppy food"]))
        await until(lambda: session.conversation_id == ids["Puppy food"], "the archived one")
        await pilot.press("f14")  # restored
        assert any("Puppy food" in t for t in titles())
        await pilot.press("f13")  # both pinned: the most recent first
        assert titles()[:2] == ["★ Bike repair  (2)", "★ Puppy food  (2)"]
        await pilot.press("f13")
        assert "Puppy food  (2)" in titles()[2:]


EDITOR_SCRIPT = """#!/bin/sh
cp "$1" "$(dirname "$0")/seen.txt"
printf 'Written in the editor\\nover two lines\\n' > "$1"
"""


@pytest.mark.slow
async def test_the_editor_writes_the_draft_and_failures_keep_it(
    scripted: Callable[..., PhichatApp], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    editor = tmp_path / "editor.sh"
    editor.write_text(EDITOR_SCRIPT)
    editor.chmod(0o755)
    app = scripted()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        prompt.insert("my draft")
        for visual, editor_var, said in [
            (None, None, "set $VISUAL or $EDITOR"),
            (None, str(tmp_path / "missing-editor"), "could not be run"),
            ("false", str(editor), "the editor exited with status 1"),
            ("'unclosed", None, "cannot be read"),
        ]:
            for name, value in (("VISUAL", visual), ("EDITOR", editor_var)):
                if value is None:
                    monkeypatch.delenv(name, raising=False)
                else:
                    monkeypatch.setenv(name, value)
            await pilot.press("ctrl+backslash")
            assert prompt.text == "my draft"
            assert any(said in note for note in notes(app)), (said, notes(app))
        monkeypatch.delenv("VISUAL")
        monkeypatch.setenv("EDITOR", str(editor))
        await pilot.press("ctrl+backslash")
        assert prompt.text == "Written in the editor\nover two lines"
        assert (tmp_path / "seen.txt").read_text() == "my draft"


def test_every_new_action_has_keys_a_palette_label_and_a_readme_line() -> None:
    from dataclasses import fields

    from phichat.config import KeySettings, spec_of

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in ("role", "continue_answer", "fork", "pin", "archive", "editor"):
        field = next(f for f in fields(KeySettings) if f.name == name)
        assert spec_of(field).label and f"`{name}`" in readme


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_editor_round_trip_leaves_the_screen_as_it_was(
    smollm_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nprintf 'Written in the editor' > \"$1\"\n")
    editor.chmod(0o755)
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", str(editor))  # the tmux server starts with this environment
    exe = Path(sys.executable).parent / "phichat"
    done = tmp_path / "exit-code"
    tmux = Tmux(tmp_path / "tmux.sock")
    try:
        tmux.start(["sh", "-c", f"{exe} --config {smollm_config}; echo $? > {done}"])
        before = tmux.wait(lambda s: "· ready" in s, "the model").splitlines()
        tmux.keys("C-\\")
        after = tmux.wait(lambda s: "Written in the editor" in s, "the edited draft").splitlines()
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        box = next(i for i, line in enumerate(before) if PLACEHOLDER.split("(")[0] in line)
        assert changed == [box]  # only the message box: the app came back as it was
        tmux.keys("C-q")
        assert tmux.exit_code(done) == "0"
    finally:
        tmux.kill()
