"""D2O's layer-level densities: `slimfx calibrate d2o-budgets` writes a per-layer budget plan.

    slimfx calibrate d2o-budgets --out d2o_budgets.json [--model PATH] [--tokens 1024] [--text FILE]

One forward of the unmodified model over the calibration text (eager attention, which
returns the attention weights) gives every layer's attention map; each key's received mass
(the sum of its column over the text's queries) has a variance over the keys per query
head, and the layer's value is the mean over its heads: low when attention is spread over
many keys (a dense layer), high when a few keys take it all (a sparse one). The plan
(format and how the kv_eviction pass turns it into per-site budgets:
passes/kv_eviction/layer_budgets.py) records these variances and the model's identity.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys

import torch

from slimfx.calibrate.common import attention_weights
from slimfx.compiler.errors import UsageError
from slimfx.passes.kv_eviction.layer_budgets import PLAN_KIND, PLAN_VERSION, shares, write_plan


def layer_variances(model, ids: torch.Tensor) -> list[float]:
    """Per attention layer, the variance over keys of the attention mass each key receives
    from the text's queries, mean over query heads (module doc)."""
    # weights [Hq, T, T] -> the mass each key receives [Hq, T] -> its variance over keys
    variance = lambda weights: float(weights.float().sum(dim=-2).var(dim=-1).mean())
    with attention_weights(model, "d2o-budgets", variance) as values, torch.no_grad():
        model(ids.to(next(model.parameters()).device))
    return values


def calibrate_budgets(model, ids: torch.Tensor, text: str = "given ids", name: str | None = None) -> dict:
    """The budget plan (passes/kv_eviction/layer_budgets.py) for `model` from calibration ids [1, T]."""
    from slimfx.compiler.anatomy import analyze, capture_graph
    from slimfx.passes._identity import identity_of_model

    anatomy = analyze(capture_graph(model, input_ids=ids[:, :4], use_cache=False))
    variance = layer_variances(model, ids)
    if len(variance) != len(anatomy.attention_sites):
        raise UsageError(f"calibrate d2o-budgets: {len(variance)} `self_attn` modules but {len(anatomy.attention_sites)} "
                         "attention sites; allowed: a model whose every decoder layer has one attention")
    identity = identity_of_model(model, anatomy)
    return {"kind": PLAN_KIND, "version": PLAN_VERSION, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": name or type(model).__name__, **identity}, "variance": [round(v, 6) for v in variance],
            "calibration": {"tokens": int(ids.shape[1]), "text": text,
                            "shares": [round(float(s), 6) for s in shares(variance)]}}


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "--output", dest="output", required=True, help="where to write the plan JSON (reference it under "
                   "[artifacts] as d2o_budgets)")
    p.add_argument("--model", default=None, help="local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens (default 1024)")
    p.add_argument("--text", default=None, help="UTF-8 calibration text file (default: the model's own greedy text)")


def main(args: argparse.Namespace) -> int:
    from slimfx.calibrate.common import calibration_ids, check_output, model_name, read_text_file, text_name
    from slimfx.runtime.models import load_model

    if args.tokens < 16:
        raise UsageError(f"--tokens {args.tokens}: allowed: an integer >= 16")
    text = read_text_file(args.text)
    check_output(args.output)
    model, tokenizer = load_model(args.model)
    ids = calibration_ids(model, tokenizer, args.tokens, text)
    plan = calibrate_budgets(model, ids, text_name(args), model_name(args))
    path = write_plan(plan, args.output)
    s = plan["calibration"]["shares"]
    n = len(s)
    print(f"wrote {path}: {n} layers, budget shares {min(s) * n:.2f}-{max(s) * n:.2f} x uniform "
          f"(densest layer {s.index(max(s))}, sparsest {s.index(min(s))}), {ids.shape[1]} tokens", file=sys.stderr)
    return 0
