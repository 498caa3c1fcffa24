"""KV-cache eviction: every attention site keeps at most `budget` tokens (lossy).

Runs after `kv_runtime` (which binds each site to a slot store). For every
`slimfx::attention` node the pass shrinks the site's store buffers to the layer's
budget (real memory: the buffers are reallocated at that size) and replaces the node
by `slimfx::attention_evict`, which writes each new token into the slot its policy
frees and lets the fused decode kernel accumulate the attention mass the policy ranks
by (runtime/eviction_op.py). Policies: runtime/eviction.py. Per-layer budgets and
policies come from `[passes.kv_eviction.layers."a-b"]`.

With a budget at least the total length nothing is ever evicted and the output equals
the unmodified model's (tested for every policy).
"""

from __future__ import annotations


import torch
import torch.fx

from slimfx.compiler.config import ConfigError, Option
from slimfx.compiler.passmanager import PassContext, PassResult
from slimfx.runtime.eviction import POLICIES, make_policy

NAME = "kv_eviction"
DESCRIPTION = "keeps a fixed token budget per attention site, chosen by a policy (StreamingLLM, H2O, A2SF, TOVA, Keyformer, SnapKV)"
LOSSY = True
RUNS_AFTER = ("kv_runtime",)  # works on the slimfx::attention nodes kv_runtime creates
OPTIONS = {
    "policy": Option(str, "h2o", "which tokens to keep", choices=tuple(POLICIES)),
    "budget": Option(int, 256, "tokens kept per site (sinks and recent window included)", lo=2, hi=1 << 24),
    "n_sink": Option(int, 4, "first tokens always kept (attention sinks)", lo=0, hi=1 << 16),
    "window": Option(int, 32, "most recent tokens always kept", lo=0, hi=1 << 20),
    "alpha": Option(float, 0.95, "A2SF forgetting factor", lo=0.0, hi=1.0),
    "tau": Option(float, 1.0, "Keyformer Gumbel temperature", lo=1e-3, hi=100.0),
    "obs_window": Option(int, 32, "SnapKV observation window (last prompt queries)", lo=1, hi=1 << 16),
}


def _policy_param(opts: dict) -> float:
    return {"a2sf": opts["alpha"], "keyformer": opts["tau"], "snapkv": float(opts["obs_window"])}.get(opts["policy"], 0.0)


def _site_index(node: torch.fx.Node) -> int | None:
    return node.meta.get("slimfx_site")  # set by kv_runtime on every op it creates


def _resize_site(gm: torch.fx.GraphModule, store, index: int, budget: int) -> int:
    """Reallocate site `index`'s buffers at `budget` slots (empty); returns bytes saved."""
    from slimfx.runtime.kv_store import SiteCache

    old = store.sites[index]
    if old.capacity == budget:
        return 0
    B, H, _, D = old.k.shape
    new = SiteCache(
        index=index,
        k=torch.zeros(B, H, budget, D, dtype=old.k.dtype, device=old.k.device),
        v=torch.zeros(B, H, budget, D, dtype=old.v.dtype, device=old.v.device),
        slot_pos=torch.full((B, H, budget), -1, dtype=old.slot_pos.dtype, device=old.slot_pos.device),
        scores=torch.zeros(B, H, budget, dtype=old.scores.dtype, device=old.scores.device),
    )
    saved = old.nbytes() - new.nbytes()
    store.sites[index] = new
    store.capacities[index] = budget
    for field in ("k", "v", "slot_pos", "scores"):
        setattr(gm, f"_slimfx_kv{index}_{field}", getattr(new, field))
    return saved


def _check_options(index: int, opts: dict) -> None:
    try:
        make_policy(opts["policy"], opts["budget"], n_sink=opts["n_sink"], window=opts["window"])
    except ConfigError as exc:  # "budget: got ..." -> the full key path and the layer
        raise ConfigError(f"passes.kv_eviction.{exc}".replace(":", f" (layer {index}):", 1)) from None


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    import slimfx.runtime.eviction_op  # noqa: F401  registers torch.ops.slimfx.attention_evict
    from slimfx.runtime.kv_store import get_store

    target = getattr(getattr(torch.ops, "slimfx", None), "attention", None)
    nodes = [n for n in gm.graph.nodes if target is not None and n.op == "call_function" and n.target == target.default]
    if not nodes:
        return PassResult.skipped(NAME, "no slimfx::attention sites (run kv_runtime first, through slimfx.runtime.generate)")
    store = get_store(ctx.config.pass_config("kv_runtime").options["store"])
    if store is None:
        return PassResult.skipped(NAME, "the KV store of kv_runtime is gone")
    saved, rewritten, notes = 0, 0, []
    for node in nodes:
        index = _site_index(node)
        if index is None or index not in store.sites:
            notes.append(f"{node.name}: site buffers not recognised")
            continue
        opts = cfg.for_layer(index)
        _check_options(index, opts)
        cache = store.sites[index]
        if cache.owner is not None:
            notes.append(f"site {index} reads site {cache.owner}'s cache: evicted there")
            continue
        if opts["budget"] > cache.capacity:
            notes.append(f"site {index}: budget {opts['budget']} > store capacity {cache.capacity}, nothing to evict")
            continue
        saved += _resize_site(gm, store, index, opts["budget"])
        q, k, v, pos, kc, vc, sp, sc, scale = node.args[:9]
        for attr, field in ((kc, "k"), (vc, "v"), (sp, "slot_pos"), (sc, "scores")):
            attr.meta["example_value"] = getattr(store.sites[index], field)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                torch.ops.slimfx.attention_evict.default,
                (q, k, v, pos, kc, vc, sp, sc, float(scale), opts["policy"], opts["n_sink"], opts["window"], _policy_param(opts)),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten += 1
    if not rewritten:
        return PassResult(NAME, applied=False, sites_matched=len(nodes), notes=notes)
    gm.recompile()
    return PassResult(NAME, applied=True, sites_matched=len(nodes), nodes_rewritten=rewritten, bytes_saved=saved, notes=notes,
                      details={"budgets": {i: cfg.for_layer(i)["budget"] for i in sorted(store.sites)}})
