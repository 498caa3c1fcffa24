"""Reading the JSON artifacts slimfx writes (bit plans, skip plans): one line for a file
that is missing or is not JSON, naming the command that writes a valid one."""

from __future__ import annotations

import json
from pathlib import Path

from slimfx.compiler.errors import UsageError


def read_json_artifact(path, written_by: str):
    """The parsed JSON at `path`; UsageError naming the file and `written_by` otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"plan {str(path)!r}: not found; allowed: a JSON plan written by `{written_by}`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"plan {str(path)!r}: not valid JSON ({exc})") from None
