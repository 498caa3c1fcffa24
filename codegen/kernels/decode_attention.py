"""Split-KV decode attention over a slot store, with a fused combine step that can
also emit each slot's attention mass (the eviction policies' scores).

Triplet (DESIGN.md decision 5):

    _decode_split_kernel / _decode_combine_kernel / _decode_mass_kernel   (@triton.jit)
    decode_attention(...)                            host wrapper: checks, allocates, launches
    decode_attention_ref(...)                        plain PyTorch, the definition

Shapes (one query token per sequence):

    q          [B, Hq, D]        the new token's queries (RoPE already applied)
    k_cache    [B, Hkv, C, D]    slot store, C = capacity; Hq % Hkv == 0 (MHA/GQA/MQA)
    v_cache    [B, Hkv, C, D]
    slot_pos   [B, Hkv, C] int32 token position held by each slot, -1 = empty
    q_pos      [B] int           the query's position; a slot is visible iff 0 <= pos <= q_pos
    scores     [B, Hkv, C] f32   optional, updated in place:
                                 scores = decay * scores + sum over the GQA group of p(slot)

returns out [B, Hq, D] (q's dtype). A query that sees no slot gets zeros.

Why split-KV: at batch 1 there are only B*Hkv (3..8) heads, far fewer than the 132
SMs of an H100, so each head's slots are cut into `splits` chunks that run in
parallel; a second small kernel merges the partial softmaxes (flash-decoding).
Each program serves all Hq/Hkv query heads of its KV head, so every K/V byte is
read once (GQA packing). The attention mass needs the global max and sum of the
softmax, which only the combine step knows: the split kernel writes its raw
logits (4 bytes per slot per query head, vs 2*D*2 bytes of K/V per slot per KV
head), the combine step records max and 1/sum per head, and a small mass kernel
(parallel over slots) normalises the logits into the scores; no second pass over
the cache.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima: exp2(-inf - -inf) is NaN, and a split
# whose slots are all empty must produce weight 0, not NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _decode_split_kernel(
    Q, K, V, SLOT_POS, QPOS, O_PART, M_PART, L_PART, LOGITS,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_pb, stride_ph,
    C, HKV, SPLITS, SLOTS_PER_SPLIT,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    TRACK: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GROUP
    d_ok = offs_d < D
    hq = hkv * GROUP + offs_g
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    # Fold the softmax scale and log2(e) into q once: the loop then uses exp2.
    q = (q.to(tl.float32) * qk_scale).to(K.dtype.element_ty)
    qpos = tl.load(QPOS + b)

    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * SLOTS_PER_SPLIT
    end = tl.minimum(start + SLOTS_PER_SPLIT, C)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    p_base = SLOT_POS + b * stride_pb + hkv * stride_ph
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        pos = tl.load(p_base + n, mask=n_ok, other=-1)
        visible = (pos >= 0) & (pos <= qpos) & n_ok
        k = tl.load(k_base + n[:, None] * stride_kc + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)  # [BLOCK_G, BLOCK_N], log2 domain
        s = tl.where(visible[None, :], s, float("-inf"))
        if TRACK:
            lg = LOGITS + (b * HKV * GROUP + hq[:, None]) * C + n[None, :]
            tl.store(lg, s, mask=g_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + n[:, None] * stride_vc + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        m_i = m_new
    row = (b * HKV * GROUP + hq) * SPLITS + split
    tl.store(M_PART + row, m_i, mask=g_ok)
    tl.store(L_PART + row, l_i, mask=g_ok)
    tl.store(O_PART + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    O_PART, M_PART, L_PART, M_FINAL, INV_L, OUT,
    stride_ob, stride_oh,
    HKV, SPLITS,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    TRACK: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // HKV
    hkv = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    s_ok = offs_s < SPLITS
    d_ok = offs_d < D
    hq = hkv * GROUP + offs_g
    row = (b * HKV * GROUP + hq)[:, None] * SPLITS + offs_s[None, :]  # [G, S]
    gs_ok = g_ok[:, None] & s_ok[None, :]
    m = tl.load(M_PART + row, mask=gs_ok, other=_NEG_BIG)
    l = tl.load(L_PART + row, mask=gs_ok, other=0.0)
    m_max = tl.max(m, axis=1)  # [G]
    w = tl.where(l > 0, tl.exp2(m - m_max[:, None]), 0.0)
    l_sum = tl.sum(l * w, axis=1)
    inv_l = tl.where(l_sum > 0, 1.0 / tl.maximum(l_sum, 1e-30), 0.0)
    # acc[g, d] = sum_s w[g, s] * o[g, s, d]; splits are few (<= BLOCK_S), loop over them.
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(0, SPLITS):
        ws = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), axis=1)
        o = tl.load(O_PART + ((b * HKV * GROUP + hq) * SPLITS + s)[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        acc += ws[:, None] * o
    out = acc * inv_l[:, None]
    tl.store(OUT + b * stride_ob + hq[:, None] * stride_oh + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    if TRACK:
        # The softmax's global max and 1/sum per query head, for _decode_mass_kernel.
        tl.store(M_FINAL + b * HKV * GROUP + hq, m_max, mask=g_ok)
        tl.store(INV_L + b * HKV * GROUP + hq, inv_l, mask=g_ok)


@triton.jit
def _decode_mass_kernel(
    LOGITS, M_FINAL, INV_L, SCORES,
    decay,
    stride_sb, stride_sh,
    C, HKV,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """scores[b, hkv, n] = decay * scores + sum over the group's heads of p[h, n];
    one program per (sequence, kv head, block of slots), so it spreads over the GPU."""
    bh = tl.program_id(0)
    b = bh // HKV
    hkv = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GROUP
    hq = hkv * GROUP + offs_g
    m_max = tl.load(M_FINAL + b * HKV * GROUP + hq, mask=g_ok, other=0.0)
    inv_l = tl.load(INV_L + b * HKV * GROUP + hq, mask=g_ok, other=0.0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < C
    lg = tl.load(LOGITS + (b * HKV * GROUP + hq[:, None]) * C + n[None, :], mask=g_ok[:, None] & n_ok[None, :], other=float("-inf"))
    p = tl.exp2(lg - m_max[:, None]) * inv_l[:, None]
    mass = tl.sum(p, axis=0)
    sp = SCORES + b * stride_sb + hkv * stride_sh + n
    old = tl.load(sp, mask=n_ok, other=0.0)
    tl.store(sp, old * decay + mass, mask=n_ok)


# ----------------------------------------------------------------------------- host side


def _check(q, k_cache, v_cache, slot_pos, q_pos, scores) -> tuple[int, int, int, int, int]:
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: k_cache/v_cache must both be [B, Hkv, C, D], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Hq, D = q.shape
    Bk, Hkv, C, Dk = k_cache.shape
    if Bk != B or Dk != D:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on batch or head_dim")
    if Hq % Hkv:
        raise ValueError(f"decode_attention: Hq={Hq} is not a multiple of Hkv={Hkv}; allowed: MHA, GQA or MQA head counts")
    if tuple(slot_pos.shape) != (B, Hkv, C) or slot_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: slot_pos must be int32/int64 [B, Hkv, C] = {(B, Hkv, C)}, got {slot_pos.dtype} {tuple(slot_pos.shape)}")
    if tuple(q_pos.shape) != (B,):
        raise ValueError(f"decode_attention: q_pos must be [B] = [{B}], got {tuple(q_pos.shape)}")
    if scores is not None and (tuple(scores.shape) != (B, Hkv, C) or scores.dtype != torch.float32):
        raise ValueError(f"decode_attention: scores must be float32 [B, Hkv, C] = {(B, Hkv, C)}, got {scores.dtype} {tuple(scores.shape)}")
    return B, Hq, Hkv, C, D


def num_splits_heuristic(batch_heads: int, capacity: int, block_n: int, sm_count: int, max_splits: int = 32) -> int:
    """Splits per KV head: about 2 programs per SM, at most `max_splits`, and no split
    shorter than 4 blocks (below that the combine step costs more than it saves).
    Measured on H100 (results/bench_runtime_smollm.json, 2026-11-22): 32 splits of
    128-slot blocks were best or within 10% of best for 32/8 and 9/3 heads at 16K-64K."""
    want = max(1, (2 * sm_count) // batch_heads)
    most = max(1, capacity // (4 * block_n))
    return max(1, min(want, most, max_splits))


def _launch_config(q: torch.Tensor, B: int, Hkv: int, C: int) -> dict:
    if q.is_cuda:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        # head_dim 128 rows are twice as wide: smaller blocks keep registers in check
        # (best measured: 16 splits of 64 slots for 32/8x128).
        block_n, max_splits = (64, 16) if q.shape[-1] > 64 else (128, 32)
        return {"BLOCK_N": block_n, "splits": num_splits_heuristic(B * Hkv, C, block_n, sms, max_splits), "num_warps": 4, "num_stages": 3}
    # Interpreter (CPU): small blocks, a few splits so the combine path is exercised.
    block_n = 16
    return {"BLOCK_N": block_n, "splits": max(1, min(4, triton.cdiv(C, block_n))), "num_warps": 4, "num_stages": 1}


def decode_attention(q, k_cache, v_cache, slot_pos, q_pos, *, scale: float | None = None, scores=None, decay: float = 1.0, splits: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Attention of one query token per sequence over a slot store (see module doc).

    q [B, Hq, D]; k_cache, v_cache [B, Hkv, C, D]; slot_pos [B, Hkv, C] int (-1 empty);
    q_pos [B] int; scores [B, Hkv, C] float32 or None (updated in place when given).
    Returns out [B, Hq, D] in q's dtype.
    """
    B, Hq, Hkv, C, D = _check(q, k_cache, v_cache, slot_pos, q_pos, scores)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention: the last (head_dim) dimension of q, k_cache and v_cache must be contiguous")
    slot_pos = slot_pos.contiguous() if slot_pos.stride(-1) != 1 else slot_pos
    cfg = _launch_config(q, B, Hkv, C)
    BLOCK_N = block_n or cfg["BLOCK_N"]
    n_splits = splits or cfg["splits"]
    # Every split gets a whole number of blocks; trailing splits may be empty (m stays -inf-like, l = 0).
    per_split = triton.cdiv(triton.cdiv(C, n_splits), BLOCK_N) * BLOCK_N
    n_splits = triton.cdiv(C, per_split)
    group = Hq // Hkv
    BLOCK_G = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    BLOCK_D = max(16, triton.next_power_of_2(D))
    track = scores is not None
    dev = q.device
    o_part = torch.empty(B * Hq * n_splits * D, device=dev, dtype=torch.float32)
    m_part = torch.empty(B * Hq * n_splits, device=dev, dtype=torch.float32)
    l_part = torch.empty(B * Hq * n_splits, device=dev, dtype=torch.float32)
    logits = torch.empty(B * Hq * C if track else 1, device=dev, dtype=torch.float32)
    out = torch.empty((B, Hq, D), device=dev, dtype=q.dtype)
    q_pos = q_pos.to(torch.int64).contiguous()  # the kernel reads q_pos[b]: an expanded (stride-0) tensor would read past it
    _decode_split_kernel[(B * Hkv, n_splits)](
        q, k_cache, v_cache, slot_pos, q_pos, o_part, m_part, l_part, logits,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        slot_pos.stride(0), slot_pos.stride(1),
        C, Hkv, n_splits, per_split,
        GROUP=group, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, D=D, BLOCK_D=BLOCK_D, TRACK=track,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    m_final = torch.empty(B * Hq if track else 1, device=dev, dtype=torch.float32)
    inv_l = torch.empty(B * Hq if track else 1, device=dev, dtype=torch.float32)
    _decode_combine_kernel[(B * Hkv,)](
        o_part, m_part, l_part, m_final, inv_l, out,
        out.stride(0), out.stride(1),
        Hkv, n_splits,
        GROUP=group, BLOCK_G=BLOCK_G, BLOCK_S=max(2, triton.next_power_of_2(n_splits)), D=D, BLOCK_D=BLOCK_D,
        TRACK=track, num_warps=4,
    )
    if track:
        mass_block = 256 if q.is_cuda else 16
        _decode_mass_kernel[(B * Hkv, triton.cdiv(C, mass_block))](
            logits, m_final, inv_l, scores, float(decay),
            scores.stride(0), scores.stride(1), C, Hkv,
            GROUP=group, BLOCK_G=max(2, triton.next_power_of_2(group)), BLOCK_N=mass_block, num_warps=4,
        )
    return out


def decode_attention_ref(q, k_cache, v_cache, slot_pos, q_pos, *, scale: float | None = None, scores=None, decay: float = 1.0):
    """The definition, in float32 PyTorch. Same arguments and result as decode_attention;
    when `scores` is given it is updated in place with the group-summed attention mass."""
    B, Hq, Hkv, C, D = _check(q, k_cache, v_cache, slot_pos, q_pos, scores)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    group = Hq // Hkv
    qf = q.float().view(B, Hkv, group, D)
    logits = torch.einsum("bhgd,bhcd->bhgc", qf, k_cache.float()) * scale
    visible = (slot_pos >= 0) & (slot_pos <= q_pos.view(B, 1, 1))  # [B, Hkv, C]
    logits = logits.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query seeing nothing gets 0
    out = torch.einsum("bhgc,bhcd->bhgd", probs, v_cache.float()).reshape(B, Hq, D)
    if scores is not None:
        scores.mul_(decay).add_(probs.sum(dim=2))
    return out.to(q.dtype)
