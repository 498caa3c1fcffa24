"""`torch.ops.slimfx.attention_mikv`: eviction that demotes instead of dropping (MiKV, lossy).

    out = torch.ops.slimfx.attention_mikv(q, k, v, positions,
                                          k_cache, v_cache, slot_pos, scores,
                                          lo_k, lo_v, lo_pos, lo_k_scale, lo_k_zero, lo_v_scale, lo_v_zero,
                                          scale, policy, n_sink, window, param, fmt)

Two tiers per attention site; every token the site has seen is in exactly one of them:

    high tier  k_cache, v_cache [B, Hkv, budget, D] (model dtype), slot_pos, scores:
               the store of `slimfx::attention_evict` (eviction_op.py), managed by
               the same policy (sinks, recent window, then the policy's ranking)
    low tier   lo_k, lo_v [B, Hkv, C, Dp] quantized (fmt int8 / int4 / int2), lo_pos [B, Hkv, C]
               int32 (-1 empty), slot = position % C with C the site's original capacity;
               lo_k_scale, lo_v_scale [B, Hkv, C, G] and lo_k_zero, lo_v_zero (same shape;
               empty for int8) per token and per group of D // G channels

Formats (runtime/kv_quant.py's per-token helpers): int8 symmetric per token (G = 1);
int4/int2 asymmetric with float16 scale and minimum per token and per group of 32
channels (G = D // 32 when D is a multiple of 32, else 1): a whole-row range at 2 bits
is dominated by the row's largest channels, groups keep small channels resolvable.

- decode (T == 1): the policy picks the high-tier slot the new token takes (an empty slot
  while there is one, else its lowest-priority unprotected slot, as attention_evict);
  the token that slot held is quantized into the low tier *before* it is overwritten;
  the query attends over both tiers (low tier dequantized), and the attention mass of
  high-tier slots goes into `scores` (decay as the policy says), normalised over both
  tiers, i.e. the true attention probability.
- prefill (T > 1): the chunk attends over both tiers + itself in full precision; then
  the policy's keep rule picks `budget` tokens among high tier + chunk (scores from the
  chunk's attention as in attention_evict; SnapKV's pooled observation window) and every
  other real token of those goes to the low tier, quantized.

Low-tier tokens never return to the high tier (MiKV keeps them where they fell). The low
tier holds evicted tokens of the last C positions: C at least the sequence length (the
runtime's default) keeps all of them; beyond it, older ones are overwritten or dropped.
With a budget of at least the total length nothing is demoted and the output equals the
full cache. Shapes are static; decode never syncs with the host (capturable in a CUDA
graph), prefill syncs once to leave an empty low tier out. On CUDA the attention runs
the Triton kernels over the two tiers concatenated (low tier dequantized first: not a
fused kernel; this path has not been run on a GPU yet), elsewhere the references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimfx.codegen.kernels.decode_attention import decode_attention_ref
from slimfx.codegen.kernels.prefill_attention import prefill_attention_ref
from slimfx.passes.kv_eviction.eviction_op import _policy, _scatter_heads
from slimfx.passes.kv_eviction.policies import EvictionPolicy
from slimfx.runtime.kv_quant import KVFormat, dequantize_tokens, get_format, quantize_tokens
from slimfx.runtime.kv_store import SiteCache

FORMATS = ("int8", "int4", "int2")
CHANNEL_GROUP = 32  # channels per quantization group of the 2/4-bit formats
LOW_FIELDS = ("k", "v", "slot_pos", "k_scale", "k_zero", "v_scale", "v_zero")


def channel_groups(fmt: KVFormat, head_dim: int) -> int:
    """G: quantization groups per token row (module doc)."""
    if fmt.symmetric or head_dim % CHANNEL_GROUP:
        return 1
    return head_dim // CHANNEL_GROUP


# ----------------------------------------------------------------------------- the low tier


@dataclass
class LowTier(SiteCache):
    """The quantized tier of a MiKV site (k/v hold the codes; `scores` is empty)."""

    fmt: str = "int4"
    dim: int = 0  # head_dim (k's last dim is the packed one)
    k_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None

    @property
    def head_dim(self) -> int:
        return self.dim

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.k_scale, self.k_zero, self.v_scale, self.v_zero))
        return super().nbytes() + extra

    def buffers(self) -> tuple:
        return tuple(getattr(self, f) for f in LOW_FIELDS)


@dataclass
class MiKVCache(SiteCache):
    """The high tier of a MiKV site, carrying its low tier, so that KVStore.nbytes counts
    both and KVStore.reset empties both. (Not `companion`: that field means "the other
    head group" to the store, whose total_kv_heads would then count the heads twice.)"""

    low: LowTier | None = None

    def nbytes(self) -> int:
        return super().nbytes() + self.low.nbytes()

    def reset(self) -> None:
        super().reset()
        self.low.reset()


def low_tier(like: SiteCache, fmt_name: str) -> LowTier:
    """An empty low tier with `like`'s batch, kv heads, capacity and head_dim."""
    fmt = get_format(fmt_name)
    B, H, C, D = like.k.shape
    dev = like.k.device
    G = channel_groups(fmt, D)
    scale = lambda: torch.zeros(B, H, C, G, device=dev, dtype=fmt.scale_dtype)
    zero = lambda: torch.zeros(B, H, C, G, device=dev, dtype=fmt.scale_dtype) if not fmt.symmetric else torch.empty(0, device=dev, dtype=fmt.scale_dtype)
    return LowTier(
        index=like.index,
        k=torch.zeros(B, H, C, fmt.packed_dim(D), device=dev, dtype=fmt.storage_dtype()),
        v=torch.zeros(B, H, C, fmt.packed_dim(D), device=dev, dtype=fmt.storage_dtype()),
        slot_pos=torch.full((B, H, C), -1, device=dev, dtype=torch.int32),
        scores=torch.zeros(B, H, 0, device=dev, dtype=torch.float32),  # no policy ranks the low tier
        fmt=fmt.name, dim=D, k_scale=scale(), k_zero=zero(), v_scale=scale(), v_zero=zero(),
    )


def quantize_rows(x: torch.Tensor, fmt: KVFormat, groups: int):
    """x [.., D] -> (codes [.., Dp], scale [.., G], zero [.., G] or None), per row and channel group."""
    q, s, z = quantize_tokens(x.unflatten(-1, (groups, -1)), fmt)
    return q.flatten(-2), s, z


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """Inverse of quantize_rows: float32 [.., D]."""
    rows = q.unflatten(-1, (scale.shape[-1], -1))
    return dequantize_tokens(rows, scale, zero if zero.numel() else None, fmt).flatten(-2)


# ----------------------------------------------------------------------------- tier moves


def _scatter_or_discard(buf: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """buf[b, h, slots[b, h, n]] = rows[b, h, n] in place, where slots == C means "do not
    write": those rows land in one scratch slot past the end, so no branch and no sync."""
    C = buf.shape[2]
    padded = torch.cat([buf, buf[:, :, :1]], dim=2)
    idx = slots.view(*slots.shape, *([1] * (buf.dim() - 3))).expand(*slots.shape, *buf.shape[3:])
    padded.scatter_(2, idx, rows.to(buf.dtype))
    buf.copy_(padded[:, :, :C])


def demote(keys, vals, kpos, move, lo: tuple, seen, fmt: KVFormat) -> None:
    """Quantize rows keys/vals [B, H, N, D] with move [B, H, N] into the low tier at slot
    position % C. Only real tokens among the last C positions (kpos >= seen - C) move:
    those are distinct modulo C, so no two rows race for a slot."""
    lo_k, lo_v, lo_pos, k_scale, k_zero, v_scale, v_zero = lo
    C = lo_pos.shape[2]
    kpos = kpos.to(torch.int64)
    move = move & (kpos >= 0) & (kpos >= (seen.to(torch.int64) - C).view(-1, 1, 1))
    slots = torch.where(move, kpos.clamp_min(0).remainder(C), C)
    G = k_scale.shape[-1]
    for x, codes_buf, scale_buf, zero_buf in ((keys, lo_k, k_scale, k_zero), (vals, lo_v, v_scale, v_zero)):
        codes, s, z = quantize_rows(x, fmt, G)
        _scatter_or_discard(codes_buf, slots, codes)
        _scatter_or_discard(scale_buf, slots, s)
        if z is not None:
            _scatter_or_discard(zero_buf, slots, z)
    _scatter_or_discard(lo_pos, slots, kpos)


def _low_dense(lo: tuple, fmt: KVFormat, dtype: torch.dtype):
    """The low tier as keys, values [B, H, C, D] in `dtype` and positions [B, H, C]."""
    lo_k, lo_v, lo_pos, k_scale, k_zero, v_scale, v_zero = lo
    return dequantize_rows(lo_k, k_scale, k_zero, fmt).to(dtype), dequantize_rows(lo_v, v_scale, v_zero, fmt).to(dtype), lo_pos


def _store_kept(keep, keys, vals, scores, kpos, hi: tuple) -> None:
    """Gather the kept rows of [B, H, N] into the high tier's C slots (kept first, in order;
    the rest empty), in place. (EvictionPolicy.compact, with the keep set computed once.)"""
    k_cache, v_cache, slot_pos, hi_scores = hi
    C = k_cache.shape[2]
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :C]
    kept = torch.gather(keep, -1, order)
    rows = order[..., None].expand(*order.shape, keys.shape[-1])
    k_cache.copy_(torch.gather(keys, 2, rows))
    v_cache.copy_(torch.gather(vals, 2, rows))
    hi_scores.copy_(torch.where(kept, torch.gather(scores, -1, order), 0.0))
    slot_pos.copy_(torch.where(kept, torch.gather(kpos, -1, order), -1))


# ----------------------------------------------------------------------------- decode / prefill


def _decode(q, k, v, positions, hi: tuple, lo: tuple, scale: float, policy: EvictionPolicy, fmt: KVFormat):
    k_cache, v_cache, slot_pos, scores = hi
    B, H = k.shape[:2]
    pos = positions[:, 0]
    victims = policy.victim_slots(scores, slot_pos, pos, 1)  # [B, H, 1]
    rows = victims[..., None].expand(B, H, 1, k_cache.shape[-1])
    # The victim moves down before the new token takes its slot (an empty victim moves nothing).
    demote(k_cache.gather(2, rows), v_cache.gather(2, rows), slot_pos.gather(2, victims), torch.ones_like(victims, dtype=torch.bool), lo, pos + 1, fmt)
    _scatter_heads(k_cache, victims, k)
    _scatter_heads(v_cache, victims, v)
    _scatter_heads(slot_pos, victims, pos.view(B, 1, 1).expand(B, H, 1))
    _scatter_heads(scores, victims, torch.zeros(B, H, 1, dtype=scores.dtype, device=scores.device))
    lk, lv, lpos = _low_dense(lo, fmt, k_cache.dtype)
    keys, vals = torch.cat([k_cache, lk], dim=2), torch.cat([v_cache, lv], dim=2)
    kpos = torch.cat([slot_pos, lpos], dim=2)
    # Masses over both tiers (the true probabilities); only the high tier's are kept.
    tracked = torch.cat([scores, scores.new_zeros(B, H, lpos.shape[2])], dim=2) if policy.needs_scores else None
    decay = policy.decay if policy.decay is not None else 1.0
    q1 = q[:, :, 0].contiguous()
    if q.is_cuda:
        from slimfx.codegen.kernels.decode_attention import decode_attention

        out = decode_attention(q1, keys, vals, kpos, pos, scale=scale, scores=tracked, decay=decay)
    else:
        out = decode_attention_ref(q1, keys, vals, kpos, pos, scale=scale, scores=tracked, decay=decay)
    if tracked is not None:
        scores.copy_(tracked[:, :, : scores.shape[2]])
    return out.unsqueeze(2)


def _prefill_scores(q, positions, keys, kpos, hi_scores, n: int, scale: float, policy: EvictionPolicy):
    """The policy's scores of the first n keys (high tier + chunk), as attention_evict's prefill
    computes them, with the softmax normalised over every key (low tier included)."""
    return policy.prefill_scores(q, positions, keys, kpos, hi_scores, scale)[..., :n]


def _prefill(q, k, v, positions, hi: tuple, lo: tuple, scale: float, policy: EvictionPolicy, fmt: KVFormat):
    k_cache, v_cache, slot_pos, scores = hi
    B, H, T, _ = k.shape
    new_pos = torch.where(positions < 0, -1, positions)[:, None, :].expand(B, H, T)
    # [high tier, chunk] are the policy's candidates; the low tier goes last.
    keys_m = torch.cat([k_cache, k.to(k_cache.dtype)], dim=2)
    vals_m = torch.cat([v_cache, v.to(v_cache.dtype)], dim=2)
    kpos_m = torch.cat([slot_pos.to(torch.int64), new_pos], dim=2)
    keys, vals, kpos = keys_m, vals_m, kpos_m
    # Prefill may sync with the host (decode never does): an empty low tier, as at every
    # first prefill, stays out, so the prompt costs what attention_evict's prefill costs
    # instead of attending over C more (empty) slots.
    if bool((lo[2] >= 0).any()):
        lk, lv, lpos = _low_dense(lo, fmt, k_cache.dtype)
        keys, vals = torch.cat([keys_m, lk], dim=2), torch.cat([vals_m, lv], dim=2)
        kpos = torch.cat([kpos_m, lpos.to(torch.int64)], dim=2)
    qc = q.contiguous()
    if q.is_cuda:
        from slimfx.codegen.kernels.prefill_attention import prefill_attention

        out = prefill_attention(qc, positions, keys, vals, kpos, scale=scale)
    else:
        out = prefill_attention_ref(qc, positions, keys, vals, kpos, scale=scale)
    n = keys_m.shape[2]
    merged = _prefill_scores(q, positions, keys, kpos, scores, n, scale, policy).to(scores.dtype)
    seen = positions.amax(dim=1) + 1
    keep = policy.keep_mask(merged, kpos_m, seen, budget=k_cache.shape[2])
    demote(keys_m, vals_m, kpos_m, ~keep, lo, seen, fmt)
    _store_kept(keep, keys_m, vals_m, merged, kpos_m, hi)
    return out.contiguous()


def _run(q, k, v, positions, hi, lo, scale, policy, n_sink, window, param, fmt):
    pol = _policy(policy, hi[0].shape[2], n_sink, window, param)
    run = _decode if q.shape[2] == 1 else _prefill
    return run(q, k, v, positions, hi, lo, scale, pol, get_format(fmt)).contiguous()


_MUTATED = ("k_cache", "v_cache", "slot_pos", "scores", "lo_k", "lo_v", "lo_pos", "lo_k_scale", "lo_k_zero", "lo_v_scale", "lo_v_zero")


@torch.library.custom_op("slimfx::attention_mikv", mutates_args=_MUTATED)
def attention_mikv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor, scores: torch.Tensor,
    lo_k: torch.Tensor, lo_v: torch.Tensor, lo_pos: torch.Tensor,
    lo_k_scale: torch.Tensor, lo_k_zero: torch.Tensor, lo_v_scale: torch.Tensor, lo_v_zero: torch.Tensor,
    scale: float, policy: str, n_sink: int, window: int, param: float, fmt: str,
) -> torch.Tensor:
    hi = (k_cache, v_cache, slot_pos, scores)
    lo = (lo_k, lo_v, lo_pos, lo_k_scale, lo_k_zero, lo_v_scale, lo_v_zero)
    return _run(q, k, v, positions, hi, lo, scale, policy, n_sink, window, param, fmt)


@attention_mikv.register_fake
def _attention_mikv_fake(q, k, v, positions, k_cache, v_cache, slot_pos, scores, lo_k, lo_v, lo_pos,
                         lo_k_scale, lo_k_zero, lo_v_scale, lo_v_zero, scale, policy, n_sink, window, param, fmt):
    return q.new_empty(q.shape)  # contiguous, like the real op


def attention_mikv_ref(q, k, v, positions, high: SiteCache, low: LowTier, scale=None, policy="h2o", n_sink=4, window=64, param=0.0):
    """The op's definition on a (high, low) pair of caches (mutates them like the op), without torch.ops."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    hi = (high.k, high.v, high.slot_pos, high.scores)
    return _run(q, k, v, positions, hi, low.buffers(), scale, policy, n_sink, window, param, low.fmt)

