"""Argument parsing and dispatch only: tui | --prompt | pull | history | show | search | export |
import."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import Field
from pathlib import Path
from typing import Any, NoReturn

from phichat import __version__
from phichat.config import (
    DEFAULT_PROMPT,
    DEVICES,
    SECTIONS,
    check_text,
    check_value,
    schema,
    spec_of,
    value_type,
)
from phichat.errors import PhichatError, UsageError
from phichat.text import clipped


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --ctx: --ctx must be ..." says the flag once: "--ctx must be ..."
        message = re.sub(r"^argument (\S+): \1(:?) ", r"\1\2 ", message)
        self.exit(2, f"phichat: error: {message}\n")


MAX_ID = 2**63 - 1  # SQLite's largest rowid
MAX_RESULTS = 10_000


def _shown(text: str) -> str:
    """User text quoted in an error, cut short: a 5000-digit number fits on one line."""
    return repr(clipped(text, 40))


INTEGER = re.compile(r"[+-]?[0-9]+")
NUMBER = re.compile(
    r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.I
)


def _number(text: str, kind: type) -> Any:
    """`text` as an int or a float, written strictly: ASCII digits, no '_' and no spaces (int()
    and float() also take "1_000", " 5 " and Arabic-Indic digits); ValueError otherwise."""
    if not (INTEGER if kind is int else NUMBER).fullmatch(text):
        raise ValueError(text)
    return kind(text)


def _count(name: str, high: int) -> Any:
    """An argparse type: an integer in [1, high]."""

    def parse(text: str) -> int:
        try:
            value = _number(text, int)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be an integer, not {_shown(text)}"
            ) from None
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{name} must be between 1 and {high}, not {_shown(text)}"
            )
        return value

    return parse


def _text(name: str) -> Any:
    """An argparse type: text that is valid UTF-8, without NULs."""

    def parse(text: str) -> str:
        try:
            return check_text(text, name)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _setting(section: str, f: Field[Any]) -> Any:
    """An argparse type for a schema setting: parsed, then checked against its bounds."""
    kind = value_type(SECTIONS[section], f.name)
    name = spec_of(f).flag or f.name

    def parse(text: str) -> Any:
        if kind is not str:
            try:
                value = _number(text, kind)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise argparse.ArgumentTypeError(
                    f"{name} must be {what}, not {_shown(text)}"
                ) from None
        else:
            value = text
        try:
            return check_value(SECTIONS[section], f, value, name)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options that work with every command (defaults suppressed on subcommands): the config
    file, the device, and every setting the schema gives a flag."""
    default: Any = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("model and device")
    group.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="FILE",
        help="a TOML config file layered over the device config",
    )
    group.add_argument(
        "--device",
        choices=[*DEVICES, "auto"],
        default=argparse.SUPPRESS if suppress else "auto",
        help="where the model runs: llama.cpp here, or the server given by --server or "
        "[server] url (default: auto, a GPU if llama.cpp has one, else cpu; never the server)",
    )
    group.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="show llama.cpp's log on stderr (with --prompt; the app only writes its log file)",
    )
    groups = {name: parser.add_argument_group(name) for name in ("sampling", "chat")}
    for section, f in schema():
        spec = spec_of(f)
        if spec.flag is None:
            continue
        bounds = f" ({spec.bounds()})" if spec.bounds() else ""
        groups.get(section, group).add_argument(
            spec.flag,
            type=_setting(section, f),
            default=default,
            dest=f"{section}.{f.name}",
            metavar=spec.metavar or {int: "N", float: "X"}[value_type(SECTIONS[section], f.name)],
            help=spec.help + bounds,
        )


def build_parser() -> argparse.ArgumentParser:
    """The phichat command line."""
    parser = _Parser(
        prog="phichat",
        description="A private, local chat app for the terminal (Phi-3-mini on llama.cpp).",
        epilog="With no command and no --prompt, phichat opens the chat app.",
    )
    parser.add_argument("--version", action="version", version=f"phichat {__version__}")
    parser.add_argument(
        "--prompt",
        nargs="?",
        const=DEFAULT_PROMPT,
        default=None,
        metavar="TEXT",
        help=f"answer one prompt on stdout and exit ('-' reads stdin; default: {DEFAULT_PROMPT!r})",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print token counts and speed to stderr after the answer",
    )
    parser.add_argument(
        "--continue",
        dest="continue_id",
        type=_count("--continue", MAX_ID),
        metavar="ID",
        help="carry conversation ID on (with --prompt, or --more)",
    )
    parser.add_argument(
        "--more",
        action="store_true",
        help="with --continue ID: go on with its last answer, stopped or cut at max tokens",
    )
    parser.add_argument(
        "--role",
        type=_text("--role"),
        metavar="NAME",
        help="answer as role NAME of [roles] (its system prompt and sampling; flags win)",
    )
    parser.add_argument(
        "--no-history", action="store_true", help="do not save a --prompt exchange in the history"
    )
    parser.add_argument("--no-log", dest="no_history", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        type=_text("-f"),
        metavar="FILE",
        help="attach a text file to --prompt (repeatable; a glob such as 'src/*.py'; '-' reads "
        "stdin): whole if it fits, else its parts most relevant to the prompt",
    )
    parser.add_argument(
        "--use",
        type=Path,
        metavar="DIR",
        help="with --prompt: make folder DIR the conversation's knowledge (indexed, only what "
        "changed); its parts most relevant to each message go with it (--continue keeps it)",
    )
    _global_options(parser, suppress=False)

    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    pull = commands.add_parser("pull", help="download the configured models ahead of time")
    history = commands.add_parser("history", help="list conversations")
    history.add_argument("--json", action="store_true", help="print JSON lines")
    history.add_argument("--all", action="store_true", help="archived conversations too")
    show = commands.add_parser("show", help="print one conversation")
    show.add_argument("id", type=_count("ID", MAX_ID))
    fork = commands.add_parser(
        "fork", help="copy a conversation up to a message into a new one; print its id"
    )
    fork.add_argument("id", type=_count("ID", MAX_ID))
    fork.add_argument(
        "--at",
        type=_count("--at", MAX_ID),
        metavar="MESSAGE_ID",
        help="the last message to keep (default: its last; ids: export --format json)",
    )
    search = commands.add_parser("search", help="find past messages by meaning")
    search.add_argument(
        "query", type=_text("query"), help="what to find ('-' reads one query a line from stdin)"
    )
    search.add_argument(
        "-k", type=_count("-k", MAX_RESULTS), default=10, help="results (default 10)"
    )
    search.add_argument(
        "--conversation",
        type=_count("--conversation", MAX_ID),
        metavar="ID",
        help="search conversation ID only",
    )
    search.add_argument("--json", action="store_true", help="print JSON lines")
    search.add_argument(
        "--files", action="store_true", help="search the indexed folders (phichat index)"
    )
    index = commands.add_parser(
        "index", help="index folders for `search --files` (again: only what changed)"
    )
    index.add_argument("folders", nargs="+", type=Path, metavar="DIR")
    _global_options(index, suppress=True)
    export = commands.add_parser("export", help="write one conversation as Markdown or JSON")
    export.add_argument("id", type=_count("ID", MAX_ID))
    export.add_argument("--format", choices=["md", "json"], default="md")
    imports = commands.add_parser(
        "import", help="add conversations from phichat's JSON export or ChatGPT's"
    )
    imports.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="`phichat export --format json` output or ChatGPT's conversations.json",
    )
    for sub in (pull, history, show, fork, search, export, imports):
        _global_options(sub, suppress=True)
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Flag values as config overrides, by section (None means: not given)."""
    overrides: dict[str, dict[str, Any]] = {}
    for section, f in schema():
        if spec_of(f).flag is not None:
            overrides.setdefault(section, {})[f.name] = getattr(args, f"{section}.{f.name}", None)
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point of the command line (phichat/__main__.py handles signals first)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from phichat import commands, output

        if args.command:
            code = commands.run_command(args, overrides_from(args))
        elif args.more:
            code = commands.run_more(args, overrides_from(args))
        elif args.prompt is not None:
            code = commands.run_prompt(args, overrides_from(args))
        elif args.files:
            raise PhichatError("-f attaches a file to --prompt", exit_code=2)
        elif args.use is not None:
            raise UsageError("--use goes with --prompt (in the app: /use DIR)")
        elif args.continue_id is not None:
            raise PhichatError("--continue goes with --prompt or --more", exit_code=2)
        elif args.role is not None:
            raise UsageError("--role goes with --prompt (in the app: the Role command)")
        else:
            code = commands.run_tui(args, overrides_from(args))
        output.flush()
        return code
    except PhichatError as exc:
        if str(exc):  # a closed stdout pipe ends quietly
            print(f"phichat: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("PHICHAT_DEBUG"):
            raise
        print(
            f"phichat: internal error: {type(exc).__name__}: {exc} "
            "(set PHICHAT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
