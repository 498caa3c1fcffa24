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
from slimfx.compiler.errors import UsageError

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
        parse_spec(spec, f"plan {path.name}: formats[{key!r}]")
    return plan


def format_plan(plan: dict) -> str:
    """The plan as a text table: format and bytes per linear, then the totals."""
    from slimfx.compiler.passmanager import format_bytes
    from slimfx.compiler.tables import format_table

    rows = []
    for path, entry in plan.get("linears", {}).items():
        opt = entry["options"][entry["format"]]
        rows.append([entry.get("block", "-") if entry.get("block") is not None else "-", entry.get("role", "?"), path,
                     entry["format"], format_bytes(opt["bytes"]), f"{opt['cost']:.2e}"])
    table = format_table(["block", "role", "weight", "format", "bytes", "output error"], rows)
    t = plan["totals"]
    return table + (
        f"\nlinears {format_bytes(t['linear_bytes'])} of {format_bytes(t['linear_bytes_unquantized'])} unquantized; "
        f"KV {format_bytes(t['kv_bytes'])}; budget {format_bytes(plan['budget']['bytes'])}; "
        f"summed output error {t['cost']:.3e}; {'exact' if t['exact'] else 'sizes rounded to ' + str(t['unit_bytes']) + ' B'}"
    )
