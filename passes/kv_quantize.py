"""KV-cache quantization: each attention site's store holds k/v in a low-bit format (lossy).

Runs after `kv_runtime` (which binds each site to a slot store). For every
`slimfx::attention` node the pass reallocates the site's buffers in the quantized
layout (runtime/kv_quant_op.py: a quantized tier of the same capacity plus a small
full-precision buffer for the attention sinks and the most recent tokens) and
replaces the node by `slimfx::attention_kvq`, which quantizes each token on write.
Bytes saved are the store bytes no longer held (and no longer read each decode step).

Formats (runtime/kv_quant.py): int8 / fp8 per token (the safe default: sinks and a
recent window stay in the model's dtype), int4 / int2 KIVI (keys per channel over
groups of `group` tokens, values per token; a window of `residual` recent tokens in
full precision). Per-layer formats come from `[passes.kv_quantize.layers."a-b"]`.

Sites already rewritten by `kv_eviction` are left alone and reported: quantizing what
an eviction policy keeps is a different design (MiKV: evicted tokens go to a
low-precision tier instead of being dropped), not this pass.
"""

from __future__ import annotations

import torch
import torch.fx

from slimfx.compiler.config import ConfigError, Option
from slimfx.compiler.passmanager import PassContext, PassResult
from slimfx.passes._graph import bind_tensor
from slimfx.runtime.kv_quant import FORMATS, get_format, has_fp8

NAME = "kv_quantize"
DESCRIPTION = "stores each attention site's KV cache quantized on write (int8/fp8 per token, KIVI int4/int2) with sinks and a recent window in full precision"
LOSSY = True
RUNS_AFTER = ("kv_runtime",)  # works on the slimfx::attention nodes kv_runtime creates
OPTIONS = {
    "format": Option(str, "int8", "KV format: int8 / fp8 per token, int4 / int2 KIVI (keys per channel, values per token)", choices=tuple(FORMATS)),
    "group": Option(int, 32, "KIVI: tokens per key quantization group (int4/int2 only)", lo=1, hi=4096),
    "residual": Option(int, 128, "most recent tokens kept in full precision", lo=0, hi=1 << 20),
    "n_sink": Option(int, 4, "first tokens kept in full precision (attention sinks)", lo=0, hi=1 << 16),
}


def _check_options(index: int, opts: dict) -> None:
    if opts["format"] == "fp8" and not has_fp8():
        raise ConfigError(f"passes.kv_quantize.format (layer {index}): got 'fp8'; this torch build has no float8_e4m3fn; allowed here: int8, int4, int2")


def _attention_nodes(gm: torch.fx.GraphModule, op_name: str) -> list[torch.fx.Node]:
    target = getattr(getattr(torch.ops, "slimfx", None), op_name, None)
    if target is None:
        return []
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target.default]


def _settings(opts: dict) -> tuple:
    kivi = get_format(opts["format"]).key_axis == "channel"
    return (opts["format"], opts["group"] if kivi else 1, opts["residual"], opts["n_sink"])


def _quantize_site(gm: torch.fx.GraphModule, store, index: int, opts: dict) -> int:
    """Reallocate site `index`'s buffers in the quantized layout (empty); returns bytes saved.
    A later graph of the same model (another prefill length, the decode step) finds the
    site already quantized and reuses it."""
    from slimfx.runtime.kv_quant_op import QuantSiteCache, quantized_site

    old = store.sites[index]
    if isinstance(old, QuantSiteCache):
        if old.settings() != _settings(opts):
            raise RuntimeError(f"kv_quantize: site {index} is already quantized as {old.settings()}, asked for {_settings(opts)}")
        new, saved = old, 0
    else:
        new = quantized_site(old, *_settings(opts))
        saved = old.nbytes() - new.nbytes()
        store.sites[index] = new
        store.capacities[index] = new.capacity
    for field in ("k", "v", "slot_pos", "scores"):
        setattr(gm, f"_slimfx_kv{index}_{field}", getattr(new, field))
    return saved


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, cache) -> None:
    from slimfx.runtime.kv_quant_op import QUANT_FIELDS

    q, k, v, pos, kc, vc, sp, sc, scale = node.args[:9]
    for attr, field in ((kc, "k"), (vc, "v"), (sp, "slot_pos"), (sc, "scores")):
        attr.meta["example_value"] = getattr(cache, field)
    extra = [bind_tensor(gm, f"_slimfx_kv{cache.index}_{f}", getattr(cache, f), node) for f in QUANT_FIELDS]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            torch.ops.slimfx.attention_kvq.default,
            (q, k, v, pos, kc, vc, sp, *extra, float(scale), cache.fmt, cache.group, cache.residual, cache.n_sink),
        )
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    import slimfx.runtime.kv_quant_op  # noqa: F401  registers torch.ops.slimfx.attention_kvq
    from slimfx.runtime.kv_store import get_store

    nodes = _attention_nodes(gm, "attention")
    if not nodes:
        if _attention_nodes(gm, "attention_evict"):
            return PassResult.skipped(NAME, "every site was already rewritten by kv_eviction; quantizing an evicting store (MiKV) is not this pass")
        return PassResult.skipped(NAME, "no slimfx::attention sites (run kv_runtime first, through slimfx.runtime.generate)")
    store = get_store(ctx.config.pass_config("kv_runtime").options["store"])
    if store is None:
        return PassResult.skipped(NAME, "the KV store of kv_runtime is gone")
    saved, rewritten, notes, formats = 0, 0, [], {}
    for node in nodes:
        index = node.meta.get("slimfx_site")  # set by kv_runtime on every op it creates
        if index is None or index not in store.sites:
            notes.append(f"{node.name}: site buffers not recognised")
            continue
        opts = cfg.for_layer(index)
        _check_options(index, opts)
        cache = store.sites[index]
        if cache.owner is not None:
            notes.append(f"site {index} reads site {cache.owner}'s cache: quantized there")
            continue
        why = get_format(opts["format"]).unsupported_reason(cache.head_dim)
        if why:
            notes.append(f"site {index}: {why}; left in full precision")
            continue
        site_saved = _quantize_site(gm, store, index, opts)
        if site_saved < 0:
            notes.append(f"site {index}: the quantized layout holds {-site_saved} bytes more than full precision "
                         f"(its full-precision buffer, n_sink + residual + group, is not small next to capacity {store.sites[index].capacity})")
        saved += site_saved
        _rewrite(gm, node, store.sites[index])
        formats[index] = opts["format"]
        rewritten += 1
    if not rewritten:
        return PassResult(NAME, applied=False, sites_matched=len(nodes), notes=notes)
    gm.graph.eliminate_dead_code()  # the unused `scores` get_attr nodes
    gm.recompile()
    return PassResult(NAME, applied=True, sites_matched=len(nodes), nodes_rewritten=rewritten, bytes_saved=saved, notes=notes,
                      details={"formats": formats, "kv_bytes": store.nbytes(),
                               "footprint": kv_footprint(store)})


def kv_footprint(store) -> dict:
    """What one sequence's KV costs in the store as it now is, in the footprint's terms
    (measure/footprint.py): `kv_bytes_per_token`, the bytes every cached token adds
    (codes and scales of quantized sites; K and V of the others), and `kv_fixed_bytes`, the
    full-precision sink + recent-window buffers a quantized site holds at any length. Slot
    bookkeeping (positions, scores) is left out, as in the unmodified figure."""
    per_token, fixed = 0.0, 0
    for cache in store.sites.values():
        if cache.owner is not None:
            continue  # shares another site's memory
        side = sum(getattr(cache, f).numel() * getattr(cache, f).element_size() for f in ("fp_k", "fp_v", "fp_pos") if hasattr(cache, f))
        bookkeeping = sum(t.numel() * t.element_size() for t in (cache.slot_pos, cache.scores))
        per_token += (cache.nbytes() - side - bookkeeping) / (store.batch * cache.capacity)
        fixed += side // store.batch
    return {"kv_bytes_per_token": round(per_token), "kv_fixed_bytes": fixed}
