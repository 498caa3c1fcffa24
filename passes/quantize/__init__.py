"""Weight-only quantization of the linears the anatomy finds (lossy).

Needs: ctx.anatomy (the backend computes it) and the graph's example inputs (dynamo
passes parameters as placeholders; `get_attr` weights are read from the module).
Runs after structural passes that remove linears (layer skipping, KV sharing), so
that no dead weight is quantized; before code generation.

For every `F.linear` node of the anatomy the pass picks a format (a bit-allocation
plan's entry when `plan` names one, else the per-layer options), quantizes the
weight at compile time (passes/quantize/formats.py), registers the packed tensors as
buffers of the GraphModule and replaces the node by the matching op of
passes/quantize/op.py (slimfx::qlinear_int8 / _int4 / _fp8). Linears a format
cannot take (in_features not a multiple of the group; fp8 on a GPU without it) are
left in their original precision and named in the notes.

What it saves: the bytes of weight the graph reads per step (`bytes_saved`). The
model's own parameters stay allocated unless the caller frees them; the graph no
longer reads them. The LM head is kept unless `include_head` (a tied head shares
its bytes with the embedding, which stays). Embeddings are not quantized.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
import torch.fx

from slimfx.compiler.anatomy import LinearInfo, shape_of, weight_source
from slimfx.compiler.config import ConfigError, Option
from slimfx.compiler.passmanager import PassContext, PassResult
from slimfx.passes._graph import bind_tensor, graph_input_value

NAME = "quantize"
DESCRIPTION = "weight-only int8 / int4 group-wise (HQQ) / fp8 linears, per layer or from a bit-allocation plan (lossy)"
LOSSY = True
OPTIONS: dict = {
    "format": Option(str, "int8", "weight format of the linears", choices=("none", "int8", "int4", "fp8")),
    "group_size": Option(int, 128, "int4 group size along in_features", choices=(32, 64, 128)),
    "hqq": Option(bool, True, "int4: refine zero points with HQQ (no data needed)"),
    "include_head": Option(bool, False, "also quantize the LM head (with the global options)", per_layer=False),
    "plan": Option(str, "none", "artifact key of a bit-allocation plan (slimfx calibrate), or 'none'", per_layer=False),
}


# ----------------------------------------------------------------------------- weights


def linear_weight_node(node: torch.fx.Node):
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def linear_bias_node(node: torch.fx.Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def weight_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node, example_inputs) -> torch.Tensor | None:
    """The real weight tensor a linear node reads, or None when it is computed in the graph.

    Dynamo passes parameters as placeholders (their values are in example_inputs, in
    placeholder order); older graphs use get_attr."""
    w = linear_weight_node(node)
    src = weight_source(w) if isinstance(w, torch.fx.Node) else None
    if src is None:
        return None
    value = graph_input_value(gm, src, example_inputs)
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or tuple(value.shape) != shape_of(w):
        return None  # reached through a transpose or reshape: not the [N, K] weight itself
    return value.detach()


# Quantized weights outlive one graph: dynamo compiles a new graph per input shape,
# and re-quantizing (HQQ is iterative) on every recompile would cost seconds and memory.
_CACHE: "weakref.WeakKeyDictionary[torch.Tensor, dict]" = weakref.WeakKeyDictionary()


def quantize_cached(w: torch.Tensor, spec, hqq: bool):
    from slimfx.passes.quantize.formats import quantize

    per_weight = _CACHE.setdefault(w, {})
    key = (spec.name, hqq, w._version)
    if key not in per_weight:
        per_weight.clear()  # an older version of the weight: drop it
        per_weight[key] = quantize(w, spec, hqq=hqq)
    return per_weight[key]


# ----------------------------------------------------------------------------- choices


def load_plan(path: Path) -> dict[str, str]:
    """A plan's {weight path: format spec}; ConfigError for a missing or malformed file."""
    from slimfx.passes.quantize.plan import read_plan

    try:
        return read_plan(path)["formats"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"passes.quantize.plan: {exc}") from None


def _plan(cfg, config, anatomy) -> dict[str, str] | None:
    """The plan `cfg` names (None for 'none'), checked against `anatomy` when given."""
    key = cfg.options["plan"]
    if key == "none":
        return None
    plan = load_plan(config.artifact_path(key))
    if anatomy is not None:
        check_plan_matches(plan, anatomy, f"artifacts.{key}")
    return plan


def check_artifacts(cfg, config, model=None, anatomy=None) -> None:
    """The bit plan loads and validates; with an anatomy, names only linears the model has."""
    _plan(cfg, config, anatomy)


def _choose(info: LinearInfo, cfg, plan: dict | None, device: torch.device):
    """(FormatSpec, hqq) for one linear, or (None, why-not)."""
    from slimfx.passes.quantize.formats import FormatSpec, fp8_supported, parse_spec

    opts = cfg.for_layer(info.block) if info.block is not None else cfg.options
    if plan is not None:
        if info.weight not in plan:
            return None, f"{info.weight}: not in the plan (kept)"
        spec = parse_spec(plan[info.weight], f"plan entry {info.weight}")
    elif info.role == "lm_head" and not cfg.options["include_head"]:
        return None, None  # the head is kept by default; not worth a note
    else:
        spec = FormatSpec(opts["format"], opts["group_size"] if opts["format"] == "int4" else None)
    if spec.kind == "none":
        return None, None
    why = spec.unsupported_reason(info.out_features, info.in_features)
    if why is None and spec.kind == "fp8":
        ok, why = fp8_supported(device)
        why = None if ok else why
    if why:
        return None, f"{info.weight}: {spec.name} skipped ({why})"
    return spec, opts["hqq"]


def check_plan_matches(plan: dict[str, str], anatomy, where: str) -> None:
    """A plan names linears by module path; entries this graph lacks are an error, not a
    no-op. A graph without an LM head is a piece of a model split by graph breaks: there
    only a plan matching none of its linears is refused."""
    have = {info.weight for info in anatomy.linears}
    missing = sorted(set(plan) - have - set(anatomy.removed_weights))  # a removed block's linears are not missing
    whole_model = anatomy.lm_head is not None
    if missing and (whole_model or len(missing) == len(plan)):
        examples = ", ".join(sorted(have)[:3]) + (", ..." if len(have) > 3 else "")
        raise ConfigError(
            f"{where}: {len(missing)} of {len(plan)} plan entries name no linear of this model "
            f"(first: {missing[0]!r}); the model's linears are named like {examples} "
            f"(was the plan made for another model? `slimfx calibrate bits` writes one for this one)"
        )


# ----------------------------------------------------------------------------- rewrite


def _rewrite(gm, node: torch.fx.Node, qw, prefix: str) -> None:
    from slimfx.passes.quantize.op import op_for

    x = node.args[0] if node.args else node.kwargs["input"]
    bias = linear_bias_node(node)
    t = {k: bind_tensor(gm, f"{prefix}_{k}", v, node) for k, v in qw.tensors.items()}
    if qw.spec.kind == "int4":
        args = (x, t["qweight"], t["scale"], t["offset"], qw.spec.group_size, bias)
    else:
        args = (x, t["qweight"], t["scale"], bias)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op_for(qw.spec.kind), args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    import slimfx.passes.quantize.op  # noqa: F401  registers torch.ops.slimfx.qlinear_*

    anatomy = ctx.anatomy if ctx.anatomy is not None else ctx.refresh_anatomy(gm)
    if not anatomy.linears:
        return PassResult.skipped(NAME, "the anatomy found no linears")
    plan_key = cfg.options["plan"]
    plan = _plan(cfg, ctx.config, anatomy)
    by_name = {n.name: n for n in gm.graph.nodes}
    notes, chosen, saved, head_saved = [], {}, 0, 0
    for i, info in enumerate(anatomy.linears):
        node = by_name.get(info.node)
        w = weight_tensor(gm, node, ctx.example_inputs) if node is not None else None
        if w is None:
            notes.append(f"{info.weight}: weight is not a parameter of the graph (kept)")
            continue
        spec, hqq_or_why = _choose(info, cfg, plan, w.device)
        if spec is None:
            if hqq_or_why:
                notes.append(hqq_or_why)
            continue
        qw = quantize_cached(w, spec, hqq_or_why)
        _rewrite(gm, node, qw, f"_slimfx_q{i}")
        delta = w.numel() * w.element_size() - qw.nbytes()
        chosen[info.weight] = {"format": spec.name, "bytes": qw.nbytes(), "orig_bytes": w.numel() * w.element_size(), "block": info.block, "role": info.role}
        if info.role == "lm_head":
            head_saved += delta
        else:
            saved += delta
    if not chosen:
        return PassResult(NAME, applied=False, sites_matched=len(anatomy.linears), notes=notes or ["every linear kept its format"])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    counts = {}
    for entry in chosen.values():
        counts[entry["format"]] = counts.get(entry["format"], 0) + 1
    notes.insert(0, "lossy: " + ", ".join(f"{n} x {f}" for f, n in sorted(counts.items())) + (f" (plan {plan_key})" if plan else ""))
    return PassResult(
        NAME, applied=True, sites_matched=len(anatomy.linears), nodes_rewritten=len(chosen),
        bytes_saved=saved + head_saved, notes=notes,
        details={"linears": chosen, "footprint": {"weight_bytes_saved": saved, "head_bytes_saved": head_saved}},
    )
