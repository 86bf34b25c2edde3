"""The Textual chat app. Imported only by `commands.run_tui`, so textual loads only for the TUI."""
