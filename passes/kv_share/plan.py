"""The KV-sharing plan: a reader -> owner map calibrated for one model, as JSON.

    {"kind": "slimfx.kv_share_plan", "version": 1,
     "model": {"blocks", "hidden", "vocab", "fingerprint"},   (passes/_identity.py)
     "method": "kvsharer",
     "map": {"5": 4, ...},                                  reader layer -> owner layer
     "calibration": {...}}                                   how it was made (free-form)

Written by `slimfx calibrate share` (calibrate/kv_share.py), read by the kv_share pass,
refused for another model."""

from __future__ import annotations

import json
from pathlib import Path

from slimfx.compiler.artifacts import read_json_artifact
from slimfx.compiler.errors import UsageError
from slimfx.passes._identity import IDENTITY_FIELDS, check_plan_model, model_identity

PLAN_KIND = "slimfx.kv_share_plan"
PLAN_VERSION = 1
METHODS = ("kvsharer",)
WRITTEN_BY = "slimfx calibrate share"
_FIELDS = {"kind": str, "version": int, "model": dict, "method": str, "map": dict, "calibration": dict}


def validate_plan(plan, where: str) -> dict:
    """`plan` when it is a valid sharing plan; else ValueError naming the first bad field."""
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND or plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{where}: not a {PLAN_KIND} v{PLAN_VERSION} file (written by `{WRITTEN_BY}`)")
    for fields, table, prefix in ((_FIELDS, plan, ""), (IDENTITY_FIELDS, plan.get("model"), "model.")):
        for key, type_ in fields.items():
            if not isinstance(table.get(key), type_) or isinstance(table.get(key), bool):
                raise ValueError(f"{where}: field {prefix}{key} must be {type_.__name__}, got {table.get(key)!r:.40}")
    if plan["method"] not in METHODS:
        raise ValueError(f"{where}: method {plan['method']!r}; allowed: {', '.join(METHODS)}")
    n = plan["model"]["blocks"]
    for reader, owner in plan["map"].items():
        if not (reader.isdigit() and isinstance(owner, int) and not isinstance(owner, bool) and 0 <= owner < int(reader) < n):
            raise ValueError(f"{where}: field map must pair layers 'reader': owner with 0 <= owner < reader < {n}, got {reader!r}: {owner!r}")
    return plan


def read_plan(path) -> dict:
    plan = read_json_artifact(path, WRITTEN_BY)
    return validate_plan(plan, f"plan {str(path)!r}")


def write_plan(plan: dict, path) -> Path:
    """Validate and write `plan` atomically (a reader never sees half a plan)."""
    validate_plan(plan, "plan")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(out)
    return out


def load_plan(gm, ctx, key: str, anatomy) -> dict[int, int]:
    """The map of the plan `[artifacts] key` names, checked against the model behind `gm`."""
    path = ctx.config.artifact_path(key)
    where = f"passes.kv_share.plan ({key} = {str(path)!r})"
    try:
        plan = read_plan(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_plan_model(plan, model_identity(gm, anatomy, ctx.example_inputs), where, WRITTEN_BY)
    return {int(r): o for r, o in plan["map"].items()}


def format_plan(plan: dict) -> str:
    pairs = ", ".join(f"{r} reads {o}" for r, o in plan["map"].items()) or "none"
    cal = plan["calibration"]
    return (f"KV-sharing plan ({plan['method']}): {len(plan['map'])} of {plan['model']['blocks']} layers read another's KV: {pairs}\n"
            f"last hidden state similarity {cal['similarity']:.4f} (threshold {cal['threshold']}), {len(cal['tried'])} pairs tried")
