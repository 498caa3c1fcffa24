"""Errors meant for the user: the CLI prints their one-line message and exits 2."""

import contextlib
import functools


class UsageError(ValueError):
    """Bad input (arguments, files, models): the message says what is wrong and what is allowed."""


# An error line echoes what the user gave (keys, paths, values); a 1 MB key must not
# make a 1 MB line, nor a newline or an escape code in it break the line or the terminal.
# Long enough for real paths whole (a temporary folder under pytest-xdist is ~110 characters).
MAX_ECHO = 300
MAX_LINE = 2000


def echo(text, limit: int = MAX_ECHO) -> str:
    """`text` as it may appear inside an error line: control characters escaped, cut to `limit`."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(message) -> str:
    """An error message as one printable line of at most MAX_LINE characters."""
    return echo(message, MAX_LINE)


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


@functools.cache
def _unwrapped_type(cls: type) -> type:
    """`cls` that dynamo also takes for one of its own errors (ShortenTraceback): those
    reach the caller of a compiled model as they are, where any other exception a
    backend raises arrives wrapped in BackendCompilerFailed. Same name and module, so
    the caller's `except ConfigError` and the printed line are those of `cls`."""
    from torch._dynamo.exc import ShortenTraceback

    # str() is the line slimfx made: dynamo appends its advice to a passing error's args.
    return type(cls.__name__, (cls, ShortenTraceback), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                          "__str__": lambda self: self.slimfx_line})


def through_dynamo(exc: Exception) -> Exception:
    """A slimfx user error raised inside a dynamo backend, made to pass dynamo unwrapped."""
    try:
        cls = _unwrapped_type(type(exc))
    except (ImportError, TypeError):  # a dynamo without ShortenTraceback: the wrapper stays
        return exc
    out = cls.__new__(cls, *exc.args)
    out.args = exc.args
    out.slimfx_line = str(exc)
    out.__dict__.update(exc.__dict__)
    out.first_useful_frame = None  # ShortenTraceback keeps the traceback from this frame
    return out
