"""The `mikv` variant of `slimfx::attention` (runtime/attention_op.py): eviction that
demotes instead of dropping (MiKV, lossy).

    layout  mikv/<policy>/<n_sink>/<window>/<param>/<fmt>
    tiers   main  the evict variant's tier (eviction_op.py): k, v [B, Hkv, budget, D] (model
                  dtype), slot_pos, scores, managed by the same policy (sinks, recent
                  window, then the policy's ranking)
            low   k, v [B, Hkv, C, Dp] quantized (fmt int8 / int4 / int2), slot_pos [B, Hkv, C]
                  int32 (-1 empty), slot = position % C with C the site's original capacity;
                  k_scale, v_scale [B, Hkv, C, G] and k_zero, v_zero (same shape; empty for
                  int8) per token and per group of D // G channels

Every token the site has seen is in exactly one of the two tiers. Formats
(runtime/kv_quant.py's per-token helpers): int8 symmetric per token (G = 1); int4/int2
asymmetric with float16 scale and minimum per token and per group of 32 channels
(G = D // 32 when D is a multiple of 32, else 1): a whole-row range at 2 bits is
dominated by the row's largest channels, groups keep small channels resolvable.

- decode (T == 1): the policy picks the main-tier slot the new token takes (as the evict
  variant); the token that slot held is quantized into the low tier *before* it is
  overwritten; the query attends over both tiers (attention_op.decode_read: int8 codes are
  dequantized inside the kernel, int4/int2 first), and the attention mass of main-tier
  slots goes into `scores`, normalised over both tiers (the true attention probability).
- prefill (T > 1): the chunk attends over both tiers + itself in full precision; then
  the policy's keep rule picks `budget` tokens among main tier + chunk (scores from the
  chunk's attention as in the evict variant) and every other real token of those goes
  to the low tier, quantized.

Low-tier tokens never return to the main tier (MiKV keeps them where they fell). The low
tier holds evicted tokens of the last C positions: C at least the sequence length (the
runtime's default) keeps all of them; beyond it, older ones are overwritten or dropped.
With a budget of at least the total length nothing is demoted and the output equals the
full cache. Shapes are static; decode never syncs with the host (capturable in a CUDA
graph), prefill syncs once to leave an empty low tier out.
"""

from __future__ import annotations

import torch

import slimfx.passes.kv_eviction.eviction_op as eviction_op
from slimfx.passes.kv_eviction.policies import EvictionPolicy
from slimfx.runtime.attention_op import TierRead, Tiers, decode_read, layout_string, prefill_read, read_tiers, register_variant
from slimfx.runtime.kv_quant import KVFormat, dequantize_tokens, get_format, quantize_tokens
from slimfx.runtime.kv_store import SiteCache, Tier

FORMATS = ("int8", "int4", "int2")
CHANNEL_GROUP = 32  # channels per quantization group of the 2/4-bit formats
LOW_FIELDS = ("k", "v", "slot_pos", "k_scale", "k_zero", "v_scale", "v_zero")
FIELDS = eviction_op.FIELDS + tuple(f"low.{f}" for f in LOW_FIELDS)


def mikv_layout(policy: str, n_sink: int, window: int, param: float, fmt: str) -> str:
    return layout_string("mikv", policy, n_sink, window, float(param), fmt)


def channel_groups(fmt: KVFormat, head_dim: int) -> int:
    """G: quantization groups per token row (module doc)."""
    if fmt.symmetric or head_dim % CHANNEL_GROUP:
        return 1
    return head_dim // CHANNEL_GROUP


# ----------------------------------------------------------------------------- the low tier


def low_tier(B: int, H: int, C: int, head_dim: int, fmt_name: str, device) -> Tier:
    """An empty low tier of C slots for B sequences and H kv heads."""
    fmt = get_format(fmt_name)
    dev = device
    G = channel_groups(fmt, head_dim)

    def scales():
        return torch.zeros(B, H, C, G, device=dev, dtype=fmt.scale_dtype)

    def codes():
        return torch.zeros(B, H, C, fmt.packed_dim(head_dim), device=dev, dtype=fmt.storage_dtype())

    zeros = scales if not fmt.symmetric else (lambda: torch.empty(0, device=dev, dtype=fmt.scale_dtype))
    buffers = {"k": codes(), "v": codes(), "slot_pos": torch.full((B, H, C), -1, device=dev, dtype=torch.int32),
               "k_scale": scales(), "k_zero": zeros(), "v_scale": scales(), "v_zero": zeros()}
    return Tier(buffers, exact_rollback=False)


def mikv_site(batch: int, n_heads: int, budget: int, capacity: int, head_dim: int, *, policy: str = "h2o", n_sink: int = 4,
              window: int = 64, param: float = 0.0, fmt: str = "int4", dtype=torch.float32, device="cpu", index: int = 0) -> SiteCache:
    """A standalone site of this layout (empty, main tier of `budget` slots, low tier of
    `capacity`), outside any store."""
    high = eviction_op.evict_site(batch, n_heads, budget, head_dim, dtype=dtype, device=device)
    low = low_tier(batch, n_heads, capacity, head_dim, fmt, device)
    return SiteCache(index, head_dim, {"main": high.main, "low": low}, layout=mikv_layout(policy, n_sink, window, param, fmt))


def quantize_rows(x: torch.Tensor, fmt: KVFormat, groups: int):
    """x [.., D] -> (codes [.., Dp], scale [.., G], zero [.., G] or None), per row and channel group."""
    q, s, z = quantize_tokens(x.unflatten(-1, (groups, -1)), fmt)
    return q.flatten(-2), s, z


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Inverse of quantize_rows: float32 [.., D]."""
    rows = q.unflatten(-1, (scale.shape[-1], -1))
    return dequantize_tokens(rows, scale, zero if zero.numel() else None, fmt).flatten(-2)


def low_read(low: dict, fmt: KVFormat, dtype: torch.dtype) -> TierRead:
    """The low tier as a read sees it: int8 codes with their per-token scales (dequantized
    inside the decode kernel), int4/int2 dequantized to `dtype` first (per-group scales)."""
    if fmt.name == "int8":
        return TierRead(low["k"], low["v"], low["slot_pos"], low["k_scale"][..., 0], low["v_scale"][..., 0])
    keys = dequantize_rows(low["k"], low["k_scale"], low["k_zero"], fmt).to(dtype)
    vals = dequantize_rows(low["v"], low["v_scale"], low["v_zero"], fmt).to(dtype)
    return TierRead(keys, vals, low["slot_pos"])


# ----------------------------------------------------------------------------- tier moves


def _scatter_or_discard(buf: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """buf[b, h, slots[b, h, n]] = rows[b, h, n] in place, where slots == C means "do not
    write": those rows land in one scratch slot past the end, so no branch and no sync."""
    C = buf.shape[2]
    padded = torch.cat([buf, buf[:, :, :1]], dim=2)
    idx = slots.view(*slots.shape, *([1] * (buf.dim() - 3))).expand(*slots.shape, *buf.shape[3:])
    padded.scatter_(2, idx, rows.to(buf.dtype))
    buf.copy_(padded[:, :, :C])


def demote(keys, vals, kpos, move, low: dict, seen, fmt: KVFormat) -> None:
    """Quantize rows keys/vals [B, H, N, D] with move [B, H, N] into the low tier at slot
    position % C. Only real tokens among the last C positions (kpos >= seen - C) move:
    those are distinct modulo C, so no two rows race for a slot."""
    C = low["slot_pos"].shape[2]
    kpos = kpos.to(torch.int64)
    move = move & (kpos >= 0) & (kpos >= (seen.to(torch.int64) - C).view(-1, 1, 1))
    slots = torch.where(move, kpos.clamp_min(0).remainder(C), C)
    G = low["k_scale"].shape[-1]
    for x, name in ((keys, "k"), (vals, "v")):
        codes, s, z = quantize_rows(x, fmt, G)
        _scatter_or_discard(low[name], slots, codes)
        _scatter_or_discard(low[f"{name}_scale"], slots, s)
        if z is not None:
            _scatter_or_discard(low[f"{name}_zero"], slots, z)
    _scatter_or_discard(low["slot_pos"], slots, kpos)


def _store_kept(keep, keys, vals, scores, kpos, main: dict) -> None:
    """Gather the kept rows of [B, H, N] into the main tier's C slots (kept first, in order;
    the rest empty), in place. (EvictionPolicy.compact, with the keep set computed once.)"""
    C = main["k"].shape[2]
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :C]
    kept = torch.gather(keep, -1, order)
    rows = order[..., None].expand(*order.shape, keys.shape[-1])
    main["k"].copy_(torch.gather(keys, 2, rows))
    main["v"].copy_(torch.gather(vals, 2, rows))
    main["scores"].copy_(torch.where(kept, torch.gather(scores, -1, order), 0.0))
    main["slot_pos"].copy_(torch.where(kept, torch.gather(kpos, -1, order), -1))


# ----------------------------------------------------------------------------- decode / prefill


def _decode(q, k, v, positions, main: dict, low: dict, scale: float, policy: EvictionPolicy, fmt: KVFormat, triton: bool):
    B, H = k.shape[:2]
    pos = positions[:, 0]
    victims = policy.victim_slots(main["scores"], main["slot_pos"], pos, 1)  # [B, H, 1]
    rows = victims[..., None].expand(B, H, 1, main["k"].shape[-1])
    # The victim moves down before the new token takes its slot (an empty victim moves nothing).
    demote(main["k"].gather(2, rows), main["v"].gather(2, rows), main["slot_pos"].gather(2, victims),
           torch.ones_like(victims, dtype=torch.bool), low, pos + 1, fmt)
    eviction_op.write_to_slots(main, victims, k, v, pos)
    tracked = main["scores"] if policy.needs_scores else None
    decay = policy.decay if policy.decay is not None else 1.0
    dtype = q.dtype if triton else torch.float32
    tiers = [TierRead(main["k"], main["v"], main["slot_pos"]), low_read(low, fmt, dtype)]
    return decode_read(q, pos, tiers, scale, triton, scores=tracked, decay=decay)


def _prefill(q, k, v, positions, main: dict, low: dict, scale: float, policy: EvictionPolicy, fmt: KVFormat, triton: bool):
    B, H, T, _ = k.shape
    dtype = q.dtype if triton else torch.float32
    tiers = [TierRead(main["k"], main["v"], main["slot_pos"])]
    # Prefill may sync with the host (decode never does): an empty low tier, as at every
    # first prefill, stays out, so the prompt costs what the evict variant's prefill costs
    # instead of attending over C more (empty) slots.
    low_filled = bool((low["slot_pos"] >= 0).any())
    if low_filled:
        tiers.append(low_read(low, fmt, dtype))
    out = prefill_read(q, positions, tiers, scale, triton, chunk=(k, v, positions))
    # [main tier, chunk] are the policy's candidates; the low tier goes last (it only
    # normalises the chunk's attention mass).
    new_pos = torch.where(positions < 0, -1, positions)[:, None, :].expand(B, H, T)
    keys_m = torch.cat([main["k"], k.to(main["k"].dtype)], dim=2)
    vals_m = torch.cat([main["v"], v.to(main["v"].dtype)], dim=2)
    kpos_m = torch.cat([main["slot_pos"].to(torch.int64), new_pos], dim=2)
    keys, kpos = keys_m, kpos_m
    if low_filled:
        lk, _ = tiers[1].dense(main["k"].dtype)
        keys = torch.cat([keys_m, lk], dim=2)
        kpos = torch.cat([kpos_m, low["slot_pos"].to(torch.int64)], dim=2)
    n = keys_m.shape[2]
    merged = policy.prefill_scores(q, positions, keys, kpos, main["scores"], scale)[..., :n].to(main["scores"].dtype)
    seen = positions.amax(dim=1) + 1
    keep = policy.keep_mask(merged, kpos_m, seen, budget=main["k"].shape[2])
    demote(keys_m, vals_m, kpos_m, ~keep, low, seen, fmt)
    _store_kept(keep, keys_m, vals_m, merged, kpos_m, main)
    return out


class MiKV:
    fields = FIELDS

    def __init__(self, policy: str, n_sink: str, window: str, param: str, fmt: str):
        self.policy, self.n_sink, self.window, self.param = policy, int(n_sink), int(window), float(param)
        self.fmt = get_format(fmt)

    def run(self, q, k, v, positions, tiers: Tiers, scale: float, triton: bool):
        main, low = tiers["main"], tiers["low"]
        policy = eviction_op.policy_for(self.policy, main["k"].shape[2], self.n_sink, self.window, self.param)
        step = _decode if q.shape[2] == 1 else _prefill
        return step(q, k, v, positions, main, low, scale, policy, self.fmt, triton)

    def read(self, q, positions, tiers: Tiers, scale: float, triton: bool):
        """Both tiers as they are (low tier dequantized); the owner's policy alone ranks them."""
        main, low = tiers["main"], tiers["low"]
        dtype = q.dtype if triton else torch.float32
        reads = [TierRead(main["k"], main["v"], main["slot_pos"]), low_read(low, self.fmt, dtype)]
        return read_tiers(q, positions, reads, scale, triton)


register_variant("mikv", MiKV)
