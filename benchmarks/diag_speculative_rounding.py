"""Where self-speculative greedy tokens first differ from plain greedy ones, and by how much
the unmodified model's two candidate logits differ there.

The verify forward computes K + 1 positions in one pass where plain decoding computes one:
the same logits through other matmul and attention shapes, so they can round differently.
In float32 that never changed a token in the tests; in bfloat16 a near-tie can flip. This
script tells a rounding flip (the two tokens' logits within a few bf16 spacings of each
other in a full-precision forward of the same prefix) from a wrong token.

    python benchmarks/diag_speculative_rounding.py --dtype bfloat16 --device cpu --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from slimfx.measure.fidelity import DEFAULT_PROMPTS
from slimfx.measure.report import stamp
from slimfx.measure.speculative import speculative_config
from slimfx.runtime.generate import generate
from slimfx.runtime.models import chat_input_ids, load_model


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).nonzero()
    return int(diff[0, -1]) if len(diff) else None


@torch.no_grad()
def gap_at(model, reference, ids: torch.Tensor, prefix: torch.Tensor, plain: int, spec: int) -> dict:
    """The plain and speculative tokens' logits after prompt + prefix, from the float32
    `reference` model and from `model` itself (its dtype), both unmodified HF forwards."""
    full = torch.cat([ids, prefix[None].to(ids.device)], dim=1)
    own = model(full, use_cache=False).logits[0, -1].float()
    ref = reference(full.to(next(reference.parameters()).device), use_cache=False).logits[0, -1].float()
    spacing = 2.0 ** (torch.floor(torch.log2(own[plain].abs())) - 7)  # one bf16 ulp at that magnitude
    return {"float32_logit_plain": float(ref[plain]), "float32_logit_speculative": float(ref[spec]),
            "float32_gap": float(ref[plain] - ref[spec]), "own_dtype_gap": float(own[plain] - own[spec]),
            "bf16_spacing_at_logit": float(spacing)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--draft-length", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(dtype=dtype, device=args.device)
    n = model.config.num_hidden_layers
    from slimfx.passes.layer_skip import spread

    cfg = speculative_config({"blocks": spread(round(0.2 * n), n), "mlp_only": True}, args.draft_length)
    reference = load_model(dtype=torch.float32, device=args.device)[0] if dtype != torch.float32 else model
    rows = []
    for prompt in DEFAULT_PROMPTS[:args.prompts]:
        ids = chat_input_ids(tok, prompt).to(args.device)
        plain = generate(model, ids, max_new_tokens=args.new_tokens).tokens[0]
        spec = generate(model, ids, max_new_tokens=args.new_tokens, config=cfg).tokens[0]
        i = first_difference(plain, spec)
        row = {"prompt": prompt[:40], "identical": i is None, "first_difference": i}
        if i is not None:
            row.update(gap_at(model, reference, ids, plain[:i], int(plain[i]), int(spec[i])))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"kind": "slimfx.speculative_rounding", "stamp": stamp(args.device), "dtype": args.dtype,
              "new_tokens": args.new_tokens, "draft": "20% of MLPs, evenly spread", "draft_length": args.draft_length,
              "method": __doc__.strip(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
