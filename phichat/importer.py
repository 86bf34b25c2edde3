"""Reading conversations to import: phichat's own JSON export and ChatGPT's conversations.json.

A file is read whole and checked whole before anything is stored, so a bad file imports nothing:
every problem is one UsageError naming the file and where ("conversation 3, message 5: ...";
both counted from 1; a ChatGPT message is named by its node id). An unreadable file is an I/O
error (exit 1). Each conversation gets a `source`, a hash of its messages and times, so
importing it again adds nothing.

phichat's export is `{"conversation": {...}, "messages": [...]}` (or a list of them) with ISO 8601
times; a message that carried files lists them (`attachments`, optional: exports from before
they were written import without them). ChatGPT's is a list of conversations whose `mapping`
is a tree of message nodes (an edit or a regenerate starts a branch); the branch shown, from
`current_node` up to the root, is kept, without what ChatGPT does not show: hidden and empty
messages, tool calls and tool output, images, reasoning. A ChatGPT message without a time
takes the one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from phichat.errors import PhichatError, UsageError
from phichat.store import Role, Source

MAX_FILE_BYTES = 256 << 20
MAX_MESSAGE_BYTES = 1 << 20
LAST_TIME = 32503680000.0  # 3000-01-01: any later "time" is not one
LAST_LINE = (1 << 63) - 1  # the largest line number SQLite stores
ROLES = tuple(role.value for role in Role)
CHATGPT_ROLES = (*ROLES, "tool")
CHATGPT_TEXT = ("text", "multimodal_text")  # other content types are not shown as text


@dataclass(frozen=True)
class ImportedMessage:
    """One message to import; `created` in Unix seconds; `replaced` by a regenerate or an edit;
    `attachments`: the files it carried."""

    role: Role
    content: str
    created: float
    replaced: bool = False
    attachments: tuple[Source, ...] = ()


@dataclass(frozen=True)
class ImportedConversation:
    """One conversation to import, with `source`: what makes it the same conversation again."""

    title: str
    created: float
    messages: tuple[ImportedMessage, ...]
    source: str


def read_conversations(path: Path) -> list[ImportedConversation]:
    """Every conversation in the export file at `path`, checked; UsageError (naming the file
    and where) for bad content, PhichatError (exit 1) when it cannot be read."""
    try:
        document = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path}: not JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from None
    except RecursionError:
        raise UsageError(f"{path}: not JSON this program can read (nested too deeply)") from None
    try:
        return _conversations(document)
    except _Bad as exc:
        raise UsageError(f"{path}: {exc}") from None


def _read_text(path: Path) -> str:
    """The file's text, refused before reading when it is too big, and unless it is UTF-8."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_FILE_BYTES:
                raise UsageError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB, too big")
            data = f.read(MAX_FILE_BYTES + 1)  # a pipe or a device has no size to check
    except IsADirectoryError:
        raise PhichatError(f"{path}: is a directory, not an export file") from None
    except OSError as exc:
        raise PhichatError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise UsageError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB, too big")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


class _Bad(Exception):
    """A problem in the document, with where it is."""


def _conversations(document: Any) -> list[ImportedConversation]:
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise _Bad("not a phichat or ChatGPT export (a JSON object or a list of them)")
    conversations = []
    for number, item in enumerate(document, start=1):
        where = f"conversation {number}"
        if isinstance(item, dict) and "mapping" in item:
            conversations.append(_chatgpt(item, where))
        elif isinstance(item, dict) and "messages" in item and "conversation" in item:
            conversations.append(_phichat(item, where))
        else:
            raise _Bad(f"{where}: neither a phichat export nor a ChatGPT conversation")
    return conversations


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """obj[key], which must be of `kind` (a bool is no number)."""
    if key not in obj:
        raise _Bad(f"{where}: no {key}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        name = _KINDS.get(kind, "a number") if isinstance(kind, type) else "a number"
        raise _Bad(f"{where}: {key} is not {name}")
    return value


_KINDS = {str: "text", list: "a list", dict: "an object", bool: "true or false"}


def _text(value: str, key: str, where: str) -> str:
    """Text that SQLite can store as UTF-8 (JSON can escape a lone surrogate), within bounds."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _Bad(f"{where}: {key} is not valid Unicode text (a lone surrogate)") from None
    if size > MAX_MESSAGE_BYTES:
        raise _Bad(f"{where}: {key} is longer than {MAX_MESSAGE_BYTES >> 20} MiB")
    return value


def _seconds(value: float, key: str, where: str) -> float:
    if not 0 <= value < LAST_TIME:  # nan and inf too
        raise _Bad(f"{where}: {key} {value!r} is not a time")
    return float(value)


def _iso_time(obj: dict[str, Any], where: str) -> float:
    """`created`, an ISO 8601 time as phichat exports it (no offset: local time)."""
    text = _get(obj, "created", str, where)
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        seconds = moment.timestamp()
    except (ValueError, OverflowError, OSError):
        raise _Bad(f"{where}: created {text!r} is not an ISO 8601 time") from None
    return _seconds(seconds, "created", where)


def _phichat(item: dict[str, Any], where: str) -> ImportedConversation:
    """One conversation as `phichat export --format json` writes it."""
    conversation = _get(item, "conversation", dict, where)
    title = _text(_get(conversation, "title", str, where), "title", where)
    created = _iso_time(conversation, where)
    messages = []
    for number, message in enumerate(_get(item, "messages", list, where), start=1):
        at = f"{where}, message {number}"
        if not isinstance(message, dict):
            raise _Bad(f"{at}: not an object")
        role = _get(message, "role", str, at)
        if role not in ROLES:
            raise _Bad(f"{at}: unknown role {role!r}")
        content = _text(_get(message, "content", str, at), "content", at)
        replaced = _get(message, "replaced", bool, at) if "replaced" in message else False
        files = _attachments(message, at)
        messages.append(
            ImportedMessage(Role(role), content, _iso_time(message, at), replaced, files)
        )
    return _conversation(title, created, messages)


def _attachments(message: dict[str, Any], at: str) -> tuple[Source, ...]:
    """The files a message carried, as phichat exports them: each a path, its lines [first,
    last] and whether it was whole (none where the export has no `attachments`)."""
    if "attachments" not in message:
        return ()
    sources = []
    for number, item in enumerate(_get(message, "attachments", list, at), start=1):
        where = f"{at}, attachment {number}"
        if not isinstance(item, dict):
            raise _Bad(f"{where}: not an object")
        path = _text(_get(item, "path", str, where), "path", where)
        if not path:
            raise _Bad(f"{where}: path is empty")
        lines = _get(item, "lines", list, where)
        if not (
            len(lines) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in lines)
            and 1 <= lines[0] <= lines[1] <= LAST_LINE
        ):
            raise _Bad(f"{where}: lines is not [first, last], line numbers from 1")
        sources.append(Source(path, lines[0], lines[1], _get(item, "whole", bool, where)))
    return tuple(sources)


def _chatgpt(item: dict[str, Any], where: str) -> ImportedConversation:
    """One conversation of ChatGPT's conversations.json: the branch shown, oldest first."""
    title = item.get("title") or ""
    if not isinstance(title, str):
        raise _Bad(f"{where}: title is not text")
    created = _seconds(_get(item, "create_time", (int, float), where), "create_time", where)
    mapping = _get(item, "mapping", dict, where)
    branch = _branch(mapping, _get(item, "current_node", str, where), where)
    messages: list[ImportedMessage] = []
    when = created
    for node_id, node in branch:
        message = node.get("message")
        if message is None:
            continue
        at = f"{where}, message {node_id!r}"
        if not isinstance(message, dict):
            raise _Bad(f"{at}: not an object")
        shown = _chatgpt_message(message, at)
        if message.get("create_time") is not None:
            when = _seconds(_get(message, "create_time", (int, float), at), "create_time", at)
        if shown is not None:
            messages.append(ImportedMessage(shown[0], _text(shown[1], "content", at), when))
    return _conversation(_text(title, "title", where), created, messages)


def _branch(
    mapping: dict[str, Any], node_id: str | None, where: str
) -> list[tuple[str, dict[str, Any]]]:
    """(id, node) from the root down to `node_id`, following each node's parent."""
    branch: list[tuple[str, dict[str, Any]]] = []
    while node_id is not None:
        node = mapping.get(node_id)
        if not isinstance(node, dict):
            raise _Bad(f"{where}: node {node_id!r} is not in its mapping")
        if len(branch) == len(mapping):
            raise _Bad(f"{where}: its messages form a loop at node {node_id!r}")
        branch.append((node_id, node))
        node_id = node.get("parent")
        if node_id is not None and not isinstance(node_id, str):
            raise _Bad(f"{where}: the parent of node {branch[-1][0]!r} is not a node id")
    return branch[::-1]


def _chatgpt_message(message: dict[str, Any], at: str) -> tuple[Role, str] | None:
    """(role, text) of a message ChatGPT shows; None for one it does not show."""
    role = _get(_get(message, "author", dict, at), "role", str, at)
    if role not in CHATGPT_ROLES:
        raise _Bad(f"{at}: unknown role {role!r}")
    content = _get(message, "content", dict, at)
    kind = _get(content, "content_type", str, at)
    metadata = message.get("metadata") or {}
    if (
        role == "tool"
        or message.get("recipient", "all") != "all"  # a call to a tool
        or (isinstance(metadata, dict) and metadata.get("is_visually_hidden_from_conversation"))
        or kind not in CHATGPT_TEXT
    ):
        return None
    parts = _get(content, "parts", list, at)
    text = "\n".join(part for part in parts if isinstance(part, str))  # images are objects
    return (Role(role), text) if text.strip() else None


def _conversation(
    title: str, created: float, messages: list[ImportedMessage]
) -> ImportedConversation:
    """A conversation with its source: a hash of its times (in whole seconds, as phichat
    exports them) and messages (not what they carried), so one exported again and imported is
    known too, as is one imported from an export without its attachments."""
    canonical = [
        int(created),
        [[m.role.value, m.content, int(m.created), m.replaced] for m in messages],
    ]
    digest = hashlib.sha256(
        json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    )
    return ImportedConversation(title, created, tuple(messages), f"sha256:{digest.hexdigest()}")
