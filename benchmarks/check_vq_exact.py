"""Issue 7's exactness check on the default model: greedy tokens of the VQ head's exact mode
against the unmodified model, several prompts, 128 new tokens each, both verification
routes (the bound with a same-step full-head fallback, and deferred batched verification
with KV rollback), with how often each route was taken.

    python benchmarks/check_vq_exact.py --codebook artifacts/head_k1024.safetensors \
        [--tokens 128] [--output results/vq_exact_check.json]

The codebook comes from `slimfx calibrate vq-head --k 1024 --out ...`. Exits 1 when any
prompt's tokens differ. Writes JSON with device, date and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

PROMPTS = [
    "Explain how a bicycle works in two sentences.",
    "Write a short poem about the sea.",
    "What are three tips for learning a new language?",
    "Describe the water cycle to a ten-year-old.",
]


def vq_config(codebook: str, verify: str) -> dict:
    return {"compile": {"pipeline": "vq"}, "pipelines": {"vq": ["vq_logits"]},
            "passes": {"vq_logits": {"mode": "exact", "codebook": "vq_head", "probes": 8, "verify": verify, "verify_every": 8}},
            "artifacts": {"vq_head": codebook}}


ROUTES = ("bound", "fallback", "accepted", "corrected", "discarded", "rounds")


def route_totals(per_head: dict) -> dict:
    """Route counts summed over every registered VQ head (each compile registers its own)."""
    totals = {r: sum(int(c.get(r, 0)) for c in per_head.values()) for r in ROUTES}
    steps = totals["bound"] + totals["fallback"] + totals["accepted"] + totals["corrected"]
    totals["bound_rate"] = round(totals["bound"] / steps, 4) if steps else None
    checked = totals["accepted"] + totals["corrected"]
    totals["accept_rate"] = round(totals["accepted"] / checked, 4) if checked else None
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codebook", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--output", default="results/vq_exact_check.json")
    args = ap.parse_args(argv)

    from slimfx.runtime import vq_head
    from slimfx.runtime.generate import generate
    from slimfx.runtime.models import chat_input_ids, load_model
    from slimfx.runtime.vq_verify import generate_verified

    model, tok = load_model()
    rows, identical = [], True
    for prompt in PROMPTS:
        ids = chat_input_ids(tok, prompt)
        ref = generate(model, ids, max_new_tokens=args.tokens).tokens
        row = {"prompt": prompt, "prompt_tokens": int(ids.shape[1])}
        for verify in ("bound", "deferred"):
            vq_head.reset_counts()
            cfg = vq_config(args.codebook, verify)
            if verify == "bound":
                out = generate(model, ids, max_new_tokens=args.tokens, config=cfg).tokens
            else:
                out = generate_verified(model, ids, config=cfg, max_new_tokens=args.tokens).tokens
            same = bool(torch.equal(out, ref))
            identical &= same
            counts = route_totals(vq_head.route_counts())
            row[verify] = {"identical": same, "first_difference": None if same else int((out != ref).nonzero()[0, 1]), "routes": counts}
            print(f"{prompt[:40]:40s} {verify:8s} identical={same} routes={counts}", flush=True)
        rows.append(row)
    report = {
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "codebook": args.codebook, "new_tokens": args.tokens, "all_identical": identical, "prompts": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"all identical: {identical}; wrote {args.output}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
