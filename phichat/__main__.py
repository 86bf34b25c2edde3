"""The `phichat` command (and `python -m phichat`): stop signals are handled from its first line,
before anything else is imported, so Ctrl+C at any moment exits quietly (phichat.signals)."""

from phichat.signals import exit_at_once


def main() -> int:
    """Handle stop signals, then run the command line."""
    exit_at_once()
    from phichat.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
