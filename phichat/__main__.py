"""The `phichat` command (and `python -m phichat`): stop signals are handled from its first line,
before anything else is imported, so Ctrl+C at any moment exits quietly (phichat.signals)."""

from phichat.signals import exit_at_once, ignore_from_now


def main() -> int:
    """Handle stop signals, then run the command line; its exit code stands, whatever signal
    comes while Python shuts down."""
    exit_at_once()
    from phichat.cli import main as cli_main

    code = cli_main()
    ignore_from_now()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
