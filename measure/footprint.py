"""What a configuration keeps in memory: KV bytes, weight bytes and LM-head bytes.

For the unmodified model the figures come from its parameters and config. For a
compiled configuration they are the unmodified figures minus what the passes report
in `PassResult.details["footprint"]` (see `apply_pass_reports`); a pass that reports
nothing changes nothing here. The KV bytes an HF cache really held after a prefill are
measured separately by the passkey run (`kv_bytes_after_prefill` per case).

Keys a pass may put in PassResult.details["footprint"] (all optional):

    weight_bytes_saved: int   weight bytes (outside the LM head) no longer held
    head_bytes_saved: int     LM-head bytes no longer held
    kv_bytes_per_token: int   KV bytes per cached token per sequence, all layers, after the pass
    kv_capacity_tokens: int   tokens the KV store holds per sequence (a budget)
    kv_fixed_bytes: int       KV bytes per sequence held at any length (KV quantization's
                              full-precision sink and recent-window buffers)

The unmodified figures carry `kv_site_windows` {site: window} of the sliding-window layers,
whose store is a ring of the window, so KV bytes at a context count those sites at
min(context, window).

and, as kv_eviction reports it, PassResult.details["budgets"] = {site: tokens kept}.
"""

from __future__ import annotations

import torch

from slimfx.runtime.exactness import site_windows


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def head_weight(model) -> torch.Tensor | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return getattr(head, "weight", None)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """2 (K and V) x layers x kv heads x head_dim x element size: one token of one sequence."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def model_footprint(model, dtype: torch.dtype | None = None) -> dict:
    """Bytes of the unmodified model: weight_bytes (all parameters, shared storage counted
    once, head included; buffers such as RoPE tables are not weights), head_bytes,
    head_tied, kv_bytes_per_token."""
    params = list(model.parameters())
    head = head_weight(model)
    embed = getattr(model.get_input_embeddings(), "weight", None) if hasattr(model, "get_input_embeddings") else None
    dtype = dtype or next(model.parameters()).dtype
    return {
        "weight_bytes": _unique_bytes(params),
        "head_bytes": 0 if head is None else head.numel() * head.element_size(),
        "head_tied": bool(head is not None and embed is not None and head.data_ptr() == embed.data_ptr()),
        "kv_bytes_per_token": kv_bytes_per_token(model.config, dtype),
        "kv_capacity_tokens": None,  # unbounded: the cache grows with the context
        "attention_sites": model.config.num_hidden_layers,
        # Sliding-window layers hold at most their window (the runtime gives them a ring of it).
        "kv_site_windows": site_windows(model),
    }


def apply_pass_reports(base: dict, reports, resident: tuple[str, ...] = ()) -> dict:
    """The footprint a compiled configuration keeps: `base` with every pass's reported
    footprint applied. `reports`: CompileReports of that configuration's graphs; a
    model compiled into several graphs reports the same pass in each, so savings are
    taken per pass as the largest reported, not summed over graphs. `resident`: passes
    whose graphs run beside the whole model's (a layer-skip schedule's levels, a
    speculative draft), so what they leave out is still held: their footprints count not."""
    saved_weights: dict[str, int] = {}
    saved_head: dict[str, int] = {}
    out = dict(base, source="unmodified figures; no pass reported a footprint change")
    changed = []
    for report in reports:
        for result in report.passes:
            details = result.details or {}
            if result.applied and details.get("budgets"):
                out["kv_site_budgets"] = {int(k): int(v) for k, v in details["budgets"].items()}
                if details.get("full_fraction"):
                    out["kv_site_full_fraction"] = {int(k): float(v) for k, v in details["full_fraction"].items()}
                if details.get("low_tier_bytes_per_token"):
                    out["kv_site_low_tier_bytes_per_token"] = {int(k): float(v) for k, v in details["low_tier_bytes_per_token"].items()}
                changed.append(result.name)
            fp = details.get("footprint") or {}
            if not fp or result.name in resident:
                continue
            changed.append(result.name)
            saved_weights[result.name] = max(saved_weights.get(result.name, 0), int(fp.get("weight_bytes_saved", 0)))
            saved_head[result.name] = max(saved_head.get(result.name, 0), int(fp.get("head_bytes_saved", 0)))
            if "kv_bytes_per_token" in fp:
                out["kv_bytes_per_token"] = int(fp["kv_bytes_per_token"])
            if "kv_fixed_bytes" in fp:
                out["kv_fixed_bytes"] = int(fp["kv_fixed_bytes"])
            if fp.get("kv_capacity_tokens") is not None:
                cap = int(fp["kv_capacity_tokens"])
                out["kv_capacity_tokens"] = cap if out["kv_capacity_tokens"] is None else min(cap, out["kv_capacity_tokens"])
    out["head_bytes"] = base["head_bytes"] - sum(saved_head.values())
    # A tied head is also the input embedding: a cheaper head frees none of its bytes.
    freed_head = 0 if base["head_tied"] else sum(saved_head.values())
    out["weight_bytes"] = base["weight_bytes"] - sum(saved_weights.values()) - freed_head
    if changed:
        out["source"] = "unmodified figures minus the footprint reported by passes: " + ", ".join(sorted(set(changed)))
    return out


def kv_bytes_at(fp: dict, context: int, batch: int = 1) -> int:
    """KV bytes held for `batch` sequences of `context` tokens under footprint `fp`
    (per-site budgets, when a pass reported them, cap each site separately; a site's
    `kv_site_full_fraction` of kv heads, DuoAttention's retrieval heads, keeps every token;
    MiKV's `kv_site_low_tier_bytes_per_token` counts the tokens past a site's budget at
    its quantized tier's bytes; a sliding-window site, `kv_site_windows`, holds at most its
    window)."""
    kept = context if fp.get("kv_capacity_tokens") is None else min(context, fp["kv_capacity_tokens"])
    # Site keys are ints in memory and strings once the footprint went through JSON.
    budgets = {int(k): v for k, v in (fp.get("kv_site_budgets") or {}).items()}
    windows = {int(k): v for k, v in (fp.get("kv_site_windows") or {}).items()}
    if budgets or windows:
        sites = fp.get("attention_sites") or len(budgets)
        per_site = fp["kv_bytes_per_token"] / sites
        full = {int(k): v for k, v in (fp.get("kv_site_full_fraction") or {}).items()}
        low = {int(k): v for k, v in (fp.get("kv_site_low_tier_bytes_per_token") or {}).items()}
        held = {i: min(kept, windows.get(i, kept)) for i in range(sites)}  # a sliding site: its window at most
        tokens = sum(full.get(i, 0.0) * held[i] + (1 - full.get(i, 0.0)) * min(held[i], budgets.get(i, kept)) for i in range(sites))
        demoted = sum(max(0, kept - budgets.get(i, kept)) * low[i] for i in low)
        return round((tokens * per_site + demoted + fp.get("kv_fixed_bytes", 0)) * batch)
    return (kept * fp["kv_bytes_per_token"] + fp.get("kv_fixed_bytes", 0)) * batch
