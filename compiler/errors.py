"""Errors meant for the user: the CLI prints their one-line message and exits 2."""

import contextlib


class UsageError(ValueError):
    """Bad input (arguments, files, models): the message says what is wrong and what is allowed."""


@contextlib.contextmanager
def user_errors():
    """Re-raise a slimfx user error (every one is a ValueError defined in slimfx) that
    dynamo wrapped in BackendCompilerFailed while compiling, as itself: the caller sees
    the one line that names what is wrong, not five lines of dynamo's wrapper."""
    try:
        yield
    except Exception as exc:
        inner = getattr(exc, "inner_exception", None)
        if type(exc).__name__ == "BackendCompilerFailed" and is_user_error(inner):
            raise inner from None
        raise


def is_user_error(exc) -> bool:
    """A slimfx error meant for the user (its message names what is wrong and what is allowed)."""
    return isinstance(exc, ValueError) and type(exc).__module__.startswith("slimfx.")
