"""`slimfx calibrate WHAT ...`: compute calibration artifacts (DESIGN.md decision 7).

    slimfx calibrate vq-head --k 1024 --out head_k1024.safetensors [--model PATH] [--seed 0]

Each artifact kind is one entry of CALIBRATIONS: (help, add_arguments, main). Others
(bit-allocation plans, DuoAttention heads) join by adding an entry, e.g. from their own
module through `register("bits", help, add_arguments, main)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from slimfx.compiler.errors import UsageError

# name -> (help, add_arguments(parser), main(args) -> int)
CALIBRATIONS: dict[str, tuple[str, Callable, Callable]] = {}


def register(name: str, help_text: str, add_arguments: Callable, main: Callable) -> None:
    """Add an artifact kind to `slimfx calibrate`."""
    CALIBRATIONS[name] = (help_text, add_arguments, main)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT")
    for name, (help_text, add_args, main_fn) in CALIBRATIONS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_calibrate=main_fn)


def main(args: argparse.Namespace) -> int:
    fn = getattr(args, "_calibrate", None)
    if fn is None:
        raise UsageError(f"calibrate: name what to calibrate; allowed: {', '.join(CALIBRATIONS) or '(none)'}")
    return int(fn(args) or 0)


# ----------------------------------------------------------------------------- vq-head


def _vq_head_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, required=True, help="number of codes (clusters of head rows)")
    p.add_argument("--out", required=True, help="output .safetensors file (reference it under [artifacts])")
    p.add_argument("--model", default=None, help="local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (same seed, same artifact)")
    p.add_argument("--iters", type=int, default=15, help="k-means iterations at most")
    p.add_argument("--balance", type=float, default=1.0, help="cluster size cap = ceil(balance * V / k); 1.0 = equal sizes")
    p.add_argument("--device", default="cpu", help="where the clustering runs (cpu, cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_vq_args(args) -> None:
    if not str(args.out).endswith(".safetensors"):
        raise UsageError(f"--out {args.out}: expected a path ending in .safetensors")
    if args.k < 2:
        raise UsageError(f"--k {args.k}: expected an integer >= 2")
    if args.iters < 1:
        raise UsageError(f"--iters {args.iters}: expected an integer >= 1")
    if not 1.0 <= args.balance <= 4.0:
        raise UsageError(f"--balance {args.balance}: expected a number in [1.0, 4.0]")


def head_weight(model):
    """The LM head weight [V, H] of an HF causal LM (its output embeddings; tied or not)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(out, "weight", None)
    if weight is None or weight.dim() != 2:
        raise UsageError("the model has no LM head (get_output_embeddings() returned no [V, H] weight)")
    if getattr(out, "bias", None) is not None:
        raise UsageError("the LM head has a bias; the VQ head supports bias-free heads only")
    return weight


def _vq_head_main(args) -> int:
    _check_vq_args(args)
    from slimfx.calibrate.vq_head import build_artifact
    from slimfx.runtime.models import load_model, resolve_model_source
    from slimfx.runtime.vq_head import save_artifact

    source = resolve_model_source(args.model)  # a bad --model fails before anything loads
    model, _ = load_model(args.model)
    weight = head_weight(model).detach().to(args.device)
    if args.k > weight.shape[0]:
        raise UsageError(f"--k {args.k}: larger than the vocabulary ({weight.shape[0]})")
    start = time.perf_counter()
    art = build_artifact(weight, args.k, seed=args.seed, iters=args.iters, balance=args.balance,
                         progress=not args.no_progress, source=source.name)
    path = save_artifact(art, args.out)
    sizes = art.sizes.float()
    print(f"wrote {path}: K={art.k}, V={art.vocab}, H={art.hidden}, cluster sizes {int(sizes.min())}-{int(sizes.max())}, "
          f"mean radius {art.radii.mean():.4f}, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


register("vq-head", "cluster the LM head's rows into K codes (the VQ logits codebook)", _vq_head_arguments, _vq_head_main)


def _register_bit_allocation() -> None:
    from slimfx.calibrate import bits

    register("bits", "per-linear weight format plan under a byte budget (sensitivity + exact knapsack)", bits.add_arguments, bits.main)


_register_bit_allocation()


def _register_duo_heads() -> None:
    from slimfx.calibrate import duo_heads

    register("duo-heads", "DuoAttention retrieval heads from synthetic passkey prompts", duo_heads.add_arguments, duo_heads.main)


_register_duo_heads()


def _register_layer_skip() -> None:
    from slimfx.calibrate import layer_skip

    register("skip", "which decoder blocks or MLPs to skip (Block Influence or SLEB on calibration text)", layer_skip.add_arguments, layer_skip.main)


_register_layer_skip()


def _register_kv_share() -> None:
    from slimfx.calibrate import kv_share

    register("share", "which layers read or merge another layer's KV cache (KVSharer or MiniCache on calibration text)", kv_share.add_arguments, kv_share.main)


_register_kv_share()


def _register_d2o_budgets() -> None:
    from slimfx.calibrate import d2o_budgets

    register("d2o-budgets", "D2O's per-layer KV budgets by attention density on calibration text", d2o_budgets.add_arguments, d2o_budgets.main)


_register_d2o_budgets()
