"""D2O's layer level: per-layer budgets by attention density, from a calibrated artifact.

    {"kind": "slimfx.d2o_budgets", "version": 1,
     "model": {"blocks", "hidden", "vocab", "fingerprint"},   (passes/_identity.py)
     "variance": [v_0, v_1, ...],     per attention site: variance of the attention mass
                                      each prompt key receives, mean over query heads
     "calibration": {...}}            how it was made (free-form)

Written by `slimfx calibrate d2o-budgets` (calibrate/d2o_budgets.py), read by the
kv_eviction pass for its d2o sites, refused for another model.

The rule (`shares`, `allocate`): the variances are min-max normalised over the layers
(v~ in [0, 1]), each layer gets the share softmax(-v~) of the total, and the total is the
sum of the budgets the sites would have had (so the KV held never exceeds the uniform
budget's): a dense layer (attention spread over many keys, low variance) keeps up to
e times the tokens of the sparsest one.

How this differs from the paper: D2O measures the variance on each prompt at prefill and
resizes every layer's cache for that prompt. Here a site's capacity is a static buffer
(one compiled graph per prompt bucket, decode steps captured in CUDA graphs), so the
densities are measured once, on calibration text, and the split is fixed per model; only
the total follows the prompt (`budget_fraction`). The authors' code min-max normalises
the head variances within each layer before averaging them; here the layer means are
normalised across layers, which keeps the absolute density differences between layers
that the allocation is about. The authors' clamp of a layer's ratio to [0.01, 1] becomes
a floor of the policy's smallest legal budget (sinks + window + 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from slimfx.compiler.artifacts import check_fields, read_json_artifact, write_json_artifact
from slimfx.compiler.config import ConfigError
from slimfx.passes._identity import IDENTITY_FIELDS, check_plan_model

PLAN_KIND = "slimfx.d2o_budgets"
PLAN_VERSION = 1
WRITTEN_BY = "slimfx calibrate d2o-budgets"
_FIELDS = {"kind": str, "version": int, "model": dict, "variance": list, "calibration": dict}


def validate_plan(plan, where: str) -> dict:
    """`plan` when it is a valid budget plan; else ValueError naming the first bad field."""
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND or plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{where}: not a {PLAN_KIND} v{PLAN_VERSION} file (written by `{WRITTEN_BY}`)")
    check_fields(plan, _FIELDS, where)
    check_fields(plan["model"], IDENTITY_FIELDS, where, "model.")
    values = plan["variance"]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{where}: field variance must be a non-empty list of finite numbers >= 0, one per attention layer")
    return plan


def write_plan(plan: dict, path) -> Path:
    """Validate and write `plan` atomically."""
    return write_json_artifact(validate_plan(plan, "plan"), path)


def load_plan(config, key: str, identity: dict | None, n_sites: int | None = None) -> list[float]:
    """The per-site variances of the plan `[artifacts] key` names, checked against the
    model `identity` describes and its number of attention sites (when given)."""
    if key not in config.artifacts:
        raise ConfigError(f"passes.kv_eviction.d2o_budgets: {key!r} is not a key of [artifacts]; allowed: the key of a "
                          f"file written by `{WRITTEN_BY}`, or 'none' for uniform budgets")
    path = config.artifact_path(key)
    where = f"passes.kv_eviction.d2o_budgets ({key} = {str(path)!r})"
    try:
        plan = validate_plan(read_json_artifact(path, WRITTEN_BY), f"plan {str(path)!r}")
    except ValueError as exc:
        raise ConfigError(f"artifacts.{key}: {exc}") from None
    if identity is not None:
        check_plan_model(plan, identity, where, WRITTEN_BY)
    if n_sites is not None and len(plan["variance"]) != n_sites:
        raise ConfigError(f"{where}: the plan has {len(plan['variance'])} layers; this model has {n_sites} attention sites; "
                          f"allowed: a plan from `{WRITTEN_BY}` for this model")
    return [float(v) for v in plan["variance"]]


def shares(variance: list[float]) -> torch.Tensor:
    """softmax(-v~) over the layers, v~ the variances min-max normalised to [0, 1]."""
    v = torch.tensor(variance, dtype=torch.float64)
    spread = v.max() - v.min()
    normalised = (v - v.min()) / spread if spread > 0 else torch.zeros_like(v)
    return torch.softmax(-normalised, dim=0)


def allocate(share: dict[int, float], total: int, minimum: int) -> dict[int, int]:
    """Integer budgets {site: tokens} in proportion to `share` (renormalised over the sites
    given), none below `minimum`, summing to exactly `total` (requires total >= minimum *
    sites). Sites clamped to the minimum leave the rest to the others; rounding gives the
    leftover tokens to the largest remainders (ties: lower site)."""
    sites = sorted(share)
    if total < minimum * len(sites):
        raise ConfigError(f"passes.kv_eviction.budget: a total of {total} tokens over {len(sites)} d2o sites; allowed: "
                          f">= {minimum * len(sites)} ({minimum} per site)")
    floored: set[int] = set()
    while True:
        free = [s for s in sites if s not in floored]
        room = total - minimum * len(floored)
        weight = sum(share[s] for s in free)
        exact = {s: room * share[s] / weight for s in free}
        low = {s for s, x in exact.items() if x < minimum}
        if not low:
            break
        floored |= low
    out = {s: minimum for s in floored}
    out.update({s: math.floor(x) for s, x in exact.items()})
    for s in sorted(exact, key=lambda s: (-(exact[s] - math.floor(exact[s])), s))[: total - sum(out.values())]:
        out[s] += 1
    return out


# ----------------------------------------------------------------------------- the pass's use


def min_budget(opts: dict) -> int:
    """The smallest budget the d2o policy accepts with these n_sink / window options."""
    from slimfx.passes.kv_eviction.policies import resolve_sinks

    b = 2
    while sum(resolve_sinks("d2o", b, opts["n_sink"], opts["window"])) + 1 > b:
        b += 1
    return b


def _d2o_sites(cfg, sites) -> list[int]:
    return [i for i in sites if cfg.for_layer(i)["policy"] == "d2o"]


def with_site_budgets(gm, cfg, ctx, sites: list[int]):
    """`cfg` (the pass's PassConfig) with the d2o sites' budgets replaced by `site_budgets`'
    split, as per-layer overrides that win over the configured ones."""
    from slimfx.compiler.config import PassConfig

    budgets = site_budgets(gm, cfg, ctx, sites)
    if not budgets:
        return cfg
    # "i-i" selects layer i alone after every configured selector (so it wins) without
    # replacing a configured "i" table's other options.
    return PassConfig(cfg.name, cfg.options, {**cfg.layer_overrides, **{f"{i}-{i}": {"budget": b} for i, b in budgets.items()}})


def site_budgets(gm, cfg, ctx, sites: list[int]) -> dict[int, int]:
    """{site: budget} for the d2o sites when `d2o_budgets` names a plan: the sum of their
    configured budgets split by the plan's shares (module doc); {} otherwise."""
    from slimfx.passes._identity import model_identity

    key, d2o = cfg.options["d2o_budgets"], _d2o_sites(cfg, sites)
    if key == "none" or not d2o:
        return {}
    anatomy = ctx.anatomy if ctx.anatomy is not None else ctx.refresh_anatomy(gm)
    variance = load_plan(ctx.config, key, model_identity(gm, anatomy, ctx.example_inputs), len(anatomy.attention_sites))
    share = shares(variance)
    total = sum(cfg.for_layer(i)["budget"] for i in d2o)
    return allocate({i: float(share[i]) for i in d2o}, total, max(min_budget(cfg.for_layer(i)) for i in d2o))


def check_artifacts(cfg, config, model=None, anatomy=None) -> None:
    """With policy 'd2o' at any layer and `d2o_budgets` set, the plan loads and validates;
    given the model and its anatomy, it was made for this model."""
    from slimfx.passes._identity import identity_of_model

    layers = ["all", *sorted(cfg.overridden_layers())]
    key = cfg.options["d2o_budgets"]
    if key == "none" or not any((cfg.options if l == "all" else cfg.for_layer(l))["policy"] == "d2o" for l in layers):
        return
    if anatomy is None:
        load_plan(config, key, None)
    else:
        load_plan(config, key, identity_of_model(model, anatomy), len(anatomy.attention_sites))
