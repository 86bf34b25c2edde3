"""The one exception type the front ends turn into a one-line message and an exit code."""


class PhichatError(Exception):
    """A problem the user can act on: printed as one line, never as a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(PhichatError):
    """Bad input from the user (flags, config files, prompts): exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def describe(exc: BaseException) -> str:
    """One line for the user: a PhichatError's own message, else the type and the message."""
    if isinstance(exc, PhichatError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
