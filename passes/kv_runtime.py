"""Bind every attention site to the runtime KV store: SDPA, or hand-written matmul-softmax
attention (HF "eager"), -> torch.ops.slimfx.attention.

The base rewrite of DESIGN.md decisions 2-4 (lossless when every site's capacity
covers the whole sequence). Needs: anatomy (ctx.anatomy) and a graph captured
*without* a model-side cache, i.e. the model called with `use_cache=False` and its
true `position_ids` (what `slimfx.runtime.generate` does): then each SDPA consumes
exactly this step's k/v and the pass turns it into one op that writes them into the
site's slot buffers and attends over the store. A site that carries a cache of the
model's own (HF DynamicCache / StaticCache) cannot occur under the runtime, which calls
the model with `use_cache=False`: finding one means the anatomy misread the graph, and
the pass refuses (as for any site it cannot bind) rather than run two caches.

For every site the pass
  1. asks the store (found by id in the runtime registry, `passes.kv_runtime.store`)
     for the site's SiteCache (allocated on first use with the anatomy's heads),
  2. registers the site's tier buffers and the store's step-position buffer on the graph
     module as buffers (the *same* tensors, so the runtime sees every in-place write
     and a captured CUDA graph keeps valid addresses),
  3. replaces the SDPA node (or the probabilities x v matmul) by
     `slimfx::attention(q, k, v, positions, buffers, scale, layout[, softcap=c])`, taking
     k/v from before HF's `repeat_kv` (the op handles GQA itself), with the scale and logit
     softcapping the anatomy read off the scores,
then removes what became dead (the causal mask, the repeated k/v, the scores).

The op reads causally by position and a sliding-window site through its window
(runtime/exactness.py), so the model's mask is dropped. That is exact only where the mask
is what the anatomy says it is: a site whose variant names something not understood (a
chunked mask, an additive score bias such as ALiBi, attention sinks), that is not causal,
or whose mask keeps another window than the config names, is refused, as is any site the
pass cannot bind.

Lowering: the rewritten graph runs through its FX code (codegen "eager"/"auto");
the buffers are graph attributes mutated in place, which inductor's constant
handling would not write back, so the generator never lowers it with inductor.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from slimfx.compiler.anatomy import AttentionSite, is_sdpa, shape_of
from slimfx.compiler.config import Option
from slimfx.compiler.errors import UsageError
from slimfx.compiler.passmanager import PassContext, PassResult
from slimfx.passes._graph import attention_sites, bind_site, bind_tensor, replace_with_attention, sdpa_operands, sdpa_scale

NAME = "kv_runtime"
DESCRIPTION = "replaces each attention site (SDPA, no model cache) by one slimfx::attention op over a runtime KV store"
LOSSY = False
OPTIONS: dict = {
    "store": Option(str, "default", "id of the runtime KVStore to bind (slimfx.runtime.kv_store.register_store)", per_layer=False),
}


def _site_skip_reason(site: AttentionSite, node: torch.fx.Node | None, store) -> str | None:
    variant = site.variant
    if node is None or not (is_sdpa(node) or site.kind == "matmul_softmax"):
        return f"site {site.index}: not an attention the store binds ({site.kind})"
    if site.cache.kind != "none":
        return f"site {site.index}: the graph keeps a {site.cache.kind} KV cache of its own (called with use_cache=True?)"
    if not (site.n_q_heads and site.n_kv_heads and site.head_dim):
        return f"site {site.index}: head counts unknown"
    if variant.not_understood:
        return f"site {site.index}: {variant.not_understood[0]}"
    if not variant.causal:
        what = "is not causal" if variant.causal is False else "shows no causality in the graph (a mask from a buffer or an input?)"
        return f"site {site.index}: the attention {what}; the store reads causally"
    config_window = store.windows.get(site.index)
    if variant.window and variant.window != config_window:
        # The store sizes and masks a site by the config's window: a mask that keeps
        # another window would make the runtime read other positions than the model.
        return (f"site {site.index}: the model's mask keeps a sliding window of {variant.window} positions but its config "
                f"names {config_window or 'none'} for this layer")
    return None


_TRANSPOSE_LAST = ({2, 3}, {-1, -2}, {2, -1}, {-2, 3})


def _untransposed(gm, site: AttentionSite) -> AttentionSite | None:
    """The site with its key operand before `k.transpose(-2, -1)` (hand-written attention
    multiplies q by k^T), or None when the key is not such a transpose."""
    k_t = next((n for n in gm.graph.nodes if n.name == site.k_input), None)
    if k_t is None or not (k_t.op == "call_method" and k_t.target == "transpose" or k_t.target is torch.transpose):
        return None
    dims = set(k_t.args[1:3])
    if dims not in _TRANSPOSE_LAST or not isinstance(k_t.args[0], torch.fx.Node):
        return None
    return dataclasses.replace(site, k_input=k_t.args[0].name)


def _operands_now(site: AttentionSite, node: torch.fx.Node) -> AttentionSite:
    """The site with q/k/v as the SDPA call reads them now: an earlier pass may have removed
    a node the anatomy named (fold_noop_casts drops OLMo-2's no-op cast of q)."""
    qkv = [node.args[i] if len(node.args) > i else node.kwargs.get(name) for i, name in enumerate(("query", "key", "value"))]
    names = [x.name if isinstance(x, torch.fx.Node) else None for x in qkv]
    return dataclasses.replace(site, q_input=names[0], k_input=names[1], v_input=names[2])


def _rewrite_site(gm, site: AttentionSite, node: torch.fx.Node, store) -> str | None:
    eager = site.kind == "matmul_softmax"
    if eager:
        index, site = site.index, _untransposed(gm, site)
        if site is None:
            return f"site {index}: the key operand is not k.transpose(-2, -1)"
        node = next((n for n in gm.graph.nodes if n.name == site.output), None)  # the probabilities x v matmul
        if node is None:
            return f"site {index}: its output {site.output} is no longer in the graph"
    else:
        site = _operands_now(site, node)
    q, k, v = sdpa_operands(gm, site)
    qshape = shape_of(q) if q is not None else None
    if q is None or k is None or v is None or qshape is None:
        return f"site {site.index}: q/k/v operands not found at {site.n_kv_heads} kv heads"
    batch, tokens = int(qshape[0]), int(qshape[2])
    if batch != store.batch:
        raise ValueError(f"kv_runtime: graph batch {batch} but store {store.id} was made for batch {store.batch}")
    cache = store.site(site.index, site.n_kv_heads, site.head_dim)
    positions = bind_tensor(gm, f"_slimfx_pos{tokens}", store.step_positions(tokens), node)
    scale = site.variant.scale if eager else sdpa_scale(node, site.head_dim)
    # Another graph of this model (a prefill length, the decode step) may have had this
    # site relaid out by a later pass already: the op takes the site as it is now.
    args = (q, k, v, positions, bind_site(gm, cache, node), scale, cache.layout)
    kwargs = {"softcap": site.variant.softcap} if site.variant.softcap else {}
    replace_with_attention(gm, node, site.index, args, kwargs)
    return None


def _unique(notes: list[str], shown: int = 3) -> list[str]:
    """The first few distinct reasons, site numbers folded: 30 sites rarely differ."""
    reasons: dict[str, list[str]] = {}
    for note in notes:
        site, _, why = note.partition(": ")
        reasons.setdefault(why, []).append(site.removeprefix("site "))
    return [f"sites {','.join(s[:6])}{',...' if len(s) > 6 else ''}: {why}" for why, s in list(reasons.items())[:shown]]


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    import slimfx.runtime.attention_op  # noqa: F401  registers torch.ops.slimfx.attention
    from slimfx.runtime.kv_store import get_store

    store_id = cfg.options["store"]
    store = get_store(store_id)
    if store is None:
        return PassResult.skipped(NAME, f"no KV store registered under {store_id!r} (slimfx.runtime.generate registers one)")
    anatomy = ctx.anatomy if ctx.anatomy is not None else ctx.refresh_anatomy(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    notes = []
    bound = {index for index, _ in attention_sites(gm)}  # kv_share binds its readers before this pass
    rewritten = len(bound)
    for site in anatomy.attention_sites:
        if site.index in bound:
            continue
        node = by_name.get(site.node)
        why = _site_skip_reason(site, node, store) or _rewrite_site(gm, site, node, store)
        if why:
            notes.append(why)
        else:
            rewritten += 1
    sites = anatomy.attention_sites
    n_sites = len({s.index for s in sites} | bound)
    if not n_sites and anatomy.lm_head is None:
        return PassResult.skipped(NAME, "no attention sites in this graph (a piece of a model split by graph breaks)")
    if rewritten != n_sites or not n_sites:
        # The runtime calls the model without its own cache: an unbound site would
        # attend to the current step's tokens only, and a half-bound model over two
        # different caches. Either gives wrong tokens, so refuse.
        raise UsageError(
            f"the slimfx runtime cannot run this model exactly: it bound {rewritten} of "
            f"{n_sites} attention sites ({'; '.join(_unique(notes)) or 'the anatomy found no attention in a graph with an LM head'}); "
            f"allowed: causal SDPA or matmul-softmax attention (scale, softcap, causal/sliding mask), "
            f"or plain torch.compile(model, backend='slimfx') with model.generate"
        )
    gm.graph.eliminate_dead_code()
    gm.recompile()
    ctx.state.setdefault("kv_stores", {})[store.id] = store
    return PassResult(
        NAME, applied=True, sites_matched=n_sites, nodes_rewritten=rewritten,
        notes=notes, details={"store": store.id, "kv_bytes": store.nbytes()},
    )
