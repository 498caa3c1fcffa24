"""Split-KV decode attention over one or two slot stores (tiers), each holding plain
floats or int8/fp8 codes with per-slot scales, with a fused combine step that can also
emit tier 0's per-slot attention mass (the eviction policies' scores).

Triplet (DESIGN.md decision 5):

    _decode_split_kernel / _decode_combine_kernel / _decode_mass_kernel   (@triton.jit)
    decode_attention(...)                            host wrapper: checks, allocates, launches
    decode_attention_ref(...)                        plain PyTorch, the definition

Shapes (one query token per sequence):

    q          [B, Hq, D]        the new token's queries (RoPE already applied)
    k_cache    [B, Hkv, C, D]    tier 0, C = capacity; Hq % Hkv == 0 (MHA/GQA/MQA)
    v_cache    [B, Hkv, C, D]
    slot_pos   [B, Hkv, C] int   token position held by each slot, -1 = empty
    q_pos      [B] int           the query's position
    scores     [B, Hkv, C] f32   optional, tier 0 only, updated in place:
                                 scores = decay * scores + sum over the GQA group of p(slot)
    k_scale,   [B, Hkv, C] f32   optional (both or neither): tier 0 holds int8 or
    v_scale                      float8_e4m3fn codes, or unit directions in a float dtype
                                 (MiniCache's merged layers), slot value ~ code * scale
    second     optional tier 1: (k1, v1, pos1) or (k1, v1, pos1, k1_scale, v1_scale),
               k1, v1 [B, Hkv, C1, D], pos1 [B, Hkv, C1] int, scales [B, Hkv, C1] f32
    window     optional (lo: int, hi: [B] int): which tier serves which positions

Visibility: without `window`, a slot of either tier is visible iff 0 <= pos <= q_pos.
With it, a tier 0 slot also needs lo <= pos < hi, and a tier 1 slot needs pos outside
[lo, hi). The softmax runs over the visible slots of both tiers, so `scores` holds true
probabilities. Returns out [B, Hq, D] (q's dtype); a query that sees no slot gets zeros.
The dots run in q's dtype when a tier holds codes (codes are converted after the load),
else in k_cache's, as plain stores are kept in the model's dtype.

The two-tier stores served: the quantized KV store (passes/kv_quantize/op.py: int8/fp8
codes in tier 0, attention sinks and the recent ring in full precision in tier 1, split
by the window) and MiKV (passes/kv_eviction/mikv_op.py: the kept tokens in full
precision in tier 0 with tracked scores, the evicted ones as codes in tier 1; the tiers
hold disjoint positions, so no window).

Why split-KV: at batch 1 there are only B*Hkv (3..8) heads, far fewer than the 132
SMs of an H100, so each head's slots are cut into `splits` chunks that run in
parallel; a second small kernel merges the partial softmaxes (flash-decoding).
The grid is (B*Hkv, SPLITS0 + SPLITS1): columns below SPLITS0 walk tier 0, the rest
tier 1, and the combine kernel merges every column's partial softmax.
Each program serves all Hq/Hkv query heads of its KV head, so every K/V byte is
read once (GQA packing). The attention mass needs the global max and sum of the
softmax, which only the combine step knows: the split kernel writes tier 0's raw
logits (4 bytes per slot per query head, vs 2*D*2 bytes of K/V per slot per KV
head), the combine step records max and 1/sum per head, and a small mass kernel
(parallel over slots) normalises the logits into the scores; no second pass over
the cache.

Why the scales never touch the K/V tiles: with per-slot scales,
q . (s_n k_n) = s_n (q . k_n) and sum_n p_n (s_n v_n) = sum_n (p_n s_n) v_n, so the loop
multiplies the logits row and the probabilities row by the slots' scales (BLOCK_N values)
instead of dequantising BLOCK_N x D elements. The K/V bytes read per slot drop from
2 * 2D (bf16) to 2 * (D + 4): the point at batch 1, where decode is bandwidth bound.
The flags that select tiers, codes and window are constexpr: a plain single-tier call
compiles to the plain loop.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slimfx.codegen.kernels import dot_precision

LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima: exp2(-inf - -inf) is NaN, and a split
# whose slots are all empty must produce weight 0, not NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _tier_blocks(
    q, qpos, lo, hi, m_i, l_i, acc,
    K, V, POS, KS, VS, LG, g_ok,
    stride_kc, stride_vc, start, end,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALED: tl.constexpr, TIER: tl.constexpr, WINDOW: tl.constexpr, TRACK: tl.constexpr, PRECISION: tl.constexpr,
):
    """The flash-decoding loop over slots start..end-1 of one tier of one KV head (K, V,
    POS, KS, VS point at the head's rows; LG at its query heads' logits rows), in the
    log2 domain, from the running (m_i, l_i, acc); returns them updated."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        pos = tl.load(POS + n, mask=n_ok, other=-1)
        visible = (pos >= 0) & (pos <= qpos) & n_ok
        if WINDOW:
            if TIER == 0:
                visible = visible & (pos >= lo) & (pos < hi)
            else:
                visible = visible & ((pos < lo) | (pos >= hi))
        k = tl.load(K + n[:, None] * stride_kc + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION, out_dtype=tl.float32)  # [BLOCK_G, BLOCK_N]
        if SCALED:
            s = s * tl.load(KS + n, mask=n_ok, other=0.0)[None, :]
        s = tl.where(visible[None, :], s, float("-inf"))
        if TRACK:
            tl.store(LG + n[None, :], s, mask=g_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + n[:, None] * stride_vc + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if SCALED:
            p = p * tl.load(VS + n, mask=n_ok, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION, out_dtype=tl.float32)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, K, V, SLOT_POS, QPOS, O_PART, M_PART, L_PART, LOGITS,
    KS, VS, K1, V1, POS1, KS1, VS1, HI,
    qk_scale, lo,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_pb, stride_ph,
    stride_sb, stride_sh,
    stride_k1b, stride_k1h, stride_k1c,
    stride_v1b, stride_v1h, stride_v1c,
    stride_p1b, stride_p1h,
    stride_s1b, stride_s1h,
    C, C1, HKV, SPLITS, SPLITS0, SLOTS_PER_SPLIT, SLOTS_PER_SPLIT1,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    TRACK: tl.constexpr, SCALED0: tl.constexpr, SECOND: tl.constexpr, SCALED1: tl.constexpr, WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < D
    hq = hkv * GROUP + offs_g
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    # Fold the softmax scale and log2(e) into q once: the loop then uses exp2. The dots
    # run in q's dtype when tier 0 holds codes, else in tier 0's (module doc).
    if SCALED0:
        q = (q.to(tl.float32) * qk_scale).to(Q.dtype.element_ty)
    else:
        q = (q.to(tl.float32) * qk_scale).to(K.dtype.element_ty)
    qpos = tl.load(QPOS + b)
    hi = qpos
    if WINDOW:
        hi = tl.load(HI + b)

    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * SLOTS_PER_SPLIT
    end = tl.minimum(start + SLOTS_PER_SPLIT, C)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    p_base = SLOT_POS + b * stride_pb + hkv * stride_ph
    s_off = b * stride_sb + hkv * stride_sh
    lg_base = LOGITS + (b * HKV * GROUP + hq[:, None]) * C
    if SECOND:
        if split >= SPLITS0:  # a tier 1 column
            start1 = (split - SPLITS0) * SLOTS_PER_SPLIT1
            end1 = tl.minimum(start1 + SLOTS_PER_SPLIT1, C1)
            m_i, l_i, acc = _tier_blocks(
                q, qpos, lo, hi, m_i, l_i, acc,
                K1 + b * stride_k1b + hkv * stride_k1h, V1 + b * stride_v1b + hkv * stride_v1h, POS1 + b * stride_p1b + hkv * stride_p1h,
                KS1 + b * stride_s1b + hkv * stride_s1h, VS1 + b * stride_s1b + hkv * stride_s1h, LOGITS, g_ok,
                stride_k1c, stride_v1c, start1, end1,
                BLOCK_N=BLOCK_N, D=D, BLOCK_D=BLOCK_D, SCALED=SCALED1, TIER=1, WINDOW=WINDOW, TRACK=False, PRECISION=PRECISION,
            )
        else:
            m_i, l_i, acc = _tier_blocks(q, qpos, lo, hi, m_i, l_i, acc, k_base, v_base, p_base, KS + s_off, VS + s_off, lg_base, g_ok, stride_kc, stride_vc, start, end, BLOCK_N=BLOCK_N, D=D, BLOCK_D=BLOCK_D, SCALED=SCALED0, TIER=0, WINDOW=WINDOW, TRACK=TRACK, PRECISION=PRECISION)
    else:
        m_i, l_i, acc = _tier_blocks(q, qpos, lo, hi, m_i, l_i, acc, k_base, v_base, p_base, KS + s_off, VS + s_off, lg_base, g_ok, stride_kc, stride_vc, start, end, BLOCK_N=BLOCK_N, D=D, BLOCK_D=BLOCK_D, SCALED=SCALED0, TIER=0, WINDOW=WINDOW, TRACK=TRACK, PRECISION=PRECISION)
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

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_CODES = tuple(t for t in (torch.int8, getattr(torch, "float8_e4m3fn", None)) if t is not None)


def _check_tier(names: tuple[str, str, str, str], k, v, pos, k_scale, v_scale, B: int, Hkv: int, D: int) -> int:
    """The rules both tiers share; `names` = (k/v, positions, k scale, v scale) as the caller
    spells them. Returns the tier's capacity."""
    kv, pos_name, ks_name, vs_name = names
    if k.dim() != 4 or v.shape != k.shape or tuple(k.shape[:2]) != (B, Hkv) or k.shape[3] != D:
        raise ValueError(f"decode_attention: {kv} must both be [B, Hkv, C, D] = [{B}, {Hkv}, C, {D}], got {tuple(k.shape)} and {tuple(v.shape)}")
    C = k.shape[2]
    if tuple(pos.shape) != (B, Hkv, C) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: {pos_name} must be int32/int64 [B, Hkv, C] = {(B, Hkv, C)}, got {pos.dtype} {tuple(pos.shape)}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError(f"decode_attention: {ks_name} and {vs_name} go together (a tier of codes needs both), got only {ks_name if v_scale is None else vs_name}")
    coded = k_scale is not None
    if k.dtype not in (_CODES + _FLOATS if coded else _FLOATS) or v.dtype != k.dtype:
        allowed = "both int8, float8_e4m3fn or a float dtype (codes, with scales)" if coded else f"both float16, bfloat16 or float32 (without {ks_name}/{vs_name})"
        raise ValueError(f"decode_attention: {kv} dtype {k.dtype}/{v.dtype}; allowed: {allowed}")
    for name, t in ((ks_name, k_scale), (vs_name, v_scale)):
        if coded and (tuple(t.shape) != (B, Hkv, C) or t.dtype != torch.float32):
            raise ValueError(f"decode_attention: {name} must be float32 [B, Hkv, C] = {(B, Hkv, C)}, got {t.dtype} {tuple(t.shape)}")
    return C


def _check(q, k_cache, v_cache, slot_pos, q_pos, scores, k_scale, v_scale, second, window):
    """Validates every argument; returns (B, Hq, Hkv, C, D, tier1, window) with tier1 =
    (k1, v1, pos1, k1_scale, v1_scale, C1) or None and window = (lo, hi) or None."""
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"decode_attention: q dtype {q.dtype}; allowed: float16, bfloat16 or float32")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: k_cache/v_cache must both be [B, Hkv, C, D], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Hq, D = q.shape
    Bk, Hkv, C, Dk = k_cache.shape
    if Bk != B or Dk != D:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on batch or head_dim")
    if Hq % Hkv:
        raise ValueError(f"decode_attention: Hq={Hq} is not a multiple of Hkv={Hkv}; allowed: MHA, GQA or MQA head counts")
    _check_tier(("k_cache/v_cache", "slot_pos", "k_scale", "v_scale"), k_cache, v_cache, slot_pos, k_scale, v_scale, B, Hkv, D)
    if tuple(q_pos.shape) != (B,):
        raise ValueError(f"decode_attention: q_pos must be [B] = [{B}], got {tuple(q_pos.shape)}")
    if scores is not None and (tuple(scores.shape) != (B, Hkv, C) or scores.dtype != torch.float32):
        raise ValueError(f"decode_attention: scores must be float32 [B, Hkv, C] = {(B, Hkv, C)}, got {scores.dtype} {tuple(scores.shape)}")
    tier1 = None
    if second is not None:
        if not isinstance(second, (tuple, list)) or len(second) not in (3, 5):
            raise ValueError(f"decode_attention: second must be (k1, v1, pos1) or (k1, v1, pos1, k1_scale, v1_scale), got {type(second).__name__} of length {len(second) if isinstance(second, (tuple, list)) else '-'}")
        k1, v1, pos1, ks1, vs1 = (*second, None, None)[:5]
        C1 = _check_tier(("second k1/v1", "second pos1", "second k1_scale", "second v1_scale"), k1, v1, pos1, ks1, vs1, B, Hkv, D)
        tier1 = (k1, v1, pos1, ks1, vs1, C1)
    # The dots run in q's dtype when a tier holds codes, else in k_cache's: plain tiers must match.
    coded = k_scale is not None or (tier1 is not None and tier1[3] is not None)
    cdt = q.dtype if coded else k_cache.dtype
    if k_scale is None and k_cache.dtype != cdt:
        raise ValueError(f"decode_attention: k_cache/v_cache dtype {k_cache.dtype} must equal q's {q.dtype} when tier 1 holds codes")
    if tier1 is not None and tier1[3] is None and tier1[0].dtype != cdt:
        raise ValueError(f"decode_attention: second k1/v1 dtype {tier1[0].dtype} must equal {cdt} (q's when a tier holds codes, else k_cache's)")
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"decode_attention: window must be (lo: int, hi: int tensor [B]), got {type(window).__name__}")
        lo, hi = window
        if not isinstance(hi, torch.Tensor) or tuple(hi.shape) != (B,) or hi.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"decode_attention: window hi must be an int32/int64 tensor [B] = [{B}], got {getattr(hi, 'dtype', type(hi).__name__)} {tuple(getattr(hi, 'shape', ()))}")
        window = (int(lo), hi)
    return B, Hq, Hkv, C, D, tier1, window


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


def _stages(cfg: dict, q: torch.Tensor, second: bool) -> int:
    """Pipeline stages: the tuned count, but one for float32 with two tiers, whose two
    pipelined loops need more shared memory than an H100 has (268 KB asked, 227 KB there,
    measured 2026-12-06 with 128-slot blocks at head_dim 64)."""
    return 1 if second and q.element_size() == 4 and q.is_cuda else cfg["num_stages"]


def _split(C: int, want: int, block_n: int) -> tuple[int, int]:
    """(splits, slots per split) for a tier of C slots: every split gets a whole number of
    blocks; trailing splits may be empty (m stays -inf-like, l = 0), as does the one split
    of an empty tier."""
    per_split = max(1, triton.cdiv(triton.cdiv(C, want), block_n)) * block_n
    return max(1, triton.cdiv(C, per_split)), per_split


def _scales(k_scale, v_scale):
    """Scales as the kernel reads them: one stride pair for both, last dimension contiguous."""
    if k_scale is not None and (k_scale.stride(-1) != 1 or k_scale.stride() != v_scale.stride()):
        return k_scale.contiguous(), v_scale.contiguous()
    return k_scale, v_scale


def decode_attention(q, k_cache, v_cache, slot_pos, q_pos, *, scale: float | None = None, scores=None, decay: float = 1.0, k_scale=None, v_scale=None, second=None, window=None, splits: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Attention of one query token per sequence over one or two tiers (see module doc).

    q [B, Hq, D]; k_cache, v_cache [B, Hkv, C, D]; slot_pos [B, Hkv, C] int (-1 empty);
    q_pos [B] int; scores [B, Hkv, C] float32 or None (updated in place when given);
    k_scale, v_scale [B, Hkv, C] float32 when tier 0 holds codes; second = (k1, v1, pos1
    [, k1_scale, v1_scale]); window = (lo, hi [B]). `splits` is tier 0's split count.
    Returns out [B, Hq, D] in q's dtype.
    """
    B, Hq, Hkv, C, D, tier1, window = _check(q, k_cache, v_cache, slot_pos, q_pos, scores, k_scale, v_scale, second, window)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention: the last (head_dim) dimension of q, k_cache and v_cache must be contiguous")
    if scores is not None and scores.stride(-1) != 1:
        raise ValueError("decode_attention: the last dimension of scores must be contiguous (it is updated in place)")
    slot_pos = slot_pos.contiguous() if slot_pos.stride(-1) != 1 else slot_pos
    k_scale, v_scale = _scales(k_scale, v_scale)
    cfg = _launch_config(q, B, Hkv, C)
    BLOCK_N = block_n or cfg["BLOCK_N"]
    n_splits, per_split = _split(C, splits or cfg["splits"], BLOCK_N)
    group = Hq // Hkv
    BLOCK_G = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    BLOCK_D = max(16, triton.next_power_of_2(D))
    track = scores is not None
    dev = q.device
    dummy = torch.empty(1, 1, 1, 1, device=dev, dtype=torch.float32)  # stands for the tensors a call does not have
    if tier1 is not None and tier1[5] > 0:
        k1, v1, pos1, ks1, vs1, C1 = tier1
        if k1.stride(-1) != 1 or v1.stride(-1) != 1:
            raise ValueError("decode_attention: the last (head_dim) dimension of second's k1 and v1 must be contiguous")
        pos1 = pos1.contiguous() if pos1.stride(-1) != 1 else pos1
        ks1, vs1 = _scales(ks1, vs1)
        n_splits1, per_split1 = _split(C1, 1 if C1 <= 4 * BLOCK_N else _launch_config(q, B, Hkv, C1)["splits"], BLOCK_N)
    else:  # no tier 1, or an empty one: nothing to read
        k1, v1, pos1, ks1, vs1, C1, n_splits1, per_split1 = dummy, dummy, dummy, None, None, 0, 0, 0
    ks0 = dummy if k_scale is None else k_scale
    s1 = dummy if ks1 is None else ks1
    lo, hi = window if window is not None else (0, dummy)
    total = n_splits + n_splits1
    o_part = torch.empty(B * Hq * total * D, device=dev, dtype=torch.float32)
    m_part = torch.empty(B * Hq * total, device=dev, dtype=torch.float32)
    l_part = torch.empty(B * Hq * total, device=dev, dtype=torch.float32)
    logits = torch.empty(B * Hq * C if track else 1, device=dev, dtype=torch.float32)
    out = torch.empty((B, Hq, D), device=dev, dtype=q.dtype)
    q_pos = q_pos.to(torch.int64).contiguous()  # the kernel reads q_pos[b]: an expanded (stride-0) tensor would read past it
    hi = hi.to(torch.int64).contiguous() if window is not None else hi
    _decode_split_kernel[(B * Hkv, total)](
        q, k_cache, v_cache, slot_pos, q_pos, o_part, m_part, l_part, logits,
        ks0, dummy if v_scale is None else v_scale, k1, v1, pos1, s1, dummy if vs1 is None else vs1, hi,
        scale * LOG2E, lo,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        slot_pos.stride(0), slot_pos.stride(1),
        ks0.stride(0), ks0.stride(1),
        k1.stride(0), k1.stride(1), k1.stride(2),
        v1.stride(0), v1.stride(1), v1.stride(2),
        pos1.stride(0), pos1.stride(1),
        s1.stride(0), s1.stride(1),
        C, C1, Hkv, total, n_splits, per_split, per_split1,
        GROUP=group, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, D=D, BLOCK_D=BLOCK_D, TRACK=track,
        SCALED0=k_scale is not None, SECOND=n_splits1 > 0, SCALED1=ks1 is not None, WINDOW=window is not None,
        PRECISION=dot_precision(q),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or _stages(cfg, q, n_splits1 > 0),
    )
    m_final = torch.empty(B * Hq if track else 1, device=dev, dtype=torch.float32)
    inv_l = torch.empty(B * Hq if track else 1, device=dev, dtype=torch.float32)
    _decode_combine_kernel[(B * Hkv,)](
        o_part, m_part, l_part, m_final, inv_l, out,
        out.stride(0), out.stride(1),
        Hkv, total,
        GROUP=group, BLOCK_G=BLOCK_G, BLOCK_S=max(2, triton.next_power_of_2(total)), D=D, BLOCK_D=BLOCK_D,
        TRACK=track, num_warps=4,
    )
    if track and C > 0:
        mass_block = 256 if q.is_cuda else 16
        _decode_mass_kernel[(B * Hkv, triton.cdiv(C, mass_block))](
            logits, m_final, inv_l, scores, float(decay),
            scores.stride(0), scores.stride(1), C, Hkv,
            GROUP=group, BLOCK_G=max(2, triton.next_power_of_2(group)), BLOCK_N=mass_block, num_warps=4,
        )
    return out


def _dequant(x, scale):
    return x.float() if scale is None else x.float() * scale[..., None]


def decode_attention_ref(q, k_cache, v_cache, slot_pos, q_pos, *, scale: float | None = None, scores=None, decay: float = 1.0, k_scale=None, v_scale=None, second=None, window=None):
    """The definition, in float32 PyTorch: dequantise each tier, apply the visibility rules,
    one softmax over both tiers. Same arguments and result as decode_attention; when
    `scores` is given it is updated in place with tier 0's group-summed attention mass."""
    B, Hq, Hkv, C, D, tier1, window = _check(q, k_cache, v_cache, slot_pos, q_pos, scores, k_scale, v_scale, second, window)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qp = q_pos.reshape(B, 1, 1)
    keys, vals = [_dequant(k_cache, k_scale)], [_dequant(v_cache, v_scale)]
    visible = [(slot_pos >= 0) & (slot_pos <= qp)]  # [B, Hkv, C]
    if window is not None:
        lo, hi = window[0], window[1].reshape(B, 1, 1)
        visible[0] = visible[0] & (slot_pos >= lo) & (slot_pos < hi)
    if tier1 is not None:
        k1, v1, pos1, ks1, vs1, _ = tier1
        keys.append(_dequant(k1, ks1))
        vals.append(_dequant(v1, vs1))
        visible.append((pos1 >= 0) & (pos1 <= qp))
        if window is not None:
            visible[1] = visible[1] & ~((pos1 >= lo) & (pos1 < hi))
    group = Hq // Hkv
    qf = q.float().view(B, Hkv, group, D)
    logits = torch.einsum("bhgd,bhcd->bhgc", qf, torch.cat(keys, dim=2)) * scale
    logits = logits.masked_fill(~torch.cat(visible, dim=2)[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query seeing nothing gets 0
    out = torch.einsum("bhgc,bhcd->bhgd", probs, torch.cat(vals, dim=2)).reshape(B, Hq, D)
    if scores is not None:
        scores.mul_(decay).add_(probs[..., :C].sum(dim=2))
    return out.to(q.dtype)
