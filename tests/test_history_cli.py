"""`phichat history --json` and `phichat search` for scripts (one conversation, queries from
stdin), run in-process on the real history with the real embedder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from phichat.embed import Embedder
from phichat.memory import Memory
from phichat.store import Store

if TYPE_CHECKING:
    from conftest import CliRun


def two_conversations() -> tuple[int, int]:
    """Two conversations that both talk about bicycle tyres; returns their ids."""
    with Store.open() as store:
        bikes = store.create_conversation()
        store.add_message(bikes.id, "user", "My bicycle tyre keeps going flat.")
        store.add_message(bikes.id, "assistant", "Patch the inner tube and check the rim tape.")
        store.add_message(bikes.id, "user", "And what about sourdough bread?")
        shop = store.create_conversation(title="Shopping list")
        store.add_message(shop.id, "user", "Buy a new tyre for the bicycle, and some flour.")
    return bikes.id, shop.id


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_history_json_is_one_line_per_conversation_as_export_describes_it(
    phichat_cli: CliRun,
) -> None:
    bikes, shop = two_conversations()

    result = phichat_cli("history", "--json")

    assert result.returncode == 0, result.stderr
    listed = json_lines(result.stdout)
    assert [c["id"] for c in listed] == [shop, bikes]  # most recently active first
    assert [c["title"] for c in listed] == ["Shopping list", "My bicycle tyre keeps going flat."]
    assert [c["message_count"] for c in listed] == [1, 3]
    for conversation in listed:
        exported = json.loads(
            phichat_cli("export", str(conversation["id"]), "--format", "json").stdout
        )
        assert conversation == exported["conversation"]
        assert conversation["created"] <= conversation["updated"]
        assert conversation["created"][:2] == "20" and conversation["created"][10] == "T"


def test_history_json_of_an_empty_history_is_empty(phichat_cli: CliRun) -> None:
    assert phichat_cli("history", "--json").stdout == ""


@pytest.mark.slow
def test_search_can_stay_within_one_conversation(minilm_dir: Path, phichat_cli: CliRun) -> None:
    bikes, shop = two_conversations()

    everywhere = json_lines(phichat_cli("search", "bicycle tyre", "--json").stdout)
    within = json_lines(
        phichat_cli("search", "bicycle tyre", "--conversation", str(bikes), "--json").stdout
    )
    text = phichat_cli("search", "bicycle tyre", "--conversation", str(shop)).stdout

    assert {hit["conversation"] for hit in everywhere} == {bikes, shop}
    assert {hit["conversation"] for hit in within} == {bikes}
    assert within[0]["content"] == "My bicycle tyre keeps going flat."
    assert text.splitlines()[0].startswith("  1. ")
    assert all(f"#{shop} " in line for line in text.splitlines())


def test_searching_an_unknown_conversation_is_one_line(
    minilm_dir: Path, phichat_cli: CliRun
) -> None:
    two_conversations()
    result = phichat_cli("search", "tyre", "--conversation", "99")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("phichat: error: no conversation 99 in ")


@pytest.mark.slow
def test_queries_from_stdin_carry_their_line_number(minilm_dir: Path, phichat_cli: CliRun) -> None:
    bikes, _ = two_conversations()
    queries = "flat bicycle tyre\n\n  \n?!\nsourdough bread\r\n"

    result = phichat_cli("search", "-", "-k", "2", "--json", stdin=queries)
    text = phichat_cli("search", "-", "-k", "2", "--conversation", str(bikes), stdin=queries)

    assert result.returncode == 0, result.stderr
    hits = json_lines(result.stdout)
    assert [(hit["query"], hit["rank"]) for hit in hits] == [(0, 1), (0, 2), (4, 1), (4, 2)]
    assert "flat" in hits[0]["content"] and "sourdough" in hits[2]["content"]
    assert list(hits[0])[:2] == ["query", "rank"]
    assert [line[:7] for line in text.stdout.splitlines()] == [
        "[0]   1",
        "[0]   2",
        "[4]   1",
        "[4]   2",
    ]


@pytest.mark.slow
def test_a_query_file_of_100000_lines_is_read_line_by_line_with_one_embedder(
    minilm_dir: Path, phichat_cli: CliRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_conversations()
    loads: list[str] = []
    for cls, name in ((Embedder, "load"), (Memory, "open")):
        original = getattr(cls, name)
        monkeypatch.setattr(
            cls,
            name,
            lambda *args, _o=original, _n=name, **kw: loads.append(_n) or _o(*args, **kw),
        )
    lines = [""] * 100_000
    for number in (0, 5_000, 99_999):
        lines[number] = f"tyre {number}"

    result = phichat_cli("search", "-", "-k", "1", "--json", stdin="\n".join(lines))

    assert result.returncode == 0, result.stderr
    assert [hit["query"] for hit in json_lines(result.stdout)] == [0, 5_000, 99_999]
    assert loads == ["load", "open"]


@pytest.mark.parametrize(
    ("stdin", "said"),
    [
        (b"tyre\n\xff\xfe\n", "stdin line 1 is not valid UTF-8 text"),
        (b"tyre\n\nflour\0sugar\n", "stdin line 2 must not contain NUL characters"),
        (b"tyre\n" + b"x" * (65 << 10) + b"\n", "stdin line 1 is longer than 64 KiB"),
    ],
)
def test_a_bad_query_line_stops_the_search_in_one_line(
    minilm_dir: Path, phichat_cli: CliRun, stdin: bytes, said: str
) -> None:
    two_conversations()
    result = phichat_cli(
        "search", "-", "-k", "1", "--json", stdin=stdin.decode("utf-8", "surrogateescape")
    )
    assert result.returncode == 2
    assert [hit["query"] for hit in json_lines(result.stdout)] == [0]  # what came before stands
    assert result.stderr == f"phichat: error: {said}\n"


HOSTILE = "see \x1b]52;c;aGk=\x07 then \x1b[2J and \x9b31m, keep\ttabs\nand lines"


def test_stored_terminal_escapes_are_shown_escaped_and_exported_exactly(
    phichat_cli: CliRun,
) -> None:
    with Store.open() as store:
        talk = store.create_conversation(title="title \x1b]52;c;aGk=\x07\x1b[2J")
        store.add_message(talk.id, "user", HOSTILE)
    listed = phichat_cli("history").stdout
    shown = phichat_cli("show", str(talk.id)).stdout
    found = phichat_cli("search", "-k", "1", "keep tabs").stdout
    for text in (listed, shown, found):  # nothing a terminal would obey: no ESC, BEL or CSI
        assert not {"\x1b", "\x07", "\x9b"} & set(text), text
    assert "title \\x1b]52;c;aGk=\\x07\\x1b[2J" in listed
    assert "see \\x1b]52;c;aGk=\\x07 then \\x1b[2J and \\x9b31m, keep\ttabs\nand lines" in shown
    assert "\\x1b]52;c;aGk=\\x07" in found
    # export writes exactly what was stored, escapes included
    assert HOSTILE in phichat_cli("export", str(talk.id)).stdout
    exported = json.loads(phichat_cli("export", str(talk.id), "--format", "json").stdout)
    assert exported["messages"][0]["content"] == HOSTILE
