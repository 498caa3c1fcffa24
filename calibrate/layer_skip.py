"""Which decoder blocks (or MLPs) to skip: `slimfx calibrate skip` writes a layer-skip plan.

Methods, each measured on calibration text, never choosing the first or last block:
- block_influence (ShortGPT): BI = 1 - cos(stream entering, stream leaving), averaged
  over the calibration tokens, per block (or per MLP: the stream after attention to
  the stream after the MLP). The lowest are removed. One forward pass.
- sleb (SLEB): greedily remove the block whose removal (given those removed already)
  raises the calibration NLL least. One forward per candidate and step.

Both measure through the graph and anatomy the pass rewrites: a dynamo backend puts a
switch at every block boundary the pass would bypass (passes/layer_skip.bypass) that,
at run time, passes the block's output on or substitutes the stream entering it. One
compilation serves every candidate set, and a removal here is exactly the pass's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys

import torch
import torch.nn.functional as F

from slimfx.calibrate.common import add_common_arguments, load_for_calibration, model_name, text_name
from slimfx.compiler.errors import UsageError
from slimfx.passes.layer_skip import METHODS, PLAN_KIND, PLAN_VERSION, TARGETS, format_plan, write_plan


class _Probe:
    """Run-time state of the instrumented graph: which blocks are skipped, and the Block
    Influence sums while recording."""

    def __init__(self):
        self.skip: set[int] = set()
        self.recording = False
        self.influence: dict[int, float] = {}
        self.tokens: dict[int, int] = {}

    def at(self, block: int, stream_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.recording:
            cos = F.cosine_similarity(stream_in.float(), out.float(), dim=-1)
            self.influence[block] = self.influence.get(block, 0.0) + float((1 - cos).sum())
            self.tokens[block] = self.tokens.get(block, 0) + cos.numel()
        return stream_in if block in self.skip else out


_ACTIVE: _Probe | None = None  # the probe the instrumented graph reads while a calibration runs


def _switch(block: int, stream_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out if _ACTIVE is None else _ACTIVE.at(block, stream_in, out)


def _instrument(gm: torch.fx.GraphModule, mlp_only: bool) -> dict:
    """Put a `_switch` after every block's (or MLP's) output; returns the model's identity."""
    from slimfx.compiler.anatomy import analyze
    from slimfx.passes.layer_skip import bypass

    anatomy = analyze(gm)
    if len(anatomy.blocks) < 3 or anatomy.lm_head is None:
        raise UsageError(f"calibrate skip: the graph has {len(anatomy.blocks)} recognised blocks and "
                         f"{'an' if anatomy.lm_head else 'no'} LM head; allowed: a whole decoder LM with at least 3 blocks")
    pairs = {b.index: bypass(gm, anatomy, b, mlp_only) for b in anatomy.blocks}
    bad = [why for why in pairs.values() if isinstance(why, str)]
    if bad:
        raise UsageError(f"calibrate skip: {bad[0]}")
    # Later blocks first: an earlier switch must also feed the later switch's stream input.
    for b in sorted(pairs, reverse=True):
        stream_in, out = pairs[b]
        with gm.graph.inserting_after(out):
            switch = gm.graph.call_function(_switch, (b, stream_in, out))
        out.replace_all_uses_with(switch, delete_user_cb=lambda user, s=switch: user is not s)
    gm.recompile()
    return anatomy


class SkipCalibration:
    """A model compiled once with switches at every block boundary; `nll(skip)` runs the
    calibration ids with the blocks in `skip` removed.

    input_ids [1, T] int64; mlp_only: the switches bypass MLPs instead of whole blocks."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, mlp_only: bool):
        from slimfx.compiler.anatomy import record_parameter_paths
        from slimfx.passes._identity import model_identity

        self.ids = input_ids
        self.probe = _Probe()
        found = {}

        def backend(gm, example_inputs, **_):
            record_parameter_paths(gm, example_inputs, model)
            anatomy = _instrument(gm, mlp_only)
            found["identity"] = model_identity(gm, anatomy, example_inputs)
            return gm.forward

        torch._dynamo.reset()
        self.compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
        self.base = self.nll(set(), record=True)
        self.identity = found["identity"]
        self.n_blocks = self.identity["blocks"]

    def nll(self, skip: set[int], record: bool = False) -> float:
        """Mean next-token NLL (nats) of the calibration ids with `skip` removed."""
        global _ACTIVE
        self.probe.skip, self.probe.recording = set(skip), record
        _ACTIVE = self.probe
        try:
            with torch.no_grad():
                logits = self.compiled(input_ids=self.ids, use_cache=False).logits
        finally:
            _ACTIVE = None
        return float(F.cross_entropy(logits[0, :-1].float(), self.ids[0, 1:].to(logits.device)))

    def block_influence(self) -> list[float]:
        return [self.probe.influence[b] / self.probe.tokens[b] for b in range(self.n_blocks)]


def _sleb(cal: SkipCalibration, count: int, progress: bool) -> tuple[list[int], list[float], list]:
    """Greedy removal order, the NLL after each step, and each block's NLL when removed alone."""
    from tqdm import tqdm

    candidates = list(range(1, cal.n_blocks - 1))
    removed, after, alone = [], [], [None] * cal.n_blocks
    total = sum(len(candidates) - s for s in range(count))
    with tqdm(total=total, desc="SLEB", unit="forward", disable=not progress, file=sys.stderr) as bar:
        for _ in range(count):
            trials = {}
            for c in (c for c in candidates if c not in removed):
                trials[c] = cal.nll(set(removed) | {c})
                bar.update(1)
            if not removed:
                for c, v in trials.items():
                    alone[c] = v
            best = min(trials, key=lambda c: (trials[c], c))
            removed.append(best)
            after.append(trials[best])
    return removed, after, alone


def resolve_count(n_blocks: int, count: int | None, fraction: float | None) -> int:
    """Blocks to choose from --count or --fraction (of all blocks, rounded); at most n - 2."""
    if (count is None) == (fraction is None):
        raise UsageError("calibrate skip: give exactly one of --count or --fraction")
    if fraction is not None:
        if not 0 <= fraction < 1:
            raise UsageError(f"--fraction {fraction}: allowed: a number in [0, 1)")
        count = round(fraction * n_blocks)
    if not 0 <= count <= n_blocks - 2:
        raise UsageError(f"--count {count}: allowed: 0-{n_blocks - 2} (never the first or last of {n_blocks} blocks)")
    return count


def calibrate_skip(model, input_ids: torch.Tensor, *, method: str = "block_influence", target: str = "block",
                   count: int | None = None, fraction: float | None = None, progress: bool = True,
                   model_name: str = "model", text: str = "") -> dict:
    """Measure per-block importance on `input_ids` [1, T] and return a layer-skip plan
    (the dict passes/layer_skip.py validates) choosing `count` blocks (or MLPs)."""
    if method not in METHODS or target not in TARGETS:
        raise UsageError(f"calibrate skip: method {method!r}, target {target!r}; allowed: {METHODS} / {TARGETS}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise UsageError(f"calibrate skip: calibration ids of shape {tuple(input_ids.shape)}; allowed: [1, T] with T >= 2")
    cal = SkipCalibration(model, input_ids, mlp_only=target == "mlp")
    count = resolve_count(cal.n_blocks, count, fraction)
    influence = cal.block_influence()
    scores = {"block_influence": influence}
    calibration = {"tokens": int(input_ids.shape[1]), "text": text, "nll": cal.base}
    if method == "sleb":
        order, after, alone = _sleb(cal, count, progress)
        scores["sleb_nll"] = alone
        calibration["greedy_nll"] = after
    else:
        order = sorted(range(1, cal.n_blocks - 1), key=lambda b: (influence[b], b))[:count]
    calibration["nll_skipped"] = cal.nll(set(order))
    torch._dynamo.reset()
    return {
        "kind": PLAN_KIND, "version": PLAN_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model_name, **cal.identity},
        "target": target, "method": method, "order": order, "skip": sorted(order),
        "scores": scores, "calibration": calibration,
    }


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `slimfx calibrate skip`."""
    add_common_arguments(p, "blocks (or MLPs) the plan removes")
    p.add_argument("--method", default="block_influence", choices=METHODS,
                   help="block_influence (ShortGPT, one forward) or sleb (greedy calibration NLL, a forward per candidate and step)")
    p.add_argument("--target", default="block", choices=TARGETS, help="remove whole blocks or only their MLPs")


def main(args: argparse.Namespace) -> int:
    model, _, ids = load_for_calibration(args, "skip")
    plan = calibrate_skip(model, ids, method=args.method, target=args.target, count=args.count, fraction=args.fraction,
                          progress=not args.no_progress, model_name=model_name(args), text=text_name(args))
    write_plan(plan, args.output)
    print(format_plan(plan))
    cal = plan["calibration"]
    print(f"calibration NLL {cal['nll']:.4f} -> {cal['nll_skipped']:.4f} with the plan applied; plan written to {args.output}")
    return 0
