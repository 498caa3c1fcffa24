"""`--sweep KEY=V1,V2,...`: configurations that differ in one or more config values.

KEY is a dotted config path (`passes.kv_eviction.budget`) or a short alias whose first
part names a pass section (`kv.budget` -> `passes.kv_eviction.budget`). Several
`--sweep` flags give their cartesian product. Every point is validated by
`load_config`, so a misspelt key or a value out of range is the config's one-line
ConfigError, and a sweep over a pass the active pipeline does not run is refused
(it would draw a flat line that measures nothing).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from slimfx.compiler.config import ConfigError, load_config, set_path
from slimfx.measure.errors import UsageError

ALIASES = {"kv": "passes.kv_eviction", "vq": "passes.vq_logits", "quant": "passes.quantize",
           "skip": "passes.layer_skip", "share": "passes.kv_share"}


@dataclass
class SweepAxis:
    """One swept key: the text the user gave, the full config path, and its values."""

    key: str
    path: str
    values: list


@dataclass
class SweepPoint:
    """One configuration of the sweep: its label, the swept values, and the raw config dict."""

    label: str
    values: dict = field(default_factory=dict)  # user's key -> value
    raw: dict = field(default_factory=dict)


def expand_key(key: str) -> str:
    head, _, rest = key.partition(".")
    if head in ALIASES and rest:
        return f"{ALIASES[head]}.{rest}"
    return key


def parse_value(text: str):
    """'128' -> 128, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_axis(spec: str) -> SweepAxis:
    key, eq, values = spec.partition("=")
    key = key.strip()
    if not eq or not key or not values.strip():
        raise UsageError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. kv.budget=128,256,512)")
    parsed = [parse_value(v) for v in values.split(",") if v.strip()]
    if len(set(map(repr, parsed))) != len(parsed):
        raise UsageError(f"--sweep {spec!r}: a value is repeated")
    path = expand_key(key)
    if path.count(".") < 1:
        raise UsageError(f"--sweep {spec!r}: {key!r} is not a config option path; allowed: SECTION.OPTION, e.g. kv.budget or passes.kv_eviction.budget")
    return SweepAxis(key, path, parsed)


def _check_pipeline_runs(axis: SweepAxis, config) -> None:
    parts = axis.path.split(".")
    if parts[0] == "passes" and parts[1] not in config.pipeline:
        raise UsageError(
            f"--sweep {axis.key}: pass {parts[1]!r} is not in the active pipeline "
            f"{config.compile['pipeline']!r} ({', '.join(config.pipeline) or 'no passes'}); "
            f"add it to a pipeline in the config and select it with [compile] pipeline")


def check_pass_options(config) -> None:
    """Run the checks a pass makes at compile time (e.g. a KV budget below what its
    policy needs: sinks + window + 1) now, so a bad sweep fails before the model loads.
    Uses a pass's `check_config(pass_config)` when it has one (kv_eviction: its
    `_check_options`, the same function its run() calls)."""
    from slimfx.compiler.registry import registered_passes

    modules = registered_passes()
    for name in config.pipeline:
        module, pc = modules[name], config.pass_config(name)
        check = getattr(module, "check_config", None)
        if check is not None:
            check(pc)
            continue
        per_layer = getattr(module, "_check_options", None)
        if per_layer is not None:
            per_layer("all", pc.options)
            for layer in sorted(pc.overridden_layers()):
                per_layer(layer, pc.for_layer(layer))


def build_points(base_raw: dict, specs: list[str]) -> list[SweepPoint]:
    """Every configuration of the sweep (one point, the base, when `specs` is empty)."""
    axes = [parse_axis(s) for s in specs]
    paths = [a.path for a in axes]
    if len(set(paths)) != len(paths):
        raise UsageError("--sweep: the same key is swept twice")
    points = []
    for combo in itertools.product(*(a.values for a in axes)):
        raw = copy.deepcopy(base_raw)
        for axis, value in zip(axes, combo):
            try:
                set_path(raw, axis.path, value)
            except ConfigError as exc:
                raise UsageError(f"--sweep {axis.key}: {exc}") from None
        config = load_config(raw)  # ConfigError (one line) on unknown keys or bad values
        for axis in axes:
            _check_pipeline_runs(axis, config)
        check_pass_options(config)
        config.check_artifacts()  # every point's files load and validate before a model loads
        label = ", ".join(f"{a.key}={v}" for a, v in zip(axes, combo)) or f"slimfx: pipeline {config.compile['pipeline']}"
        points.append(SweepPoint(label, {a.key: v for a, v in zip(axes, combo)}, config.to_dict()))
    return points
