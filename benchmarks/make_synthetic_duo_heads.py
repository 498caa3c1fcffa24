"""Write a SYNTHETIC duo-heads artifact (seeded random retrieval scores) for a named bench
shape, so `slimfx bench` can time DuoAttention on random weights, where no calibration
means anything. Speed depends on how many heads keep the full store, not on which.

    python benchmarks/make_synthetic_duo_heads.py --shape llama-3.2-1b --out /tmp/duo_heads_synthetic.safetensors
"""

from __future__ import annotations

import argparse

import torch

from slimfx.measure.shapes import shape_config
from slimfx.passes.kv_eviction.retrieval_heads import save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = shape_config(args.shape)
    scores = torch.rand(cfg.num_hidden_layers, cfg.num_key_value_heads, generator=torch.Generator().manual_seed(args.seed))
    save(scores, args.out, {"model": f"synthetic:{args.shape}", "method": "synthetic random scores (speed only)", "seed": args.seed})
    print(f"wrote {args.out}: {tuple(scores.shape)} synthetic scores")


if __name__ == "__main__":
    main()
