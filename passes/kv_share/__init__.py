"""Cross-layer KV sharing: a layer attends over an earlier layer's KV cache instead of its own (lossy).

The relation is a map reader layer -> owner layer (block numbers of the unmodified model),
from the first of these options that is set:
- `map = "3:2,5:4"`: explicit pairs;
- `plan = "KEY"`: `[artifacts] KEY = "share.json"`, a map calibrated by `slimfx calibrate
  share` (KVSharer), refused for a model it was not made for;
- `pattern` with `fraction` (round(fraction x layers) readers; adjacent and bottom spread
  them evenly over the intermediate layers, never the first or the last):
  `adjacent`: CLA-style pairs, a reader reads the layer just below it;
  `bottom`: groups of `group` consecutive layers all read the group's first layer;
  `upper`: adjacent pairs from the top layer down (the last layer reads the one below it).
An owner is always an earlier layer: within one forward pass a later layer's KV does not
exist yet when an earlier layer attends, so owners above their readers (YOCO-style, or
the study's "top" and "middle" configurations) need a second pass and are not offered. A
chain (5 reads 4, 4 reads 3) resolves to its root: both read layer 3.

The rewrite runs after `layer_skip` and before `kv_runtime`. A reader's attention becomes
one slimfx::attention op over its owner's KV store with the owner's layout read-only
(runtime/attention_op.Read): its queries are its own; its k/v projections and rotary work
lose their last use and dead-code elimination removes them; its store is never allocated
(KVStore.share). Passes that later relay the owner out (kv_eviction, kv_quantize) carry the
readers along (passes/_graph.relayout_site): a shared store is evicted once, by its
owner's policy, and quantized once. An owner removed by `layer_skip` is an error (the map
is not repaired: which layer should own instead is a quality choice); a removed reader drops
out of the map and its owner keeps its KV as it is.

`merge = "minicache"`: the pairs of the map merge their caches instead (MiniCache,
passes/kv_share/minicache.py): every owner has exactly one reader, both layers keep their
k/v projections and write every token, and the owner's store holds one shared unit
direction per token plus each layer's magnitudes, and the tokens whose two vectors are more
than `merge_threshold` apart (normalised angle) whole, in `keep_fraction` of the slots: about
half of the pair's KV bytes. `pattern = "upper"` gives MiniCache's placement: adjacent pairs
from the top layer down (from mid-depth when a quarter of the layers read). Merged pairs are
neither evicted nor quantized: a pipeline with kv_eviction or kv_quantize is refused.

Works where slimfx runs the KV store (slimfx.runtime.generate, slimfx run / eval / bench);
a model that keeps its own cache (plain torch.compile + model.generate) is left alone.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from slimfx.compiler.anatomy import Anatomy, shape_of
from slimfx.compiler.config import ConfigError, Option
from slimfx.compiler.passmanager import PassContext, PassResult
from slimfx.passes._graph import bind_site, bind_tensor, replace_with_attention, sdpa_operands, sdpa_scale

NAME = "kv_share"
DESCRIPTION = "lets chosen layers attend over an earlier layer's KV cache (explicit map, calibrated KVSharer plan, CLA pairs or groups); their k/v projections and stores go (lossy)"
LOSSY = True
RUNS_AFTER = ("layer_skip",)  # an owner must survive layer skipping
RUNS_BEFORE = ("kv_runtime",)  # readers are bound before the owners' stores are laid out
PATTERNS = ("none", "adjacent", "bottom", "upper")
MERGES = ("none", "minicache")
OPTIONS: dict = {
    "map": Option(str, "none", "explicit pairs 'reader:owner,...' of layer numbers (owner < reader), or 'none'", per_layer=False),
    "plan": Option(str, "none", "artifact key of a `slimfx calibrate share` map, or 'none'", per_layer=False),
    "pattern": Option(str, "none", "adjacent: CLA pairs (a layer reads the one below); bottom: groups read their first layer",
                      choices=PATTERNS, per_layer=False),
    "fraction": Option(float, 0.0, "share of the model's layers that read another layer's KV (pattern only)", lo=0.0, hi=1.0,
                       per_layer=False),
    "group": Option(int, 2, "bottom: consecutive layers per group (the first owns, the others read)", lo=2, hi=64, per_layer=False),
    "merge": Option(str, "none", "none: a reader reads its owner's KV; minicache: each pair merges its two caches "
                    "(shared directions, per-layer magnitudes)", choices=MERGES, per_layer=False),
    "merge_threshold": Option(float, 0.6, "minicache: normalised angle arccos(cos)/pi above which a token's two vectors stay apart",
                              lo=0.0, hi=1.0, per_layer=False),
    "keep_fraction": Option(float, 0.05, "minicache: share of a pair's slots for tokens kept apart", lo=0.0, hi=1.0, per_layer=False),
}


# ----------------------------------------------------------------------------- the map


def parse_map(text: str) -> dict[int, int]:
    """'5:4,7:6' -> {5: 4, 7: 6}; ConfigError naming the key and the allowed form."""
    pairs: dict[int, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        reader, sep, owner = item.partition(":")
        if not sep or not reader.strip().isdigit() or not owner.strip().isdigit():
            raise ConfigError(f"passes.{NAME}.map: got {text!r}; allowed: pairs 'reader:owner' of layer numbers, "
                              "separated by commas, e.g. '5:4,7:6'")
        if int(reader) in pairs:
            raise ConfigError(f"passes.{NAME}.map: layer {int(reader)} is given two owners in {text!r}")
        pairs[int(reader)] = int(owner)
    return pairs


def pattern_map(pattern: str, fraction: float, group: int, n_layers: int) -> dict[int, int]:
    """The readers of `pattern` (module doc) for a model of `n_layers` layers."""
    count = round(fraction * n_layers)
    if pattern == "none" or count == 0:
        return {}
    if pattern == "upper":
        if count > n_layers // 2:
            raise ConfigError(f"passes.{NAME}.fraction: got {fraction} ({count} of {n_layers} layers); allowed: at most "
                              f"{n_layers // 2 / n_layers:.3f} for pattern 'upper' (pairs of layers)")
        return {n_layers - 1 - 2 * j: n_layers - 2 - 2 * j for j in range(count)}
    size = 2 if pattern == "adjacent" else group
    # Groups of `size` consecutive intermediate layers: the first owns, the rest read.
    groups = [list(range(start, start + size)) for start in range(1, n_layers - size, size)]
    most = len(groups) * (size - 1)
    if count > most:
        raise ConfigError(f"passes.{NAME}.fraction: got {fraction} ({count} of {n_layers} layers); allowed: at most "
                          f"{most / n_layers:.3f} for pattern {pattern!r} with groups of {size} (the first and last layers own their KV)")
    chosen = [groups[int((j + 0.5) * len(groups) / -(-count // (size - 1)))] for j in range(-(-count // (size - 1)))]
    readers = [(layer, g[0]) for g in chosen for layer in g[1:]][:count]
    return dict(readers)


def resolve_chains(pairs: dict[int, int]) -> dict[int, int]:
    """Every reader mapped to the root of its chain (an owner that reads no one)."""
    roots = {}
    for reader, owner in pairs.items():
        while owner in pairs:
            owner = pairs[owner]
        roots[reader] = owner
    return roots


def check_map(pairs: dict[int, int], anatomy: Anatomy, where: str) -> None:
    """ConfigError (one line) unless every pair names two present layers, the owner first."""
    present = {site.index: site for site in anatomy.attention_sites}
    n_layers = anatomy.model_blocks
    for reader, owner in sorted(pairs.items()):
        if owner >= reader:
            raise ConfigError(f"{where}: layer {reader} reads layer {owner}; allowed: an owner below its reader")
        for layer in (reader, owner):
            if layer >= n_layers:
                raise ConfigError(f"{where}: layer {layer} does not exist; allowed: layers 0-{n_layers - 1} of this model")
        if owner in anatomy.removed_blocks:
            raise ConfigError(f"{where}: owner layer {owner} (of reader {reader}) is removed by layer_skip; "
                              "allowed: an owner that stays (skip the reader too, or choose another owner)")
        if owner not in present and reader in present:
            raise ConfigError(f"{where}: owner layer {owner} has no attention site in this graph; allowed: layers {sorted(present)}")
        a, b = present.get(reader), present.get(owner)
        if a and b and (a.n_kv_heads, a.head_dim) != (b.n_kv_heads, b.head_dim):
            raise ConfigError(f"{where}: layer {reader} has {a.n_kv_heads} kv heads x {a.head_dim}, owner {owner} has "
                              f"{b.n_kv_heads} x {b.head_dim}; allowed: an owner of the same head shape")


def sharing_map(gm, cfg, ctx: PassContext, anatomy: Anatomy) -> tuple[dict[int, int], str]:
    """(reader -> root owner, where the map came from), validated against the model."""
    from slimfx.passes._identity import model_identity

    return _resolve(cfg.options, ctx.config, anatomy, lambda: model_identity(gm, anatomy, ctx.example_inputs))


def _resolve(opts: dict, config, anatomy: Anatomy, identity) -> tuple[dict[int, int], str]:
    if opts["map"] != "none":
        pairs, where = parse_map(opts["map"]), f"passes.{NAME}.map"
    elif opts["plan"] != "none":
        from slimfx.passes.kv_share.plan import load_plan

        pairs, where = load_plan(config, opts["plan"], identity()), f"passes.{NAME}.plan"
    else:
        pairs = pattern_map(opts["pattern"], opts["fraction"], opts["group"], anatomy.model_blocks)
        where = f"passes.{NAME}.pattern"
    check_map(pairs, anatomy, where)
    return resolve_chains(pairs), where


def check_artifacts(cfg, config, model=None, anatomy=None) -> None:
    """The sharing plan loads and validates; given the model, the map (from the plan, `map`
    or `pattern`) fits it: made for this model, pairing layers it has of one head shape."""
    from slimfx.passes._identity import identity_of_model
    from slimfx.passes.kv_share.plan import load_plan

    if anatomy is not None:
        _resolve(cfg.options, config, anatomy, lambda: identity_of_model(model, anatomy))
    elif cfg.options["plan"] != "none":
        load_plan(config, cfg.options["plan"], None)


def describe_config(config, model, anatomy: Anatomy) -> str:
    """What `config`'s kv_share section makes of this model, as text (`slimfx inspect --config`)."""
    from slimfx.passes._identity import identity_of_model

    if NAME not in config.pipeline:
        return f"KV sharing: none (the pipeline {config.pipeline} has no {NAME})"
    opts = config.pass_config(NAME).options
    pairs, where = _resolve(opts, config, anatomy, lambda: identity_of_model(model, anatomy))
    sites = {site.index: site for site in anatomy.attention_sites}
    if opts["merge"] == "minicache":
        check_merge(pairs, sites, config.pipeline, where)
    how = "merge their KV with (MiniCache)" if opts["merge"] == "minicache" else "read the KV of"
    shown = ", ".join(f"{r} -> {o}" for r, o in sorted(pairs.items())) or "none"
    return (f"KV sharing ({where.rsplit('.', 1)[1]}): {len(pairs)} of {anatomy.model_blocks} layers {how} an earlier layer: "
            f"{shown} (reader -> owner)")


# ----------------------------------------------------------------------------- the rewrite


def _bind_reader(gm: torch.fx.GraphModule, site, node: torch.fx.Node, store) -> None:
    """The reader's SDPA -> slimfx::attention over the owner's tiers, read-only. k and v
    are not read: the op gets q in their place, so their projections become dead code."""
    q, _, _ = sdpa_operands(gm, site)
    shape = shape_of(q) if q is not None else None
    if shape is None:
        raise ConfigError(f"passes.{NAME}: layer {site.index}'s query operand was not found; allowed: SDPA attention sites")
    cache = store.site(site.index, site.n_kv_heads, site.head_dim)  # the owner's tiers, read-only
    positions = bind_tensor(gm, f"_slimfx_pos{int(shape[2])}", store.step_positions(int(shape[2])), node)
    args = (q, q, q, positions, bind_site(gm, cache, node), sdpa_scale(node, site.head_dim), cache.layout)
    replace_with_attention(gm, node, site.index, args)


def kv_footprint(sites: dict, readers: dict[int, int], store) -> dict:
    """KV bytes one cached token of one sequence adds, all layers (measure/footprint.py):
    K and V of every site that owns its KV, nothing for a reader; a merged pair's owner
    counts its directions, magnitudes and keep slots per slot. Slot positions are left out,
    as in the unmodified figure."""
    elem = torch.empty((), dtype=store.dtype).element_size()
    per_token = 0.0
    for index, site in sites.items():
        if index in readers:
            continue
        cache = store.sites.get(index)
        if cache is None or cache.layout != "minicache/0":
            per_token += 2 * site.n_kv_heads * site.head_dim * elem
            continue
        data = sum(t.nbytes() - t.slot_pos.numel() * t.slot_pos.element_size() for t in cache.tiers.values())
        per_token += data / (store.batch * cache.capacity)
    return {"kv_bytes_per_token": round(per_token)}


def check_merge(pairs: dict[int, int], sites: dict, pipeline: list[str], where: str) -> None:
    """ConfigError (one line) unless `pairs` can merge as MiniCache pairs in this pipeline."""
    clash = [p for p in ("kv_eviction", "kv_quantize") if p in pipeline]
    if clash:
        raise ConfigError(f"passes.{NAME}.merge: 'minicache' with {clash[0]} in the pipeline; allowed: merged pairs without "
                          "eviction or KV quantization (merge = 'none' composes with both)")
    owners = sorted(pairs.values())
    for owner in owners:
        if owners.count(owner) > 1 or owner in pairs:
            raise ConfigError(f"{where}: layer {owner} is merged with {owners.count(owner)} readers or is a reader itself; "
                              "allowed with merge = 'minicache': disjoint pairs (one reader per owner)")
    for layer in (*pairs, *owners):
        if layer in sites and sites[layer].variant.window:
            raise ConfigError(f"{where}: layer {layer} is a sliding-window layer; allowed with merge = 'minicache': global layers")


def _merge_pair(gm, owner, reader, node, store, opts) -> int:
    """Lay the owner's store out as a merged pair (once per model) and bind the reader's SDPA
    to it with its own k/v; the owner's node is bound by kv_runtime. Returns the keep slots."""
    from slimfx.passes.kv_share.minicache import layouts, merged_tiers

    lower, upper = layouts(opts["merge_threshold"])
    cache = store.site(owner.index, owner.n_kv_heads, owner.head_dim)
    if cache.layout != lower:
        keep = math.ceil(opts["keep_fraction"] * cache.capacity)
        store.relayout(owner.index, lower, merged_tiers(store.batch, owner.n_kv_heads, cache.capacity, owner.head_dim, keep,
                                                        dtype=store.dtype, device=store.device))
    if store.sites.get(reader.index) is None:
        store.share(reader.index, owner.index)
    shared = store.site(reader.index, reader.n_kv_heads, reader.head_dim)
    shared.layout = upper  # the reader writes too: its own variant, not read/<owner's>
    q, k, v = sdpa_operands(gm, reader)
    shape = shape_of(q) if q is not None else None
    if shape is None or k is None or v is None:
        raise ConfigError(f"passes.{NAME}: layer {reader.index}'s q/k/v operands were not found; allowed: SDPA attention sites")
    positions = bind_tensor(gm, f"_slimfx_pos{int(shape[2])}", store.step_positions(int(shape[2])), node)
    args = (q, k, v, positions, bind_site(gm, shared, node), sdpa_scale(node, reader.head_dim), upper)
    replace_with_attention(gm, node, reader.index, args)
    return store.sites[owner.index].tiers["keep"].capacity


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    import slimfx.runtime.attention_op  # noqa: F401  registers torch.ops.slimfx.attention
    from slimfx.runtime.kv_store import get_store

    anatomy = ctx.anatomy if ctx.anatomy is not None else ctx.refresh_anatomy(gm)
    pairs, where = sharing_map(gm, cfg, ctx, anatomy)
    if not pairs:
        return PassResult.skipped(NAME, f"no layer reads another's KV ({where} names none)")
    store = get_store(ctx.config.pass_config("kv_runtime").options["store"])
    if store is None:
        return PassResult.skipped(NAME, "no slimfx KV store (it works through slimfx.runtime.generate / slimfx run; "
                                        "the model's own cache keeps every layer's KV)")
    by_name = {n.name: n for n in gm.graph.nodes}
    sites = {site.index: site for site in anatomy.attention_sites}
    if cfg.options["merge"] == "minicache":
        return _run_merge(gm, pairs, sites, by_name, store, cfg.options, ctx, where, anatomy.model_blocks)
    owners = {o: sites[o] for o in set(pairs.values()) if o in sites}
    for owner, site in owners.items():  # bound first, so readers find their tiers
        store.site(owner, site.n_kv_heads, site.head_dim)
    readers = [r for r in sorted(pairs) if r in sites]
    for reader in readers:
        if store.sites.get(reader) is None or store.sites[reader].owner is None:
            store.share(reader, pairs[reader])
        _bind_reader(gm, sites[reader], by_name[sites[reader].node], store)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    shared = {r: pairs[r] for r in readers}
    n_layers = anatomy.model_blocks
    return PassResult(NAME, applied=True, sites_matched=len(sites), nodes_rewritten=len(readers),
                      notes=[f"{where}: layers {sorted(set(pairs) - set(readers))} are not in this graph"] if len(readers) < len(pairs) else [],
                      details={"map": shared, "shared_layers": len(shared), "kv_fraction_shared": len(shared) / n_layers,
                               "footprint": kv_footprint(sites, shared, store)})


def _run_merge(gm, pairs, sites, by_name, store, opts, ctx, where, n_layers) -> PassResult:
    check_merge(pairs, sites, ctx.config.pipeline, where)
    import slimfx.passes.kv_share.minicache  # noqa: F401  registers the minicache variant

    merged = {r: o for r, o in sorted(pairs.items()) if r in sites and o in sites}
    before = {o: store.site(o, sites[o].n_kv_heads, sites[o].head_dim).nbytes() for o in merged.values()}
    plain = {o: (n if store.sites[o].layout != "minicache/0" else None) for o, n in before.items()}
    keep = {r: _merge_pair(gm, sites[o], sites[r], by_name[sites[r].node], store, opts) for r, o in merged.items()}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    saved = sum(2 * n - store.sites[o].nbytes() for o, n in plain.items() if n is not None)
    return PassResult(NAME, applied=True, sites_matched=len(sites), nodes_rewritten=len(merged), bytes_saved=saved,
                      notes=[f"{where}: layers {sorted(set(pairs) - set(merged))} are not in this graph"] if len(merged) < len(pairs) else [],
                      details={"map": merged, "merge": "minicache", "merged_layers": len(merged), "keep_slots": keep,
                               "merge_threshold": opts["merge_threshold"], "kv_fraction_shared": len(merged) / n_layers,
                               "footprint": kv_footprint(sites, merged, store)})
