"""KV-cache quantization: each attention site's store holds k/v in a low-bit format (lossy).

Runs after `kv_runtime` (which binds each site to a slot store). For every
`slimfx::attention` node the pass relays the site out (op.py: a quantized tier of the
same capacity plus a small full-precision tier for the attention sinks and the most
recent tokens) and gives the node the `kvq` layout, which quantizes each token on write.
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
from slimfx.passes._graph import attention_sites, relayout_site
from slimfx.passes.kv_quantize.op import kvq_layout, quantized_tiers, settings
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


def _quantize_site(gm: torch.fx.GraphModule, store, index: int, opts: dict) -> int:
    """Relay site `index` out in the quantized layout (empty) unless another graph of this
    model did already, and point the graph at it; returns bytes saved."""
    cache = store.sites[index]
    chosen = settings(opts["format"], opts["group"], opts["residual"], opts["n_sink"])
    layout = kvq_layout(*chosen)
    if cache.layout not in ("plain", layout):
        raise RuntimeError(f"kv_quantize: site {index} is already laid out as {cache.layout!r}, asked for {layout!r}")
    return relayout_site(gm, store, index, layout, lambda old: quantized_tiers(old, *chosen))


def _site_note(cache, index: int, opts: dict) -> str | None:
    """Why site `index` stays as it is, or None to quantize it."""
    if cache.owner is not None:
        return f"site {index} reads site {cache.owner}'s cache: quantized there"
    kind = cache.layout.split("/")[0]
    if kind not in ("plain", "kvq"):
        return (f"site {index}: laid out as {cache.layout!r} by another pass; quantizing what an eviction policy "
                "keeps is MiKV (kv_eviction.evicted), not this pass")
    why = get_format(opts["format"]).unsupported_reason(cache.head_dim)
    if why:
        return f"site {index}: {why}; left in full precision"
    return None


def run(gm: torch.fx.GraphModule, cfg, ctx: PassContext) -> PassResult:
    from slimfx.runtime.kv_store import get_store

    sites = attention_sites(gm)
    if not sites:
        return PassResult.skipped(NAME, "no slimfx::attention sites (run kv_runtime first, through slimfx.runtime.generate)")
    store = get_store(ctx.config.pass_config("kv_runtime").options["store"])
    if store is None:
        return PassResult.skipped(NAME, "the KV store of kv_runtime is gone")
    saved, rewritten, notes, formats = 0, 0, [], {}
    for index, _ in sites:
        opts = cfg.for_layer(index)
        _check_options(index, opts)
        note = _site_note(store.sites[index], index, opts)
        if note:
            notes.append(note)
            continue
        site_saved = _quantize_site(gm, store, index, opts)
        if site_saved < 0:
            notes.append(f"site {index}: the quantized layout holds {-site_saved} bytes more than full precision "
                         f"(its full-precision buffer, n_sink + residual + group, is not small next to capacity {store.sites[index].capacity})")
        saved += site_saved
        formats[index] = opts["format"]
        rewritten += 1
    if not rewritten:
        return PassResult(NAME, applied=False, sites_matched=len(sites), notes=notes)
    gm.recompile()
    return PassResult(NAME, applied=True, sites_matched=len(sites), nodes_rewritten=rewritten, bytes_saved=saved, notes=notes,
                      details={"formats": formats, "kv_bytes": store.nbytes(),
                               "footprint": kv_footprint(store)})


def kv_footprint(store) -> dict:
    """What one sequence's KV costs in the store as it now is, in the footprint's terms
    (measure/footprint.py): `kv_bytes_per_token`, the bytes every cached token adds
    (codes and scales of quantized sites; K and V of the others), and `kv_fixed_bytes`, the
    full-precision sink + recent-window buffers a quantized site holds at any length. Slot
    bookkeeping (positions, scores) is left out, as in the unmodified figure."""
    per_token, fixed = 0.0, 0
    for _, cache in store.owned_sites():
        side = sum(tier.nbytes() for name, tier in cache.tiers.items() if name != "main")
        main = cache.main
        bookkeeping = sum(main[f].numel() * main[f].element_size() for f in ("slot_pos", "scores") if f in main.buffers)
        per_token += (main.nbytes() - bookkeeping) / (store.batch * main.capacity)
        fixed += side // store.batch
    return {"kv_bytes_per_token": round(per_token), "kv_fixed_bytes": fixed}
