"""What removing one block (or only its MLP) costs on the default model: the calibration NLL
with that block alone removed, for every intermediate block, beside its Block Influence
score. The same calibration as benchmarks/make_layer_skip_plans.py (128 tokens of the
model's own greedy text, the pass's own bypass through calibrate/layer_skip.SkipCalibration);
it is SLEB's first greedy step, which says which blocks any skip set should avoid.

    python benchmarks/layer_skip_single_costs.py --target mlp --out results/layer_skip_mlp_costs.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from slimfx.calibrate.common import calibration_ids
from slimfx.calibrate.layer_skip import SkipCalibration
from slimfx.runtime.models import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="mlp", choices=("block", "mlp"))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    start = time.time()
    model, tok = load_model()
    ids = calibration_ids(model, tok, args.tokens)
    cal = SkipCalibration(model, ids, mlp_only=args.target == "mlp")
    influence = cal.block_influence()
    rows = []
    for b in range(1, cal.n_blocks - 1):
        rows.append({"block": b, "nll_removed_alone": cal.nll({b}), "block_influence": influence[b]})
        print(f"block {b}: NLL {rows[-1]['nll_removed_alone']:.4f} (base {cal.base:.4f}), BI {influence[b]:.4f}", file=sys.stderr)
    torch._dynamo.reset()
    ranked = sorted(rows, key=lambda r: r["nll_removed_alone"])
    out = {"target": args.target, "model": cal.identity, "calibration_tokens": args.tokens,
           "text": f"the model's own greedy text ({args.tokens} tokens)", "nll_base": cal.base,
           "cheapest_first": [r["block"] for r in ranked], "blocks": rows,
           "torch": torch.__version__, "seconds": round(time.time() - start, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in ranked:
        print(f"{r['block']:3d}  NLL +{r['nll_removed_alone'] - cal.base:.4f}  BI {r['block_influence']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
