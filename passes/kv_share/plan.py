"""The KV-sharing plan: a reader -> owner map calibrated for one model, as JSON.

    {"kind": "slimfx.kv_share_plan", "version": 1,
     "model": {"blocks", "hidden", "vocab", "fingerprint"},   (passes/_identity.py)
     "method": "kvsharer" | "minicache",
     "map": {"5": 4, ...},                                  reader layer -> owner layer
     "calibration": {...}}                                   how it was made (free-form)

Written by `slimfx calibrate share` (calibrate/kv_share.py), read by the kv_share pass,
refused for another model."""

from __future__ import annotations

from pathlib import Path

from slimfx.compiler.artifacts import check_fields, read_json_artifact, write_json_artifact
from slimfx.compiler.config import ConfigError
from slimfx.passes._identity import IDENTITY_FIELDS, check_plan_model

PLAN_KIND = "slimfx.kv_share_plan"
PLAN_VERSION = 1
METHODS = ("kvsharer", "minicache")
WRITTEN_BY = "slimfx calibrate share"
_FIELDS = {"kind": str, "version": int, "model": dict, "method": str, "map": dict, "calibration": dict}


def validate_plan(plan, where: str) -> dict:
    """`plan` when it is a valid sharing plan; else ValueError naming the first bad field."""
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND or plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{where}: not a {PLAN_KIND} v{PLAN_VERSION} file (written by `{WRITTEN_BY}`)")
    check_fields(plan, _FIELDS, where)
    check_fields(plan["model"], IDENTITY_FIELDS, where, "model.")
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
    return write_json_artifact(validate_plan(plan, "plan"), path)


def load_plan(config, key: str, identity: dict | None) -> dict[int, int]:
    """The map of the plan `[artifacts] key` names, checked against the model `identity`
    describes (when given)."""
    path = config.artifact_path(key)
    where = f"passes.kv_share.plan ({key} = {str(path)!r})"
    try:
        plan = read_plan(path)
    except ValueError as exc:
        raise ConfigError(f"artifacts.{key}: {exc}") from None
    if identity is not None:
        check_plan_model(plan, identity, where, WRITTEN_BY)
    return {int(r): o for r, o in plan["map"].items()}


def format_plan(plan: dict) -> str:
    pairs = ", ".join(f"{r} reads {o}" for r, o in plan["map"].items()) or "none"
    cal = plan["calibration"]
    head = f"KV-sharing plan ({plan['method']}): {len(plan['map'])} of {plan['model']['blocks']} layers read another's KV: {pairs}"
    if plan["method"] == "minicache":
        sims = {(p["reader"], p["owner"]): p["similarity"] for p in cal.get("pairs", [])}
        chosen = [sims[(int(r), o)] for r, o in plan["map"].items() if (int(r), o) in sims]
        return head + (f"\nKV cosine similarity of the chosen pairs {min(chosen):.3f}-{max(chosen):.3f}"
                       f" (all adjacent pairs {min(sims.values()):.3f}-{max(sims.values()):.3f})" if chosen else "")
    return head + f"\nlast hidden state similarity {cal['similarity']:.4f} (threshold {cal['threshold']}), {len(cal['tried'])} pairs tried"
