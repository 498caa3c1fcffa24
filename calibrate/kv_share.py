"""Which layers read another layer's KV: `slimfx calibrate share` writes a KV-sharing plan (KVSharer).

KVSharer (Yang et al., 2024), training-free, on calibration text:
1. one forward records every layer's key and value projections; each layer is summarised
   by their mean over the tokens, and layer pairs (reader above owner) are ranked by the
   Euclidean distance of those summaries, the most *dissimilar* first (the paper's
   finding: sharing dissimilar KV hurts less than sharing similar KV);
2. greedily, each pair in that order is tried on top of those accepted so far: the reader
   attends over the owner's keys and values, and the pair is kept when the last hidden
   state stays close to the unmodified model's (mean cosine similarity over the tokens at
   least `threshold`); it stops at the target number of readers.
A layer is never both reader and owner, and the first layer always owns its KV.

MiniCache (Liu et al., 2024), `--method minicache`: one forward records every layer's key
and value projections; each pair of adjacent layers (l, l+1) is scored by the mean cosine
similarity of their keys and of their values at the same token (rotary embedding turns
both layers' vectors by the same angle, so the projections' similarity is the cached
keys'); the `count` most similar disjoint pairs are chosen, the upper layer merging into
the lower one. The plan records every pair's similarity, from which a `merge_threshold`
(the angle up to which tokens are merged) can be read. Use it with merge = "minicache".

How sharing is applied here: forward hooks replace a reader's k and v projection outputs
by its owner's (computed earlier in the same forward). Rotary embedding is the same
function of position for every layer, so this equals attending over the owner's rotated
keys, which is what the kv_share pass does. Models whose attention reads fused qkv
projections, or normalises keys per layer after the projection (q/k norms), are refused:
there the projection outputs are not the cached keys.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys

import torch
import torch.nn.functional as F

from slimfx.calibrate.common import add_common_arguments, load_for_calibration, model_name, text_name
from slimfx.compiler.errors import UsageError
from slimfx.passes.kv_share.plan import PLAN_KIND, PLAN_VERSION, format_plan, write_plan


def _projections(model) -> tuple[dict[int, tuple[torch.nn.Module, torch.nn.Module]], dict]:
    """{layer: (k_proj module, v_proj module)} from the model's anatomy, and its identity."""
    from slimfx.compiler.anatomy import analyze, capture_graph
    from slimfx.passes._identity import identity_of_model

    ids = torch.zeros(1, 4, dtype=torch.long, device=next(model.parameters()).device)
    anatomy = analyze(capture_graph(model, input_ids=ids, use_cache=False))
    weights = {l.node: l.weight for l in anatomy.linears}
    found = {}
    for site in anatomy.attention_sites:
        if site.fused_qkv or site.k_proj not in weights or site.v_proj not in weights:
            raise UsageError(f"calibrate share: layer {site.index}'s keys and values do not come from separate k/v "
                             "projections; allowed: models with k_proj and v_proj linears (Llama, Qwen2, Mistral, SmolLM)")
        modules = tuple(model.get_submodule(weights[p].removesuffix(".weight")) for p in (site.k_proj, site.v_proj))
        found[site.index] = modules
    norms = [name for name, _ in model.named_modules() if name.endswith(("k_norm", "q_norm"))]
    if norms:
        raise UsageError(f"calibrate share: the model normalises keys after the projection ({norms[0]}); "
                         "allowed: models whose cached keys are the rotated k projection")
    if len(found) < 3:
        raise UsageError(f"calibrate share: {len(found)} attention layers found; allowed: a decoder with at least 3")
    return found, identity_of_model(model, anatomy)


class ShareProbe:
    """The model with hooks on every layer's k/v projections: records their outputs, and
    replaces a reader's by its owner's according to `self.map`."""

    def __init__(self, model, ids: torch.Tensor):
        self.model, self.ids = model, ids
        self.layers, self.identity = _projections(model)
        self.map: dict[int, int] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.handles = [mod.register_forward_hook(self._hook(layer, which))
                        for layer, mods in self.layers.items() for which, mod in enumerate(mods)]
        self.reference = self.last_hidden()
        self.means = {key: t.float().mean(dim=(0, 1)) for key, t in self.outputs.items()}

    def _hook(self, layer: int, which: int):
        def hook(_module, _inputs, output):
            owner = self.map.get(layer)
            if owner is not None:
                return self.outputs[(owner, which)]
            self.outputs[(layer, which)] = output
            return output
        return hook

    def last_hidden(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(input_ids=self.ids, use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1][0].float()

    def similarity(self, sharing: dict[int, int]) -> float:
        """Mean cosine similarity of the last hidden state with `sharing` to the unmodified one."""
        self.map = dict(sharing)
        try:
            return float(F.cosine_similarity(self.last_hidden(), self.reference, dim=-1).mean())
        finally:
            self.map = {}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def ranked_pairs(means: dict[tuple[int, int], torch.Tensor], layers: list[int]) -> list[tuple[int, int, float]]:
    """(reader, owner, distance) for every reader above its owner, most dissimilar first."""
    summary = {layer: torch.cat([means[(layer, 0)], means[(layer, 1)]]) for layer in layers}
    pairs = [(r, o, float((summary[r] - summary[o]).norm())) for r in layers for o in layers if o < r]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))


def calibrate_share(model, input_ids: torch.Tensor, *, count: int, threshold: float = 0.9, progress: bool = True,
                    model_name: str = "model", text: str = "") -> dict:
    """A KV-sharing plan (the dict passes/kv_share/plan.py validates) with up to `count` readers."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise UsageError(f"calibrate share: calibration ids of shape {tuple(input_ids.shape)}; allowed: [1, T] with T >= 2")
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold {threshold}: allowed: a cosine similarity in [-1, 1]")
    probe = ShareProbe(model, input_ids)
    try:
        layers = sorted(probe.layers)
        if not 0 <= count <= len(layers) // 2:
            raise UsageError(f"--count {count}: allowed: 0-{len(layers) // 2} (a layer is never both reader and owner)")
        accepted, tried = {}, []
        for reader, owner, distance in _progress(ranked_pairs(probe.means, layers), progress):
            if len(accepted) >= count:
                break
            if reader in accepted or reader in accepted.values() or owner in accepted:
                continue
            sim = probe.similarity({**accepted, reader: owner})
            tried.append({"reader": reader, "owner": owner, "distance": round(distance, 6), "similarity": round(sim, 6)})
            if sim >= threshold:
                accepted[reader] = owner
        final = probe.similarity(accepted)
    finally:
        probe.close()
    return {
        "kind": PLAN_KIND, "version": PLAN_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name, **probe.identity},
        "method": "kvsharer", "map": {str(r): o for r, o in sorted(accepted.items())},
        "calibration": {"tokens": int(input_ids.shape[1]), "text": text, "threshold": threshold, "count": count,
                        "similarity": round(final, 6), "tried": tried},
    }


def adjacent_similarity(outputs: dict[tuple[int, int], torch.Tensor], layers: list[int]) -> list[tuple[int, int, float]]:
    """(upper, lower, similarity) for every adjacent pair: the mean over tokens of the cosine
    similarity of their keys, averaged with that of their values."""
    out = []
    for lower, upper in zip(layers, layers[1:]):
        sims = [F.cosine_similarity(outputs[(upper, w)].float(), outputs[(lower, w)].float(), dim=-1).mean() for w in (0, 1)]
        out.append((upper, lower, float(sum(sims) / 2)))
    return out


def best_disjoint_pairs(scored: list[tuple[int, int, float]], count: int) -> dict[int, int]:
    """upper -> lower for the `count` disjoint adjacent pairs of `scored` (in layer order)
    with the largest total similarity: a pick-or-skip recursion along the layers, exact
    (a greedy pick of the best pair can block two good neighbours)."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def best(i: int, left: int) -> tuple[float, tuple]:
        if left == 0:
            return 0.0, ()
        if i >= len(scored):
            return float("-inf"), ()
        skip = best(i + 1, left)
        total, rest = best(i + 2, left - 1)
        take = (total + scored[i][2], (i, *rest))
        return max(skip, take, key=lambda t: t[0])

    total, picked = best(0, count)
    if total == float("-inf"):
        raise UsageError(f"--count {count}: allowed: at most {(len(scored) + 1) // 2} disjoint adjacent pairs")
    return {scored[i][0]: scored[i][1] for i in picked}


def calibrate_minicache(model, input_ids: torch.Tensor, *, count: int, model_name: str = "model", text: str = "") -> dict:
    """A merge plan: the `count` most similar disjoint adjacent pairs (upper -> lower)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise UsageError(f"calibrate share: calibration ids of shape {tuple(input_ids.shape)}; allowed: [1, T] with T >= 2")
    probe = ShareProbe(model, input_ids)
    probe.close()
    layers = sorted(probe.layers)
    if not 0 <= count <= len(layers) // 2:
        raise UsageError(f"--count {count}: allowed: 0-{len(layers) // 2} (a layer is never both reader and owner)")
    scored = adjacent_similarity(probe.outputs, layers)
    chosen = best_disjoint_pairs(scored, count)
    return {
        "kind": PLAN_KIND, "version": PLAN_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name, **probe.identity},
        "method": "minicache", "map": {str(r): o for r, o in sorted(chosen.items())},
        "calibration": {"tokens": int(input_ids.shape[1]), "text": text, "count": count,
                        "pairs": [{"reader": u, "owner": lo, "similarity": round(sim, 6)} for u, lo, sim in scored]},
    }


def _progress(items: list, enabled: bool):
    from tqdm import tqdm

    return tqdm(items, desc="KVSharer", unit="pair", disable=not enabled, file=sys.stderr)


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `slimfx calibrate share`."""
    add_common_arguments(p, "layers read another layer's KV")
    p.add_argument("--method", choices=("kvsharer", "minicache"), default="kvsharer",
                   help="kvsharer: readers of dissimilar layers' KV, each kept if the output stays close; "
                        "minicache: the most similar adjacent pairs, to merge (merge = \"minicache\")")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="kvsharer: least mean cosine similarity of the last hidden state (default 0.9)")


def main(args: argparse.Namespace) -> int:
    model, _, ids = load_for_calibration(args, "share")
    n_layers = model.config.num_hidden_layers
    if args.fraction is not None and not 0 <= args.fraction <= 0.5:
        raise UsageError(f"--fraction {args.fraction}: allowed: a number in [0, 0.5] (a layer is never both reader and owner)")
    count = args.count if args.count is not None else round(args.fraction * n_layers)
    if args.method == "minicache":
        plan = calibrate_minicache(model, ids, count=count, model_name=model_name(args), text=text_name(args))
    else:
        plan = calibrate_share(model, ids, count=count, threshold=args.threshold, progress=not args.no_progress,
                               model_name=model_name(args), text=text_name(args))
    write_plan(plan, args.output)
    print(format_plan(plan))
    print(f"plan written to {args.output}; use it with [passes.kv_share] plan = \"KEY\" and [artifacts] KEY = \"{args.output}\"")
    return 0
