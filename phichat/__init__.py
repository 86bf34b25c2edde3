"""phichat: a private, local chat app for the terminal."""

__version__ = "0.1.0"
