"""Reading the JSON artifacts slimfx writes (bit plans, skip plans): one line for a file
that is missing or is not JSON, naming the command that writes a valid one."""

from __future__ import annotations

import json
from pathlib import Path

from slimfx.compiler.errors import UsageError, echo


def read_json_artifact(path, written_by: str):
    """The parsed JSON at `path`; UsageError naming the file and `written_by` otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text(), parse_constant=_no_constant)
    except FileNotFoundError:
        raise UsageError(f"plan {str(path)!r}: not found; allowed: a JSON plan written by `{written_by}`") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"plan {str(path)!r}: not valid JSON ({echo(exc, 200)})") from None
    except RecursionError:
        raise UsageError(f"plan {str(path)!r}: nested too deep; allowed: a JSON plan written by `{written_by}`") from None


def _no_constant(name: str):
    """Python's json reads NaN and Infinity, which are not JSON and no plan holds."""
    raise json.JSONDecodeError(f"{name} is not a JSON number; allowed: finite numbers", name, 0)


def check_fields(table, fields: dict, where: str, prefix: str = "") -> None:
    """ValueError naming the first key of `fields` ({name: type}) that `table` lacks or holds
    with another type (booleans are not numbers here)."""
    table = table if isinstance(table, dict) else {}
    for key, type_ in fields.items():
        value = table.get(key)
        if not isinstance(value, type_) or isinstance(value, bool):
            raise ValueError(f"{where}: field {prefix}{key} must be {type_.__name__}, got {value!r:.40}")


def write_json_artifact(data: dict, path) -> Path:
    """Write `data` as JSON atomically (a reader never sees half a file); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)
    return out
