"""Layer skipping: remove chosen decoder blocks, or only their MLPs, from the graph (lossy).

Which blocks (numbers always those of the unmodified model):
- `blocks`: an explicit list;
- `plan`: a calibrated plan (`slimfx calibrate skip`: ShortGPT's Block Influence or
  SLEB's greedy calibration NLL), refused for a model it was not made for;
- `target_speedup`: unified layer skipping. The cost model: batch-1 decode is
  memory-bound, so a step's time is proportional to the weight bytes it reads; every
  linear of the graph counts (blocks and LM head), skipping removes a block's linears
  (or its MLP's); KV reads, norms and launch overheads are not counted, so the
  predicted speedup is an upper bound at long context. The fewest blocks that reach
  the target are removed, spread evenly over the intermediate blocks (never the first
  or last); the choice depends on the model only, so batching and caching keep working.

The rewrite: a removed block's output (its last residual add) is replaced by the
residual stream entering it; for `mlp_only`, the MLP's residual add by its residual
input. Dead-code elimination then drops the block's linears and attention. The pass
runs before `kv_runtime` (RUNS_BEFORE), so a removed block's attention site is never
bound: its KV store is never allocated. Surviving attention nodes keep their original
block numbers (anatomy.BLOCK_META), so KV-store sites and other passes' per-layer
overrides (`[passes.kv_eviction.layers."N"]`) still mean block N of the unmodified model.
It also runs before `quantize`, so no dead weight is quantized.

With the model's own cache (HF DynamicCache / StaticCache through plain torch.compile),
a removed block's k/v projections still feed that cache and are kept (noted); the MLP,
q/o projections and attention go.

Modes (`mode`): "remove" rewrites the graph as above. "speculative" (every token the full
model's; greedy equal to plain decoding up to rounding ties, runtime/speculative.py) and
"schedule" (SkipDecode) keep every block in this graph: slimfx.runtime.generate runs them
(runtime/speculative.py, runtime/skip_schedule.py) with extra graphs of the same model
bound to the same KV store, compiled with mode "remove" (the draft; each schedule level
through `schedule_level`, which removes the first share level/(levels - 1) of the chosen
blocks in their choice order: a plan's order, least important first, or as listed).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.fx

from slimfx.compiler.anatomy import BLOCK_META, REMOVED_META, Anatomy, Block, meta
from slimfx.compiler.artifacts import check_fields, read_json_artifact, write_json_artifact
from slimfx.compiler.config import ConfigError, Option
from slimfx.compiler.passmanager import PassContext, PassResult
from slimfx.passes._identity import IDENTITY_FIELDS, check_plan_model, describe_model, identity_of_model, model_identity

NAME = "layer_skip"
MODES = ("remove", "speculative", "schedule")
DESCRIPTION = ("removes decoder blocks or their MLPs: listed, from a calibrated plan (Block Influence, SLEB), "
               "or evenly spread for a target speedup (lossy)")
LOSSY = True
RUNS_BEFORE = ("kv_runtime", "quantize")  # a removed site is never bound; no dead weight is quantized
OPTIONS: dict = {
    "blocks": Option(list, [], "blocks of the unmodified model to remove (numbered from 0)", item=int, lo=0, per_layer=False),
    "plan": Option(str, "none", "artifact key of a `slimfx calibrate skip` plan, or 'none'", per_layer=False),
    "mlp_only": Option(bool, False, "remove only the chosen blocks' MLPs (attention and KV cache stay exact)", per_layer=False),
    "target_speedup": Option(float, 0.0, "unified skipping: remove the fewest evenly spread intermediate blocks whose weight "
                             "bytes give this decode speedup (0: off)", lo=0.0, hi=100.0, per_layer=False),
    "mode": Option(str, "remove", "remove: the graph loses the blocks (lossy); speculative: self-speculative decoding "
                   "drafting with them removed (every token the full model's; greedy equal to plain decoding up to bf16 rounding ties); schedule: SkipDecode, removed progressively over the generated tokens (lossy)",
                   choices=MODES, per_layer=False),
    "draft_length": Option(int, 4, "speculative: most tokens drafted per verification", lo=1, hi=16, per_layer=False),
    "adaptive_draft": Option(bool, True, "speculative: draft length follows the running acceptance rate (else always draft_length)",
                             per_layer=False),
    "schedule_levels": Option(int, 4, "schedule: depths (compiled graphs) from the full model to all chosen blocks removed",
                              lo=2, hi=16, per_layer=False),
    "schedule_tokens": Option(int, 64, "schedule: generated tokens over which the depth falls to its last level", lo=1,
                              hi=1 << 20, per_layer=False),
    "schedule_level": Option(int, -1, "set by the runtime for one schedule graph: remove the first level/(levels - 1) of the "
                             "chosen blocks (-1: all)", lo=-1, hi=15, per_layer=False),
}

PLAN_KIND = "slimfx.layer_skip_plan"
PLAN_VERSION = 1
TARGETS = ("block", "mlp")
METHODS = ("block_influence", "sleb")


# ----------------------------------------------------------------------------- plans

_PLAN_FIELDS = {"kind": str, "version": int, "model": dict, "target": str, "method": str, "skip": list,
                "scores": dict, "calibration": dict}


def validate_plan(plan, where: str) -> dict:
    """`plan` when it is a valid layer-skip plan; else ValueError naming the first bad field."""
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND or plan.get("version") != PLAN_VERSION:
        raise ValueError(f"{where}: not a {PLAN_KIND} v{PLAN_VERSION} file (written by `slimfx calibrate skip`)")
    check_fields(plan, _PLAN_FIELDS, where)
    check_fields(plan["model"], IDENTITY_FIELDS, where, "model.")
    if plan["target"] not in TARGETS or plan["method"] not in METHODS:
        raise ValueError(f"{where}: target {plan['target']!r} / method {plan['method']!r}; allowed: {TARGETS} / {METHODS}")
    n = plan["model"]["blocks"]
    skip = plan["skip"]
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < n for b in skip) or len(set(skip)) != len(skip):
        raise ValueError(f"{where}: field skip must list distinct blocks in 0-{n - 1}, got {skip!r:.60}")
    for name, scores in plan["scores"].items():
        if not isinstance(scores, list) or len(scores) != n or not all(s is None or isinstance(s, (int, float)) for s in scores):
            raise ValueError(f"{where}: field scores.{name} must list {n} numbers (one per block)")
    return plan


def read_plan(path) -> dict:
    """Load and validate a plan JSON; ValueError (one line) when it is not one."""
    plan = read_json_artifact(path, "slimfx calibrate skip")
    return validate_plan(plan, f"plan {str(path)!r}")


def write_plan(plan: dict, path) -> Path:
    """Validate and write `plan` atomically (a reader never sees half a plan)."""
    return write_json_artifact(validate_plan(plan, "plan"), path)


def format_plan(plan: dict) -> str:
    """The plan as text: what it removes, how it was chosen, the scores per block."""
    from slimfx.compiler.tables import format_table

    names = list(plan["scores"])
    rows = [[b, "removed" if b in plan["skip"] else "-", *("-" if plan["scores"][k][b] is None else f"{plan['scores'][k][b]:.4g}" for k in names)]
            for b in range(plan["model"]["blocks"])]
    what = "MLPs of blocks" if plan["target"] == "mlp" else "blocks"
    return (f"layer-skip plan: removes {what} {sorted(plan['skip'])} ({plan['method']}; model {describe_model(plan['model'])})\n"
            + format_table(["block", "plan", *names], rows))


# ----------------------------------------------------------------------------- choosing


def spread(count: int, n_blocks: int) -> list[int]:
    """`count` intermediate blocks of `n_blocks` (never the first or last), evenly spaced:
    the centres of `count` equal slices of blocks 1..n-2."""
    inner = n_blocks - 2
    if not 0 <= count <= inner:
        raise ValueError(f"spread: {count} of {inner} intermediate blocks")
    return [1 + int((j + 0.5) * inner / count) for j in range(count)]


def unified_count(n_blocks: int, removable: float, total: float, target: float) -> int:
    """Blocks to remove so that total / (total - count * removable) >= target (the cost
    model in the module doc); ConfigError when even every intermediate block is too few."""
    if removable <= 0:
        raise ConfigError(f"passes.{NAME}.target_speedup: got {target} but the anatomy found no weights to remove in the blocks")
    count = max(0, math.ceil(total * (1 - 1 / target) / removable - 1e-9))
    if count > n_blocks - 2:
        best = total / (total - (n_blocks - 2) * removable)
        raise ConfigError(f"passes.{NAME}.target_speedup: got {target}; allowed: at most {best:.3f} for this model "
                          f"(removing all {n_blocks - 2} intermediate blocks' weights), or 0 (off)")
    return count


def _weight_elements(anatomy: Anatomy, mlp_only: bool) -> tuple[float, float]:
    """(mean weight elements one removal takes away, weight elements of the whole graph)."""
    total = sum(l.in_features * l.out_features for l in anatomy.linears)
    per_block: dict[int, int] = {}
    for l in anatomy.linears:
        mlp_role = l.role in ("gate", "up", "gate_up", "down", "in_0", "in_1")
        if l.block is not None and (mlp_role or not mlp_only):
            per_block[l.block] = per_block.get(l.block, 0) + l.in_features * l.out_features
    return sum(per_block.values()) / max(1, len(per_block)), total


def _check_exclusive(opts: dict) -> None:
    given = [k for k, on in (("blocks", bool(opts["blocks"])), ("plan", opts["plan"] != "none"),
                              ("target_speedup", opts["target_speedup"] > 0)) if on]
    if len(given) > 1:
        raise ConfigError(f"passes.{NAME}: got {' and '.join(given)}; allowed: one of blocks, plan, target_speedup")
    if 0 < opts["target_speedup"] < 1:
        raise ConfigError(f"passes.{NAME}.target_speedup: got {opts['target_speedup']}; allowed: 0 (off) or a number >= 1")


def _check_blocks(blocks: list[int], n_blocks: int, mlp_only: bool, where: str) -> None:
    for i, b in enumerate(blocks):
        if b >= n_blocks:
            raise ConfigError(f"{where}[{i}]: got {b}; allowed: blocks 0-{n_blocks - 1} (the model has {n_blocks} blocks)")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{where}: got {blocks}; allowed: each block once")
    if not mlp_only and len(blocks) >= n_blocks:
        raise ConfigError(f"{where}: got all {n_blocks} blocks; allowed: at most {n_blocks - 1} (one block must remain)")


def _load_plan(cfg, config, identity: dict | None) -> dict:
    """The plan `cfg` names, valid and fit for `mlp_only` and, given its identity, the model."""
    key = cfg.options["plan"]
    where = f"artifacts.{key}"
    try:
        plan = read_plan(config.artifact_path(key))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if identity is not None:
        check_plan_model(plan, identity, where)
    if cfg.options["mlp_only"] and plan["target"] == "block":
        raise ConfigError(f"passes.{NAME}.mlp_only: got true but plan {key!r} removes whole blocks; "
                          "allowed: false, or a plan made with --target mlp")
    return plan


def check_artifacts(cfg, config, model=None, anatomy=None) -> None:
    """The skip plan loads and validates; given the model, it was made for this one."""
    if cfg.options["plan"] != "none":
        _load_plan(cfg, config, identity_of_model(model, anatomy) if anatomy is not None else None)


def _from_plan(gm, cfg, ctx: PassContext, anatomy: Anatomy) -> tuple[bool, list[int], str]:
    key = cfg.options["plan"]
    plan = _load_plan(cfg, ctx.config, model_identity(gm, anatomy, ctx.example_inputs))
    order = plan.get("order")
    ordered = order if isinstance(order, list) and sorted(order) == sorted(plan["skip"]) else sorted(plan["skip"])
    return plan["target"] == "mlp", ordered, f"plan {key}: {plan['method']}"


def choose(gm, cfg, ctx: PassContext, anatomy: Anatomy) -> tuple[bool, list[int], str]:
    """(mlp_only, blocks to remove in their choice order, how they were chosen) from the
    options (validated here)."""
    opts = cfg.options
    n = anatomy.model_blocks
    if opts["plan"] != "none":
        mlp_only, blocks, how = _from_plan(gm, cfg, ctx, anatomy)
    elif opts["target_speedup"] > 0:
        mlp_only = opts["mlp_only"]
        removable, total = _weight_elements(anatomy, mlp_only)
        count = unified_count(n, removable, total, opts["target_speedup"])
        blocks = spread(count, n)
        predicted = total / (total - count * removable)
        how = f"unified: target {opts['target_speedup']}x, predicted {predicted:.3f}x by weight bytes read per step"
    else:
        mlp_only, blocks, how = opts["mlp_only"], list(opts["blocks"]), "listed"
    _check_blocks(blocks, n, mlp_only, f"passes.{NAME}.blocks")
    return mlp_only, blocks, how


def level_share(blocks: list[int], level: int, levels: int) -> list[int]:
    """The blocks schedule level `level` of `levels` removes: the first ceil(level / (levels -
    1) of them), so each level removes a superset of the previous one's."""
    return blocks[:math.ceil(len(blocks) * level / (levels - 1))]


def _check_mode(opts: dict) -> None:
    level, levels = opts["schedule_level"], opts["schedule_levels"]
    if level >= 0 and opts["mode"] != "remove":
        raise ConfigError(f"passes.{NAME}.schedule_level: got {level} with mode {opts['mode']!r}; allowed: -1, "
                          "or a level with mode 'remove' (the runtime sets it for each schedule graph)")
    if level >= levels:
        raise ConfigError(f"passes.{NAME}.schedule_level: got {level}; allowed: -1 or 0-{levels - 1} (schedule_levels = {levels})")


# ----------------------------------------------------------------------------- rewrite


def _residual_input(add: torch.fx.Node, branch: torch.fx.Node, order: dict) -> torch.fx.Node | None:
    """The operand of residual add `add` that is the stream entering the block: of its two
    operands, the one computed before `branch` (the block's linear feeding the other one)."""
    operands = [a for a in add.args if isinstance(a, torch.fx.Node)]
    earlier = [a for a in operands if order[a] < order[branch]]
    return earlier[0] if len(operands) == 2 and len(earlier) == 1 else None


def bypass(gm: torch.fx.GraphModule, anatomy: Anatomy, block: Block, mlp_only: bool):
    """(stream in, stream out) nodes of `block` (or of its MLP): replacing every use of
    `out` by `in` removes it. A string saying why when the anatomy cannot delimit it."""
    by_name = {n.name: n for n in gm.graph.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    adds = [by_name.get(a) for a in block.residual_adds]
    if mlp_only:
        if block.mlp is None or len(adds) != 2:
            return f"block {block.index}: no MLP with a residual add found"
        first, branch = adds[1], by_name.get(block.mlp.linears.get("down"))
    else:
        site = next((s for s in anatomy.attention_sites if s.index == block.attention), None)
        if site is None or site.o_proj is None or not adds:
            return f"block {block.index}: no attention output projection with a residual add found"
        first, branch = adds[0], by_name.get(site.o_proj)
    stream_in = _residual_input(first, branch, order) if None not in (first, branch) else None
    out = adds[-1]
    if stream_in is None or meta(stream_in) is None or meta(stream_in).shape != meta(out).shape:
        return f"block {block.index}: the residual stream entering it was not found"
    return stream_in, out


def _linear_bytes(gm: torch.fx.GraphModule, anatomy: Anatomy) -> dict[str, int]:
    """Weight path -> bytes, for every linear of the anatomy."""
    by_name = {n.name: n for n in gm.graph.nodes}
    sizes = {}
    for info in anatomy.linears:
        w = meta(by_name[info.node].args[1]) if info.node in by_name else None
        sizes[info.weight] = w.numel() * w.element_size() if w is not None else 0
    return sizes


def _kv_bytes_per_token(gm, anatomy: Anatomy, blocks: list[int]) -> int:
    by_name = {n.name: n for n in gm.graph.nodes}
    total = 0
    for s in anatomy.attention_sites:
        q = meta(by_name.get(s.q_input)) if s.q_input in by_name else None
        if s.index in blocks and s.n_kv_heads and s.head_dim and q is not None:
            total += 2 * s.n_kv_heads * s.head_dim * q.element_size()
    return total


def remove(gm: torch.fx.GraphModule, anatomy: Anatomy, pairs: dict[int, tuple], mlp_only: bool) -> list[str]:
    """Bypass every block of `pairs` ({block: (in, out)}), drop the dead code, record what
    went in gm.meta[REMOVED_META]; returns the weight paths no linear reads any more.
    Later blocks first: a block's input may be an earlier removed block's output."""
    for b in sorted(pairs, reverse=True):
        stream_in, out = pairs[b]
        out.replace_all_uses_with(stream_in)
    by_name = {n.name: n for n in gm.graph.nodes}
    for site in anatomy.attention_sites:
        if site.node in by_name:
            by_name[site.node].meta[BLOCK_META] = site.index
    gm.graph.eliminate_dead_code()
    gm.recompile()
    left = {n.name for n in gm.graph.nodes}
    gone = {l.weight for l in anatomy.linears} - {l.weight for l in anatomy.linears if l.node in left}
    removed = gm.meta.setdefault(REMOVED_META, {})
    for key, new in (("mlps" if mlp_only else "blocks", pairs), ("weights", gone)):
        removed[key] = sorted(set(removed.get(key, ())) | set(new))
    return sorted(gone)


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    _check_exclusive(cfg.options)
    _check_mode(cfg.options)
    anatomy = ctx.anatomy if ctx.anatomy is not None else ctx.refresh_anatomy(gm)
    if not anatomy.blocks or anatomy.lm_head is None:
        return PassResult.skipped(NAME, "not a whole-model graph (no decoder blocks or no LM head found)")
    if not (cfg.options["blocks"] or cfg.options["plan"] != "none" or cfg.options["target_speedup"] > 0):
        return PassResult.skipped(NAME, "nothing chosen (set blocks, plan or target_speedup)")
    mlp_only, chosen, how = choose(gm, cfg, ctx, anatomy)
    opts = cfg.options
    if opts["mode"] != "remove":
        what = f"MLPs of blocks {chosen}" if mlp_only else f"blocks {chosen}"
        use = "drafts with" if opts["mode"] == "speculative" else "removes progressively"
        return PassResult.skipped(NAME, f"mode {opts['mode']}: this graph keeps every block; slimfx.runtime.generate {use} "
                                  f"{what} ({how})")
    if opts["schedule_level"] >= 0:
        chosen = level_share(chosen, opts["schedule_level"], opts["schedule_levels"])
        how = f"{how}; schedule level {opts['schedule_level']} of {opts['schedule_levels'] - 1}"
    chosen = sorted(chosen)
    if not chosen:
        return PassResult.skipped(NAME, f"nothing to remove ({how})")
    by_index = {b.index: b for b in anatomy.blocks}
    found = {b: bypass(gm, anatomy, by_index[b], mlp_only) if b in by_index else f"block {b}: already removed" for b in chosen}
    problems = [why for why in found.values() if isinstance(why, str)]
    if problems:
        return PassResult.skipped(NAME, "; ".join(problems[:3]))
    sizes = _linear_bytes(gm, anatomy)
    kv_all = _kv_bytes_per_token(gm, anatomy, [s.index for s in anatomy.attention_sites])
    kv_saved = 0 if mlp_only else _kv_bytes_per_token(gm, anatomy, chosen)
    gone = remove(gm, anatomy, found, mlp_only)
    after = ctx.refresh_anatomy(gm)
    return _result(anatomy, after, sizes, gone, chosen, mlp_only, how, kv_saved, kv_all)


def _result(before: Anatomy, after: Anatomy, sizes: dict, gone: list[str], chosen: list[int], mlp_only: bool, how: str,
            kv_saved: int, kv_all: int) -> PassResult:
    left = {l.weight for l in after.linears}
    kept = sorted(l.weight for l in before.linears if l.block in chosen and l.weight in left and
                  (not mlp_only or l.role not in ("q", "k", "v", "qkv", "o")))
    what = f"MLPs of blocks {chosen}" if mlp_only else f"blocks {chosen}"
    notes = [f"lossy: removed {what} ({how})"]
    if kv_saved:
        notes.append(f"KV cache: {len(chosen)} of {before.model_blocks} attention sites gone "
                     f"({kv_saved} B per token less in the runtime's store)")
    if kept:
        notes.append(f"{len(kept)} linears of removed blocks still computed: they feed the model's own cache "
                     f"(slimfx.runtime.generate drops them), e.g. {kept[0]}")
    saved = sum(sizes[w] for w in gone)
    # What measure/footprint.py subtracts: the weights no linear reads, and the runtime store's
    # KV bytes per token without the removed blocks' sites (the model's own cache keeps them).
    footprint = {"weight_bytes_saved": saved}
    if kv_saved:
        footprint["kv_bytes_per_token"] = kv_all - kv_saved
    return PassResult(
        NAME, applied=True, sites_matched=len(chosen), nodes_rewritten=len(chosen), bytes_saved=saved, notes=notes,
        details={"removed_blocks": [] if mlp_only else chosen, "removed_mlps": chosen if mlp_only else [],
                 "removed_linears": gone, "kv_bytes_per_token_saved": kv_saved, "chosen_by": how,
                 "weight_fraction_kept": 1 - saved / max(1, sum(sizes.values())), "footprint": footprint},
    )
