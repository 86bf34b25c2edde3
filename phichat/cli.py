"""Argument parsing and dispatch only: tui | --prompt | pull | history | show | search | export."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from phichat import __version__
from phichat.config import DEFAULT_PROMPT, DEVICES
from phichat.errors import PhichatError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"phichat: error: {message}\n")


def _number(kind: type, name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be {'an integer' if kind is int else 'a number'}, not {text!r}"
            ) from None

    return parse


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options that work with every command (defaults suppressed on subcommands)."""
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
        help="where llama.cpp runs (default: auto)",
    )
    group.add_argument(
        "--model-file",
        type=Path,
        default=default,
        metavar="PATH",
        help="a local GGUF instead of the Hub model",
    )
    group.add_argument(
        "--embedder-dir",
        type=Path,
        default=default,
        metavar="DIR",
        help="a local all-MiniLM-L6-v2 directory instead of the Hub model",
    )
    group.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="show llama.cpp's log on stderr (with --prompt; the app only writes its log file)",
    )
    sampling = parser.add_argument_group("sampling")
    for flag, kind, helptext in [
        ("--temperature", float, "0 is greedy"),
        ("--top-p", float, "nucleus sampling, in (0, 1]"),
        ("--repeat-penalty", float, "> 1 discourages repeats"),
        ("--repeat-last-n", int, "tokens the repeat penalty looks back over (-1: all)"),
        ("--seed", int, "fixed seed for repeatable answers (default: a fresh one each time)"),
        ("--max-tokens", int, "most tokens in one answer"),
        ("--ctx", int, "context window in tokens"),
    ]:
        sampling.add_argument(flag, type=_number(kind, flag), default=default, help=helptext)


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
    parser.add_argument("--system", metavar="TEXT", help="a system prompt")
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print token counts and speed to stderr after the answer",
    )
    parser.add_argument(
        "--continue",
        dest="continue_id",
        type=_number(int, "--continue"),
        metavar="ID",
        help="carry conversation ID on (with --prompt)",
    )
    parser.add_argument("--no-log", action="store_true", help="do not save a --prompt exchange")
    _global_options(parser, suppress=False)

    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    pull = commands.add_parser("pull", help="download the configured models ahead of time")
    commands.add_parser("history", help="list conversations")
    show = commands.add_parser("show", help="print one conversation")
    show.add_argument("id", type=_number(int, "ID"))
    search = commands.add_parser("search", help="find past messages by meaning")
    search.add_argument("query")
    search.add_argument("-k", type=_number(int, "-k"), default=10, help="results (default 10)")
    search.add_argument("--json", action="store_true", help="print JSON lines")
    export = commands.add_parser("export", help="write one conversation as Markdown or JSON")
    export.add_argument("id", type=_number(int, "ID"))
    export.add_argument("--format", choices=["md", "json"], default="md")
    for sub in (pull, commands.choices["history"], show, search, export):
        _global_options(sub, suppress=True)
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Flag values as config overrides (None means: not given)."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    model_file = get("model_file")
    embedder_dir = get("embedder_dir")
    return {
        "sampling": {
            "temperature": get("temperature"),
            "top_p": get("top_p"),
            "repeat_penalty": get("repeat_penalty"),
            "repeat_last_n": get("repeat_last_n"),
            "seed": get("seed"),
            "max_tokens": get("max_tokens"),
        },
        "engine": {"n_ctx": get("ctx")},
        "model": {"path": str(model_file) if model_file else None},
        "embedder": {"path": str(embedder_dir) if embedder_dir else None},
        "chat": {"system": get("system")},
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `phichat` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from phichat import commands

        if args.command:
            return commands.run_command(args, overrides_from(args))
        if args.prompt is not None:
            return commands.run_prompt(args, overrides_from(args))
        if args.continue_id is not None:
            raise PhichatError("--continue goes with --prompt", exit_code=2)
        return commands.run_tui(args, overrides_from(args))
    except PhichatError as exc:
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
