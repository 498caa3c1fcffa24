"""The one error type of the measurement commands: the CLI's own UsageError (a
ValueError), so `slimfx eval|bench` print `slimfx: error: <message>` and exit 2."""

from __future__ import annotations

from slimfx.compiler.errors import UsageError

__all__ = ["UsageError", "model_source"]


def model_source(spec):
    """resolve_model_source, with a missing model turned into a one-line UsageError."""
    from slimfx.runtime.models import ModelLoadError, resolve_model_source

    try:
        return resolve_model_source(spec)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
