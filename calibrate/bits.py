"""Per-linear bit allocation (HAWQ-V3 style): sensitivity x candidate formats, then an
exact multiple-choice knapsack under a byte budget. Produces a plan (JSON artifact;
its format and reader: passes/quantize/plan.py) that the quantize pass reads
(`[passes.quantize] plan = "KEY"`, `[artifacts] KEY = PATH`).

Sensitivity of linear i in format f: the activation-weighted output error on
calibration text,
    cost[i][f] = ||X_i (W_hat_f - W_i)^T||_F^2 / ||X_i W_i^T||_F^2
with X_i the linear's inputs recorded while the model reads the text (up to
`max_rows` token rows). It is relative to the linear's own output energy, so every
linear counts alike: a choice's cost is the fraction of that linear's output it
corrupts; the knapsack minimises the sum. The inputs are recorded through the same
graph and anatomy the pass uses (a recording dynamo backend), so calibration and
compilation name the linears identically (parameter paths).

Knapsack: minimise sum cost[i][f_i] subject to sum bytes[i][f_i] <= budget, one
format per linear. Solved by dynamic programming over the budget after subtracting
each item's smallest size; the byte unit is the gcd of all sizes, so the solution
is exactly optimal unless that makes more than `max_cells` budget cells, in which
case sizes are rounded up to a coarser unit (still feasible; the plan records
"exact": false and the unit).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import torch

from slimfx.calibrate.common import calibration_ids
from slimfx.compiler.errors import UsageError
from slimfx.passes.quantize.plan import PLAN_KIND, PLAN_VERSION, format_plan

DEFAULT_CANDIDATES = ("none", "int8", "int4_g128", "int4_g64")


# ----------------------------------------------------------------------------- knapsack


@dataclass
class KnapsackSolution:
    choice: list[int]  # index of the chosen option per item
    cost: float
    size: int  # true bytes of the choice
    exact: bool  # False when sizes were rounded to a coarser unit
    unit: int  # bytes per DP cell


def solve_mckp(costs: list[list[float]], sizes: list[list[int]], budget: int, *, max_cells: int = 200_000) -> KnapsackSolution:
    """Multiple-choice knapsack: one option per item, sum of sizes <= budget, least total cost.

    costs, sizes: per item, per option (same shapes; sizes non-negative integers).
    Raises ValueError when even the smallest options exceed the budget."""
    if len(costs) != len(sizes) or any(len(c) != len(s) or not c for c, s in zip(costs, sizes)):
        raise UsageError("solve_mckp: costs and sizes must have the same non-empty option lists per item")
    if not costs:
        return KnapsackSolution([], 0.0, 0, True, 1)
    base = [min(s) for s in sizes]
    room = budget - sum(base)
    if room < 0:
        raise UsageError(f"budget {budget} bytes is below the smallest possible total {sum(base)} bytes; allowed: a budget "
                         f"of at least {sum(base)} bytes for the linears (or more --bits, or smaller --candidates)")
    extra = [[s - b for s in opts] for opts, b in zip(sizes, base)]
    g = reduce(math.gcd, [e for opts in extra for e in opts if e > 0], 0) or 1
    unit, exact = g, True
    if room // unit > max_cells:
        unit, exact = max(g, math.ceil(room / max_cells)), False
    cap = room // unit
    cells = [[math.ceil(e / unit) for e in opts] for opts in extra]
    choice = _dp(costs, cells, cap)
    size = sum(sizes[i][j] for i, j in enumerate(choice))
    return KnapsackSolution(choice, float(sum(costs[i][j] for i, j in enumerate(choice))), size, exact, unit)


def _dp(costs, cells, cap: int) -> list[int]:
    """best[b] = least cost of the items so far within b cells; argmins kept for the backtrack."""
    import numpy as np

    best = np.zeros(cap + 1, dtype=np.float64)
    picks = np.zeros((len(costs), cap + 1), dtype=np.int16)
    for i, (c_opts, w_opts) in enumerate(zip(costs, cells)):
        cand = np.full((len(c_opts), cap + 1), np.inf)
        for j, (c, w) in enumerate(zip(c_opts, w_opts)):
            if w <= cap:
                cand[j, w:] = best[: cap + 1 - w] + c
        picks[i] = cand.argmin(axis=0)
        best = cand.min(axis=0)
    choice, b = [0] * len(costs), cap
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i, b])
        choice[i] = j
        b -= cells[i][j]
    return choice


# ----------------------------------------------------------------------------- sensitivity

_ACTIVE: dict | None = None  # the recorder the hooked graphs write into


def _record(key: str, x: torch.Tensor) -> None:
    """Called from the hooked graph before each linear: keep up to max_rows input rows."""
    rec = _ACTIVE
    if rec is None:
        return
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    kept = rec["inputs"].get(key)
    rows = rows if kept is None else torch.cat([kept, rows])
    if rows.shape[0] > rec["max_rows"]:  # evenly spaced rows over what was seen
        idx = torch.linspace(0, rows.shape[0] - 1, rec["max_rows"]).round().long()
        rows = rows[idx]
    rec["inputs"][key] = rows


def _recording_backend(rec: dict):
    from slimfx.compiler.anatomy import analyze
    from slimfx.passes.quantize import weight_tensor

    def backend(gm, example_inputs, **_):
        anatomy = analyze(gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        for info in anatomy.linears:
            node = by_name[info.node]
            w = weight_tensor(gm, node, example_inputs)
            if w is None:
                continue
            rec["linears"][info.weight] = (w, info)
            with gm.graph.inserting_before(node):
                gm.graph.call_function(_record, (info.weight, node.args[0]))
        gm.recompile()
        return gm.forward

    return backend


def record_linear_inputs(model, input_ids: torch.Tensor, *, max_rows: int = 512) -> dict:
    """Run `model(input_ids)` once through a recording backend.

    Returns {"linears": {weight path: (weight, LinearInfo)}, "inputs": {weight path: X [R, K] f32}}."""
    global _ACTIVE
    rec = {"linears": {}, "inputs": {}, "max_rows": max_rows}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_recording_backend(rec), dynamic=False)
    _ACTIVE = rec
    try:
        with torch.no_grad():
            compiled(input_ids)
    finally:
        _ACTIVE = None
        torch._dynamo.reset()
    return rec


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X (W_hat - W)^T||^2 / ||X W^T||^2 for X [R, K], W [N, K]."""
    ref = x @ w.float().T
    err = x @ (w_hat.float() - w.float()).T
    return float(err.pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def measure_sensitivity(rec: dict, candidates, *, hqq: bool = True, include_head: bool = False) -> list[dict]:
    """Per linear: its shape, role and, per candidate spec, (bytes, cost). Specs a shape cannot take are left out."""
    from slimfx.passes.quantize.formats import parse_spec, quantize

    items = []
    for path, (w, info) in rec["linears"].items():
        if path not in rec["inputs"] or (info.role == "lm_head" and not include_head):
            continue
        x = rec["inputs"][path]
        entry = {"weight": path, "role": info.role, "block": info.block, "shape": [info.out_features, info.in_features],
                 "orig_bytes": w.numel() * w.element_size(), "options": {}}
        for text in candidates:
            spec = parse_spec(text, "candidate")
            if spec.unsupported_reason(info.out_features, info.in_features):
                continue
            size = spec.bytes_for(info.out_features, info.in_features, w.element_size())
            cost = 0.0 if spec.kind == "none" else output_error(x, w, quantize(w, spec, hqq=hqq).dequantize())
            entry["options"][spec.name] = {"bytes": size, "cost": cost}
        items.append(entry)
    return items


def measure_kl_sensitivity(model, input_ids: torch.Tensor, rec: dict, candidates, *, hqq: bool = True,
                           include_head: bool = False) -> list[dict]:
    """measure_sensitivity's items with an end-to-end cost: for each linear and candidate,
    only that linear is quantized (its parameter swapped in place, then restored) and the
    cost is the mean KL(unmodified || quantized) of the next-token distributions over the
    calibration text, in nats. Summing these over linears (the knapsack's objective) assumes
    the layers' effects add, as HAWQ-style allocation does; unlike the output-error proxy it
    weighs each linear by how much the model's prediction moves."""
    from slimfx.passes.quantize.formats import parse_spec, quantize

    keep_whole = [c for c in candidates if parse_spec(c, "candidate").kind == "none"]
    items = measure_sensitivity(rec, keep_whole, hqq=hqq, include_head=include_head)  # shapes, roles; "none" costs 0
    params = {p.data_ptr(): p for p in model.parameters()}
    with torch.no_grad():
        base = model(input_ids).logits.float().log_softmax(-1)
        base_probs = base.exp()  # once: every (linear, format) compares against it
        for entry in items:
            w, info = rec["linears"][entry["weight"]]
            param = params.get(w.data_ptr())
            if param is None:
                raise UsageError(f"calibrate bits --metric kl: no parameter of the model holds {entry['weight']}")
            for text in candidates:
                spec = parse_spec(text, "candidate")
                if spec.kind == "none" or spec.unsupported_reason(info.out_features, info.in_features):
                    continue
                original = param.data
                param.data = quantize(w, spec, hqq=hqq).dequantize().to(original.dtype)
                try:
                    logp = model(input_ids).logits.float().log_softmax(-1)
                finally:
                    param.data = original
                kl = float((base_probs * (base - logp)).sum(-1).mean())
                entry["options"][spec.name] = {"bytes": spec.bytes_for(info.out_features, info.in_features, w.element_size()),
                                               "cost": max(kl, 0.0)}
    return items


# ----------------------------------------------------------------------------- plans


def allocate(items: list[dict], budget_bytes: int, *, max_cells: int = 200_000) -> tuple[dict[str, str], KnapsackSolution]:
    """Solve the knapsack over measured items; returns ({weight path: spec}, solution)."""
    names = [list(it["options"]) for it in items]
    costs = [[it["options"][n]["cost"] for n in opts] for it, opts in zip(items, names)]
    sizes = [[it["options"][n]["bytes"] for n in opts] for it, opts in zip(items, names)]
    sol = solve_mckp(costs, sizes, budget_bytes, max_cells=max_cells)
    return {it["weight"]: opts[j] for it, opts, j in zip(items, names, sol.choice)}, sol


# ----------------------------------------------------------------------------- calibrate


def budget_from(items: list[dict], *, budget_bytes: int | None, bits: float | None, kv_bytes: int) -> int:
    """Bytes the linears may take: an explicit byte budget (which also pays for the KV), or
    an average bits per weight over the linears."""
    if (budget_bytes is None) == (bits is None):
        raise UsageError("give exactly one of a byte budget (--budget) or average bits per weight (--bits)")
    if bits is not None:
        weights = sum(it["shape"][0] * it["shape"][1] for it in items)
        return int(weights * bits / 8)
    return budget_bytes - kv_bytes


def calibrate_bit_allocation(model, tokenizer, *, out_path, budget_bytes: int | None = None, bits: float | None = None,
                             candidates=DEFAULT_CANDIDATES, tokens: int = 512, text: str | None = None,
                             max_rows: int = 512, kv_context: int = 0, kv_batch: int = 1, kv_dtype_bytes: int = 2,
                             include_head: bool = False, hqq: bool = True, model_name: str = "model",
                             metric: str = "output") -> dict:
    """Measure every linear's sensitivity per candidate format on calibration text, solve the
    knapsack under the budget (minus the KV cache at kv_context x kv_batch), write the plan JSON
    to out_path and return it. metric: "output" (each linear's relative activation-weighted
    output error) or "kl" (the model's next-token KL with only that linear quantized)."""
    if metric not in METRICS:
        raise UsageError(f"--metric {metric!r}: allowed: {', '.join(METRICS)}")
    from slimfx.compiler.anatomy import analyze, capture_graph

    ids = calibration_ids(model, tokenizer, tokens, text)
    rec = record_linear_inputs(model, ids, max_rows=max_rows)
    if not rec["inputs"]:
        raise UsageError("calibration recorded no linear inputs: the anatomy found no parameter linears")
    kv_bytes = 0
    if kv_context:
        anatomy = analyze(capture_graph(model, ids[:, :8]))
        kv_bytes = anatomy.kv_bytes_per_token(kv_dtype_bytes) * kv_context * kv_batch
    if metric == "kl":
        items = measure_kl_sensitivity(model, ids, rec, candidates, hqq=hqq, include_head=include_head)
    else:
        items = measure_sensitivity(rec, candidates, hqq=hqq, include_head=include_head)
    budget = budget_from(items, budget_bytes=budget_bytes, bits=bits, kv_bytes=kv_bytes)
    try:
        formats, sol = allocate(items, budget)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    plan = {
        "kind": PLAN_KIND, "version": PLAN_VERSION, "model": model_name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "budget": {"bytes": budget + kv_bytes, "bits_per_weight": bits, "linear_bytes": budget,
                   "kv_context": kv_context, "kv_batch": kv_batch, "kv_dtype_bytes": kv_dtype_bytes},
        "calibration": {"tokens": int(ids.shape[1]), "rows_per_linear": max_rows, "text": "file" if text else "model's own greedy text",
                        "metric": METRICS[metric], "hqq": hqq, "candidates": list(candidates)},
        "totals": {"linear_bytes": sol.size, "linear_bytes_unquantized": sum(it["orig_bytes"] for it in items),
                   "kv_bytes": kv_bytes, "cost": sol.cost, "exact": sol.exact, "unit_bytes": sol.unit},
        "formats": formats,
        "linears": {it["weight"]: {"format": formats[it["weight"]], "role": it["role"], "block": it["block"], "shape": it["shape"], "options": it["options"]} for it in items},
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(out)  # atomic: a reader never sees half a plan
    return plan


# ----------------------------------------------------------------------------- CLI helpers

METRICS = {"output": "relative activation-weighted output error",
           "kl": "next-token KL(unmodified || one linear quantized), mean over the calibration text"}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """'64MiB' -> 67108864; '1.5GB' -> 1500000000; '1234' -> 1234."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"--budget {text!r}: allowed: a size like 1234, 64MiB, 1.5GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `slimfx calibrate bits` (bit allocation)."""
    p.add_argument("--model", default=None, help="local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", "--output", dest="output", required=True, help="where to write the plan JSON")
    p.add_argument("--budget", default=None, help="byte budget for the linears plus the KV cache (e.g. 60MiB)")
    p.add_argument("--bits", type=float, default=None, help="instead of --budget: average bits per linear weight (e.g. 5.0)")
    p.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES), help="comma list of formats: none,int8,int4_g32,int4_g64,int4_g128,fp8")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    p.add_argument("--text", default=None, help="UTF-8 calibration text file (default: the model's own greedy text)")
    p.add_argument("--kv-context", type=int, default=0, help="count the KV cache at this context in the budget")
    p.add_argument("--kv-batch", type=int, default=1)
    p.add_argument("--kv-dtype-bytes", type=int, default=2)
    p.add_argument("--include-head", action="store_true", help="allocate the LM head too")
    p.add_argument("--no-hqq", action="store_true", help="plain round-to-nearest int4")
    p.add_argument("--metric", default="output", choices=tuple(METRICS),
                   help="sensitivity: output = each linear's relative output error (one forward); "
                        "kl = the model's next-token KL with only that linear quantized (one forward per linear and format)")


def main(args: argparse.Namespace) -> int:
    from slimfx.calibrate.common import check_output, read_text_file
    from slimfx.passes.quantize.formats import parse_spec
    from slimfx.runtime.models import load_model

    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for c in candidates:
        try:
            parse_spec(c, "--candidates")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.tokens < 16:
        raise UsageError(f"--tokens {args.tokens}: allowed: an integer >= 16")
    if args.bits is not None and not (math.isfinite(args.bits) and 0 < args.bits <= 32):
        raise UsageError(f"--bits {args.bits}: allowed: a number in (0, 32] (average bits per weight)")
    for flag in ("kv_context", "kv_batch", "kv_dtype_bytes"):
        if getattr(args, flag) < (0 if flag == "kv_context" else 1):
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: allowed: an integer >= {0 if flag == 'kv_context' else 1}")
    budget = parse_bytes(args.budget) if args.budget is not None else None
    text = read_text_file(args.text)
    check_output(args.output)
    model, tok = load_model(args.model)
    plan = calibrate_bit_allocation(
        model, tok, out_path=args.output, budget_bytes=budget, bits=args.bits, candidates=candidates, tokens=args.tokens,
        text=text, kv_context=args.kv_context, kv_batch=args.kv_batch, kv_dtype_bytes=args.kv_dtype_bytes,
        include_head=args.include_head, hqq=not args.no_hqq, model_name=args.model or "SmolLM2-135M-Instruct",
        metric=args.metric,
    )
    print(format_plan(plan))
    print(f"plan written to {args.output}")
    return 0
