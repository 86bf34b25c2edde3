"""Export: one stored conversation as Markdown or as standard JSON.

JSON holds finite numbers only (`allow_nan=False`): a non-finite number that an older phichat
stored (a temperature of inf, say) is written as null.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from phichat.store import Conversation, Message, Status, Store, finite

FORMATS = ("md", "json")


def export_conversation(store: Store, conversation_id: int, fmt: str = "md") -> str:
    """One conversation as Markdown ('md') or JSON ('json') text (PhichatError for an unknown
    id)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    conversation = store.conversation(conversation_id)
    messages = store.messages(conversation_id)
    return to_markdown(conversation, messages) if fmt == "md" else to_json(conversation, messages)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def to_markdown(conversation: Conversation, messages: Sequence[Message]) -> str:
    """A conversation as Markdown: a heading, its facts, then one section per message."""
    facts = [f"conversation {conversation.id}", f"started {_when(conversation.created)}"]
    facts += [
        f"{name} {value}"
        for name, value in (("model", conversation.model), ("device", conversation.device))
        if value
    ]
    lines = [f"# {conversation.title or 'Untitled'}", "", "_" + " · ".join(facts) + "_", ""]
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


def to_json(conversation: Conversation, messages: Sequence[Message]) -> str:
    """A conversation and its messages as a standard JSON document (times as ISO 8601)."""
    document = {
        "conversation": conversation_record(conversation),
        "messages": [{**asdict(m), "created": _when(m.created)} for m in messages],
    }
    return json.dumps(finite(document), ensure_ascii=False, indent=2, allow_nan=False) + "\n"
