"""Layer-skip plans for the quality eval (benchmarks/configs/eval_layer_skip.toml): Block
Influence and SLEB, whole blocks and MLPs only, removing 10 %, 20 % and 30 % of the
default model's blocks (3, 6, 9 of 30), calibrated on 128 tokens of the model's own
greedy text (calibrate/bits.calibration_ids; a prompt the eval does not use).

    python benchmarks/make_layer_skip_plans.py --out benchmarks/configs

SLEB's greedy removal is calibrated once with the largest count: the plan for a smaller
count is its first steps (the greedy order does not depend on how far it goes on), with
the calibration NLL after that many steps. Block Influence is one forward per plan.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from slimfx.calibrate.layer_skip import calibrate_skip
from slimfx.calibrate.bits import calibration_ids
from slimfx.passes.layer_skip import write_plan
from slimfx.runtime.models import DEFAULT_MODEL_NAME, load_model

SHARES = (0.1, 0.2, 0.3)
SHORT = {"block_influence": "bi", "sleb": "sleb"}


def sleb_prefix(plan: dict, count: int) -> dict:
    """The plan of the first `count` greedy steps of a SLEB plan."""
    out = copy.deepcopy(plan)
    out["order"] = plan["order"][:count]
    out["skip"] = sorted(out["order"])
    out["calibration"]["greedy_nll"] = plan["calibration"]["greedy_nll"][:count]
    out["calibration"]["nll_skipped"] = plan["calibration"]["greedy_nll"][count - 1]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/configs")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--methods", default="block_influence,sleb", help="comma list of block_influence, sleb")
    p.add_argument("--targets", default="block,mlp", help="comma list of block, mlp")
    args = p.parse_args()
    model, tok = load_model()
    ids = calibration_ids(model, tok, args.tokens)
    n = model.config.num_hidden_layers
    counts = [round(s * n) for s in SHARES]
    text = f"the model's own greedy text ({args.tokens} tokens)"
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            if method == "sleb":
                full = calibrate_skip(model, ids, method=method, target=target, count=max(counts), model_name=DEFAULT_MODEL_NAME, text=text)
                plans = {c: sleb_prefix(full, c) for c in counts}
            else:
                plans = {c: calibrate_skip(model, ids, method=method, target=target, count=c, progress=False,
                                           model_name=DEFAULT_MODEL_NAME, text=text) for c in counts}
            for c, plan in plans.items():
                path = write_plan(plan, Path(args.out) / f"skip_{SHORT[method]}_{target}_{c}.json")
                print(f"{path}: removes {target}s {plan['skip']}, calibration NLL {plan['calibration']['nll']:.4f} -> "
                      f"{plan['calibration']['nll_skipped']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
