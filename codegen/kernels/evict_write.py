"""Decode-time eviction in one kernel: choose the slot a new token overwrites and write it.
(`ring_write`: the same write to slot pos % C, for sites that do not evict.)

For each (sequence, kv head) one program scans the site's C slots once: the cost of a
slot is -inf when empty, +inf when protected (a sink, or inside the recent window),
else its priority: "score" (accumulated attention mass: H2O, A2SF), "position"
(StreamingLLM, DuoAttention's streaming heads) or "mean" (the mass divided by the number
of queries that have seen the slot's token, pos - slot position: H2O with `mass =
"mean"`); the first slot of least cost receives the token's k, v, position, and a
zero score. In PyTorch the same choice takes ~12 small kernels per layer (where, sort
or argmin, four scatters), which at batch 1 costs more than the attention itself.

    evict_write(k, v, pos, k_cache, v_cache, slot_pos, scores, n_sink, window, priority)

k, v [B, Hkv, 1, D]; pos [B] int64 (the token's true position); caches as SiteCache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _evict_write_kernel(
    k_ptr, v_ptr, pos_ptr, kc_ptr, vc_ptr, sp_ptr, sc_ptr,
    Hkv, C, D, n_sink, window,
    s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_cb, s_ch, s_cc, s_pb, s_ph, s_posb,
    PRIORITY: tl.constexpr, RING: tl.constexpr, SCORES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.program_id(1)  # RING: the token of a chunk (pos [B, T]); eviction writes one token
    b = pid // Hkv
    h = pid % Hkv
    seen = tl.load(pos_ptr + b * s_posb + t)
    # The stored position: a padding token (negative position) marks its slot empty.
    stored = tl.maximum(seen, -1)
    if RING:
        best_idx = (seen % C + C) % C  # slot pos mod C (Python's modulo, pads included)
    else:
        best = float("inf")
        best_idx = 0
        for start in range(0, C, BLOCK_C):
            offs = start + tl.arange(0, BLOCK_C)
            inside = offs < C
            p = tl.load(sp_ptr + b * s_pb + h * s_ph + offs, mask=inside, other=-1).to(tl.int64)
            if PRIORITY == 1:  # position
                prio = p.to(tl.float32)
            else:
                prio = tl.load(sc_ptr + b * s_pb + h * s_ph + offs, mask=inside, other=0.0).to(tl.float32)
                if PRIORITY == 2:  # mean per query; div_rn: the same rounding as PyTorch's division
                    prio = tl.div_rn(prio, tl.maximum(seen - p, 1).to(tl.float32))
            filled = p >= 0
            protected = filled & ((p < n_sink) | (p >= seen - window))
            cost = tl.where(filled, tl.where(protected, float("inf"), prio), float("-inf"))
            cost = tl.where(inside, cost, float("inf"))
            block_min = tl.min(cost, axis=0)
            block_idx = tl.argmin(cost, axis=0)
            take = block_min < best  # strict: the first block holding the minimum wins
            best_idx = tl.where(take, start + block_idx, best_idx)
            best = tl.where(take, block_min, best)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    dst = b * s_cb + h * s_ch + best_idx * s_cc + d
    tl.store(kc_ptr + dst, tl.load(k_ptr + b * s_kb + h * s_kh + t * s_kt + d, mask=dm).to(kc_ptr.dtype.element_ty), mask=dm)
    tl.store(vc_ptr + dst, tl.load(v_ptr + b * s_vb + h * s_vh + t * s_vt + d, mask=dm).to(vc_ptr.dtype.element_ty), mask=dm)
    tl.store(sp_ptr + b * s_pb + h * s_ph + best_idx, stored.to(sp_ptr.dtype.element_ty))
    if SCORES:
        tl.store(sc_ptr + b * s_pb + h * s_ph + best_idx, 0.0)


def _check(name: str, k, v, pos, k_cache, v_cache, slot_pos, scores) -> None:
    """k, v [B, Hkv, T, D] alike, pos [B, T], and caches they fit."""
    B, Hkv, T, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"{name}: k, v must be [B, Hkv, T, D] alike; got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape[:2] != (B, Hkv) or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: caches {tuple(k_cache.shape)} do not fit k {tuple(k.shape)}")
    scores = slot_pos if scores is None else scores  # a ring write may have no scores to zero
    if slot_pos.shape != k_cache.shape[:3] or scores.shape != slot_pos.shape or tuple(pos.shape) != (B, T):
        raise ValueError(f"{name}: slot_pos/scores must be {tuple(k_cache.shape[:3])} and positions {(B, T)}, "
                         f"got {tuple(slot_pos.shape)}, {tuple(scores.shape)}, {tuple(pos.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() or slot_pos.stride() != scores.stride() or slot_pos.stride(-1) != 1:
        raise ValueError(f"{name}: last dimensions must be contiguous and slot_pos/scores share strides")


PRIORITIES = ("score", "position", "mean")


def evict_write(k, v, pos, k_cache, v_cache, slot_pos, scores, n_sink: int, window: int, priority: str) -> None:
    """Write one token per (sequence, kv head) into the slot the policy frees (in place).
    k, v [B, Hkv, 1, D]; pos [B]."""
    _check_one_token(k, pos)
    _launch("evict_write", k, v, pos[:, None], k_cache, v_cache, slot_pos, scores, n_sink, window, priority, ring=False)


def _check_one_token(k, pos) -> None:
    if k.dim() != 4 or k.shape[2] != 1 or pos.dim() != 1:
        raise ValueError(f"evict_write: k must be [B, Hkv, 1, D] and pos [B]; got {tuple(k.shape)} and {tuple(pos.shape)}")


def ring_write(k, v, pos, k_cache, v_cache, slot_pos, scores=None) -> None:
    """A step's write without eviction, in one kernel: k, v [B, Hkv, T, D], pos [B, T] (or [B]
    for T == 1). Token t goes to slot pos % C (with a zero score when the site has scores); a padding token (pos < 0)
    marks its slot empty; of a chunk longer than C only the last C tokens are written.
    What runtime.attention_op.write_tokens does in ~7 PyTorch kernels."""
    pos = pos[:, None] if pos.dim() == 1 else pos
    C = k_cache.shape[2]
    if k.dim() == 4 and k.shape[2] > C:  # earlier tokens would be overwritten within the chunk: the last C win
        k, v, pos = k[:, :, -C:], v[:, :, -C:], pos[:, -C:]
    _launch("ring_write", k, v, pos, k_cache, v_cache, slot_pos, scores, 0, 0, "score", ring=True)


def _launch(name, k, v, pos, k_cache, v_cache, slot_pos, scores, n_sink, window, priority: str, *, ring: bool) -> None:
    _check(name, k, v, pos, k_cache, v_cache, slot_pos, scores)
    if priority not in PRIORITIES:
        raise ValueError(f"{name}: priority {priority!r}; allowed: {', '.join(PRIORITIES)}")
    B, Hkv, T, D = k.shape
    C = k_cache.shape[2]
    pos = pos.contiguous()  # the kernel reads pos[b, t]: an expanded (stride-0) tensor would read past it
    _evict_write_kernel[(B * Hkv, T)](
        k, v, pos, k_cache, v_cache, slot_pos, slot_pos if scores is None else scores,
        Hkv, C, D, n_sink, window,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), slot_pos.stride(0), slot_pos.stride(1), pos.stride(0),
        PRIORITY=PRIORITIES.index(priority), RING=ring, SCORES=scores is not None, BLOCK_C=min(1024, triton.next_power_of_2(C)), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4,
    )


def evict_write_ref(k, v, pos, k_cache, v_cache, slot_pos, scores, n_sink: int, window: int, priority: str) -> None:
    """The definition in PyTorch (same in-place effect as evict_write)."""
    _check_one_token(k, pos)
    _check("evict_write", k, v, pos[:, None], k_cache, v_cache, slot_pos, scores)
    B, Hkv = k.shape[:2]
    p = slot_pos.long()
    filled = p >= 0
    protected = filled & ((p < n_sink) | (p >= pos.view(B, 1, 1) - window))
    prio = {"position": lambda: p.float(), "score": lambda: scores.float(),
            "mean": lambda: scores.float() / (pos.view(B, 1, 1) - p).clamp_min(1).float()}[priority]()
    cost = torch.where(filled, torch.where(protected, float("inf"), prio), float("-inf"))
    slot = cost.argmin(dim=-1, keepdim=True)  # first index of the minimum
    idx = slot[..., None].expand(B, Hkv, 1, k.shape[3])
    k_cache.scatter_(2, idx, k.to(k_cache.dtype))
    v_cache.scatter_(2, idx, v.to(v_cache.dtype))
    slot_pos.scatter_(2, slot, pos.view(B, 1, 1).expand(B, Hkv, 1).to(slot_pos.dtype))
    scores.scatter_(2, slot, 0.0)
