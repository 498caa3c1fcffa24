"""Errors meant for the user: the CLI prints their one-line message and exits 2."""


class UsageError(ValueError):
    """Bad input (arguments, files, models): the message says what is wrong and what is allowed."""
