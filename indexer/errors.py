"""The error a user can cause and fix; the CLI prints it as one line and exits with code 2."""


class UsageError(Exception):
    """Bad arguments or inputs (not a bug: bugs stay tracebacks)."""
