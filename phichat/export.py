"""Export: one stored conversation as Markdown or as standard JSON.

JSON holds finite numbers only (`allow_nan=False`): a non-finite number that an older phichat
stored (a temperature of inf, say) is written as null. Text is written as it is, but for what
a terminal would obey or reorder (DEL, C1 controls, bidi overrides: `\\uNNNN`, as JSON allows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal, get_args

from phichat.store import Conversation, Message, Source, Status, Store, finite
from phichat.text import json_text

ExportFormat = Literal["md", "json"]
FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)


def export_conversation(store: Store, conversation_id: int, fmt: ExportFormat = "md") -> str:
    """One conversation as Markdown ('md') or JSON ('json') text (PhichatError for an unknown
    id)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    conversation = store.conversation(conversation_id)
    messages = store.messages(conversation_id)
    if fmt == "md":
        return to_markdown(conversation, messages)
    return to_json(conversation, messages, store.attachments(m.id for m in messages))


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def to_markdown(conversation: Conversation, messages: Sequence[Message]) -> str:
    """A conversation as Markdown: a heading, its facts, then one section per message."""
    facts = [f"conversation {conversation.id}", f"started {_when(conversation.created)}"]
    facts += [
        f"{name} {value}"
        for name, value in (
            ("model", conversation.model),
            ("device", conversation.device),
            ("role", conversation.role),
            ("knowledge", conversation.knowledge),
            ("fork of conversation", conversation.parent),
        )
        if value
    ]
    lines = [f"# {conversation.shown_title}", "", "_" + " · ".join(facts) + "_", ""]
    for message in messages:
        notes = [message.model] if message.model and message.model != conversation.model else []
        notes += ["stopped"] if message.status == Status.STOPPED else []
        notes += ["replaced"] if message.replaced else []
        note = f" ({', '.join(notes)})" if notes else ""
        lines += [f"## {message.role.capitalize()}{note}", "", message.content, ""]
    return "\n".join(lines)


def conversation_record(conversation: Conversation) -> dict[str, Any]:
    """A conversation's facts as JSON data (times as ISO 8601)."""
    times = {"created": _when(conversation.created), "updated": _when(conversation.updated)}
    return finite({**asdict(conversation), **times})


def to_json(
    conversation: Conversation,
    messages: Sequence[Message],
    attachments: dict[int, list[Source]] | None = None,
) -> str:
    """A conversation and its messages as a standard JSON document (times as ISO 8601); a
    message that carried files lists them (`attachments`: path, lines [first, last], whole)."""

    def record(m: Message) -> dict[str, Any]:
        files = [
            {"path": s.path, "lines": [s.first_line, s.last_line], "whole": s.whole}
            for s in (attachments or {}).get(m.id, [])
        ]
        return {
            **asdict(m),
            "created": _when(m.created),
            **({"attachments": files} if files else {}),
        }

    document = {
        "conversation": conversation_record(conversation),
        "messages": [record(m) for m in messages],
    }
    return json_text(finite(document), indent=2, allow_nan=False) + "\n"
