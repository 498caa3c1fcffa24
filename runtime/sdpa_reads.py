"""Attention reads through torch's fused scaled_dot_product_attention, for devices without
slimfx's Triton kernels (the CPU).

Why: the references (codegen/kernels/*_ref) are the definitions, written op by op in
float32 (einsum, mask, softmax, nan_to_num, einsum). On the 2-core CPU machine one
decode read of SmolLM2-135M's site (9 query heads, 3 KV heads, 256 slots, D = 64) took
252 us through the reference and 20 us through SDPA with one thread, 1684 us against
56 us with two threads on a loaded machine (every small op pays a thread barrier); at
30 sites a step that was most of the gap to HF's eager generate. The semantics are the
references': a query at position p sees every held slot with 0 <= pos <= p (within the
sliding window, for a prefill chunk that has one), computed in float32; a query that sees
nothing gets zeros. What only the references compute (the policies' attention mass, a
second tier, per-slot scales, a window between tiers) stays with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, q_pos: torch.Tensor,
                scale: float) -> torch.Tensor:
    """q [B, Hq, D], k, v [B, Hkv, C, D], pos [B, Hkv, C] (-1 empty), q_pos [B] -> [B, Hq, D]
    (q's dtype). The group of query heads sharing a KV head is SDPA's query-length axis, so
    each KV head's own visible slots mask its group."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    visible = (pos >= 0) & (pos <= q_pos.view(B, 1, 1))
    out = F.scaled_dot_product_attention(q.float().view(B, Hkv, Hq // Hkv, D), k.float(), v.float(),
                                         attn_mask=visible[:, :, None, :], scale=scale)
    return out.nan_to_num(0.0).reshape(B, Hq, D).to(q.dtype)


def prefill_sdpa(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, *,
                 extra=None, scale: float, window: int | None = None) -> torch.Tensor:
    """prefill_attention_ref's arguments and result: q [B, Hq, T, D], q_pos [B, T], keys
    k, v [B, Hkv, N, D] at k_pos [B, Hkv, N], plus `extra` = (k2, v2, k2_pos [B, N2]) after
    them; window: a sliding window of that many positions, or None -> [B, Hq, T, D]."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if extra is not None:
        k2, v2, k2_pos = extra
        k = torch.cat([k.to(k2.dtype), k2], dim=2)
        v = torch.cat([v.to(v2.dtype), v2], dim=2)
        k_pos = torch.cat([k_pos.to(torch.int64), k2_pos.to(torch.int64)[:, None, :].expand(B, Hkv, k2.shape[2])], dim=2)
    N = k.shape[2]
    group = Hq // Hkv
    qp = q_pos.view(B, 1, 1, T, 1)
    kp = k_pos.view(B, Hkv, 1, 1, N)
    visible = (kp >= 0) & (kp <= qp)
    if window:
        visible = visible & (kp > qp - window)
    mask = visible.expand(B, Hkv, group, T, N).reshape(B, Hkv, group * T, N)
    out = F.scaled_dot_product_attention(q.float().reshape(B, Hkv, group * T, D), k.float(), v.float(),
                                         attn_mask=mask, scale=scale)
    return out.nan_to_num(0.0).view(B, Hq, T, D).to(q.dtype)
