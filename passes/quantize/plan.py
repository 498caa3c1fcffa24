"""The bit-allocation plan the quantize pass reads: its format and reader.

`slimfx calibrate bits` (calibrate/bits.py) writes it; `[passes.quantize] plan = "KEY"`
with `[artifacts] KEY = PATH` applies it. A JSON object:

    kind        "slimfx.bit_allocation"      version  1
    formats     {weight path: format spec}   what the pass applies (specs: passes/quantize/formats.py)
    linears     {weight path: {format, role, block, shape, options: {spec: {bytes, cost}}}}
    budget, calibration, totals              how the plan was made (printed by format_plan)
"""

from __future__ import annotations

from pathlib import Path

from slimfx.compiler.artifacts import read_json_artifact
from slimfx.compiler.errors import UsageError, echo

PLAN_KIND = "slimfx.bit_allocation"
PLAN_VERSION = 1


def read_plan(path) -> dict:
    """Load and validate a plan JSON; ValueError (one line) when it is not one."""
    from slimfx.passes.quantize.formats import parse_spec

    path = Path(path)
    plan = read_json_artifact(path, "slimfx calibrate bits")
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND or plan.get("version") != PLAN_VERSION:
        raise UsageError(f"plan {str(path)!r}: not a {PLAN_KIND} v{PLAN_VERSION} file")
    formats = plan.get("formats")
    if not isinstance(formats, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in formats.items()):
        raise UsageError(f"plan {str(path)!r}: 'formats' must map weight paths to format specs")
    for key, spec in formats.items():
        parse_spec(spec, f"plan {path.name}: formats[{echo(repr(key))}]")
    problem = _description_problem(plan)
    if problem:
        raise UsageError(f"plan {echo(repr(str(path)))}: {problem}; allowed: a plan as `slimfx calibrate bits` writes it")
    return plan


_TOTALS = ("linear_bytes", "linear_bytes_unquantized", "kv_bytes", "cost", "exact", "unit_bytes")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _description_problem(plan: dict) -> str | None:
    """What is wrong with the fields that describe how the plan was made (format_plan
    prints them; the pass reads only 'formats'), or None. Each is optional."""
    linears = plan.get("linears", {})
    if not isinstance(linears, dict):
        return "'linears' is not a table"
    for key, entry in linears.items():
        opts = entry.get("options") if isinstance(entry, dict) else None
        chosen = opts.get(entry.get("format")) if isinstance(opts, dict) and isinstance(entry.get("format"), str) else None
        if not (isinstance(chosen, dict) and _number(chosen.get("bytes")) and _number(chosen.get("cost"))):
            return f"linears[{echo(repr(key))}] lacks its format's bytes and cost"
    totals = plan.get("totals")
    if totals is not None and not (isinstance(totals, dict) and all(k in totals for k in _TOTALS)):
        return f"'totals' lacks one of {', '.join(_TOTALS)}"
    budget = plan.get("budget")
    if totals is not None and not (isinstance(budget, dict) and _number(budget.get("bytes"))):
        return "'budget' lacks 'bytes'"
    return None


def format_plan(plan: dict) -> str:
    """The plan as a text table: format and bytes per linear, then the totals."""
    from slimfx.compiler.passmanager import format_bytes
    from slimfx.compiler.tables import format_table

    rows = []
    linears = plan.get("linears") or {key: None for key in plan["formats"]}  # a hand-written plan has formats only
    for path, entry in linears.items():
        if entry is None:
            rows.append(["-", "?", path, plan["formats"][path], "-", "-"])
            continue
        opt = entry["options"][entry["format"]]
        rows.append([entry.get("block", "-") if entry.get("block") is not None else "-", entry.get("role", "?"), path,
                     entry["format"], format_bytes(opt["bytes"]), f"{opt['cost']:.2e}"])
    table = format_table(["block", "role", "weight", "format", "bytes", "output error"], rows)
    t = plan.get("totals")
    if t is None:
        return table
    return table + (
        f"\nlinears {format_bytes(t['linear_bytes'])} of {format_bytes(t['linear_bytes_unquantized'])} unquantized; "
        f"KV {format_bytes(t['kv_bytes'])}; budget {format_bytes(plan['budget']['bytes'])}; "
        f"summed output error {t['cost']:.3e}; {'exact' if t['exact'] else 'sizes rounded to ' + str(t['unit_bytes']) + ' B'}"
    )
