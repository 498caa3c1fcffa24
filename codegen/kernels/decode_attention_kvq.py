"""Split-KV decode attention over a two-tier quantized KV store (int8 or fp8 per token),
dequantizing inside the loop, with one fused combine step over both tiers.

Triplet (DESIGN.md decision 5):

    _kvq_split_kernel (@triton.jit), combine: decode_attention._decode_combine_kernel
    decode_attention_kvq(...)         host wrapper: checks, allocates, launches
    decode_attention_kvq_ref(...)     plain PyTorch, the definition

Shapes (one query token per sequence; the store of runtime/kv_quant_op.py):

    q                [B, Hq, D]        queries (RoPE applied)
    k_q, v_q         [B, Hkv, C, D]    quantized tier, int8 or float8_e4m3fn
    k_scale, v_scale [B, Hkv, C] f32   per-token scales: x ~ q * scale
    slot_pos         [B, Hkv, C] int32 position per slot, -1 empty
    fp_k, fp_v       [B, Hkv, F, D]    full-precision tier (sinks + recent ring), q's dtype
    fp_pos           [B, Hkv, F] int32
    q_pos, limit     [B] int           the query's position; the first position read from
                                       the full-precision tier (runtime/kv_quant_op.qlimit)
    n_sink           int               positions below it are read from the full-precision tier

A quantized slot is visible iff n_sink <= pos < limit and pos <= q_pos; a full-precision
slot iff pos >= 0, (pos < n_sink or pos >= limit) and pos <= q_pos. Returns [B, Hq, D].

Why the scales never touch the K/V tiles: with per-token scales,
q . (s_n k_n) = s_n (q . k_n) and sum_n p_n (s_n v_n) = sum_n (p_n s_n) v_n, so the loop
multiplies the logits row and the probabilities row by the slot's scales (BLOCK_N values)
instead of dequantizing BLOCK_N x D elements. The K/V bytes read per slot drop from
2 * 2D (bf16) to 2 * (D + 4): the whole point at batch 1, where decode is bandwidth bound.

The grid is (B * Hkv, splits + 1): programs 0..splits-1 walk the quantized tier, the last
one walks the (small) full-precision tier; every program writes a partial softmax and
decode_attention's combine kernel merges them all.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slimfx.codegen.kernels.decode_attention import LOG2E, _NEG_BIG, _decode_combine_kernel, num_splits_heuristic


@triton.jit
def _online_block(q, k, v, k_scale, v_scale, visible, m_i, l_i, acc):
    """One block of the flash-decoding loop: logits in the log2 domain, scaled per slot."""
    s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * k_scale[None, :]
    s = tl.where(visible[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot((p * v_scale[None, :]).to(v.dtype), v, out_dtype=tl.float32)
    return m_new, l_i, acc


@triton.jit
def _kvq_split_kernel(
    Q, KQ, VQ, KS, VS, SLOT_POS, FK, FV, FP_POS, QPOS, LIMIT, O_PART, M_PART, L_PART,
    qk_scale, n_sink,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_sb, stride_sh,
    stride_pb, stride_ph,
    stride_fkb, stride_fkh, stride_fkc,
    stride_fvb, stride_fvh, stride_fvc,
    stride_fpb, stride_fph,
    C, F, HKV, SPLITS, SLOTS_PER_SPLIT,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
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
    cdt = FK.dtype.element_ty  # compute dtype of the dots: the model's
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(cdt)
    qpos = tl.load(QPOS + b)
    limit = tl.load(LIMIT + b)
    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # Names differ between the branches: Triton merges same-named values of an `if`, and
    # the two tiers' pointers have different element types.
    if split < SPLITS:  # the quantized tier
        start = split * SLOTS_PER_SPLIT
        end = tl.minimum(start + SLOTS_PER_SPLIT, C)
        kq_base = KQ + b * stride_kb + hkv * stride_kh
        vq_base = VQ + b * stride_vb + hkv * stride_vh
        s_off = b * stride_sb + hkv * stride_sh
        sp_base = SLOT_POS + b * stride_pb + hkv * stride_ph
        for n0 in range(start, end, BLOCK_N):
            n = n0 + offs_n
            n_ok = n < end
            pos = tl.load(sp_base + n, mask=n_ok, other=-1)
            visible = (pos >= n_sink) & (pos < limit) & (pos <= qpos) & n_ok
            kd_ok = n_ok[:, None] & d_ok[None, :]
            kt = tl.load(kq_base + n[:, None] * stride_kc + offs_d[None, :], mask=kd_ok, other=0.0).to(cdt)
            vt = tl.load(vq_base + n[:, None] * stride_vc + offs_d[None, :], mask=kd_ok, other=0.0).to(cdt)
            ks = tl.load(KS + s_off + n, mask=n_ok, other=0.0)
            vs = tl.load(VS + s_off + n, mask=n_ok, other=0.0)
            m_i, l_i, acc = _online_block(q, kt, vt, ks, vs, visible, m_i, l_i, acc)
    else:  # the full-precision tier: sinks and the recent ring
        fk_base = FK + b * stride_fkb + hkv * stride_fkh
        fv_base = FV + b * stride_fvb + hkv * stride_fvh
        fp_base = FP_POS + b * stride_fpb + hkv * stride_fph
        ones = tl.full([BLOCK_N], 1.0, tl.float32)
        for f0 in range(0, F, BLOCK_N):
            f = f0 + offs_n
            f_ok = f < F
            fpos = tl.load(fp_base + f, mask=f_ok, other=-1)
            fvisible = (fpos >= 0) & ((fpos < n_sink) | (fpos >= limit)) & (fpos <= qpos) & f_ok
            fd_ok = f_ok[:, None] & d_ok[None, :]
            fk = tl.load(fk_base + f[:, None] * stride_fkc + offs_d[None, :], mask=fd_ok, other=0.0)
            fv = tl.load(fv_base + f[:, None] * stride_fvc + offs_d[None, :], mask=fd_ok, other=0.0)
            m_i, l_i, acc = _online_block(q, fk, fv, ones, ones, fvisible, m_i, l_i, acc)
    row = (b * HKV * GROUP + hq) * (SPLITS + 1) + split
    tl.store(M_PART + row, m_i, mask=g_ok)
    tl.store(L_PART + row, l_i, mask=g_ok)
    tl.store(O_PART + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _kvq_write_kernel(
    K, V, POS, KQ, VQ, KS, VS, SLOT_POS, FK, FV, FP_POS,
    stride_kb, stride_kh, stride_vb, stride_vh,
    stride_qb, stride_qh, stride_qc, stride_sb, stride_sh, stride_pb, stride_ph,
    stride_fb, stride_fh, stride_fc, stride_fpb, stride_fph,
    C, W, HKV, n_sink,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One decode token per (sequence, kv head): int8 per-token quantization into slot
    pos % C of the quantized tier, and the raw row into the full-precision tier."""
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    pos = tl.load(POS + b)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_d, mask=d_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_d, mask=d_ok, other=0.0)
    slot = ((pos % C) + C) % C
    k_scale = tl.max(tl.abs(k.to(tl.float32)), axis=0) / 127.0
    v_scale = tl.max(tl.abs(v.to(tl.float32)), axis=0) / 127.0
    k_safe = tl.where(k_scale > 0, k_scale, 1.0)
    v_safe = tl.where(v_scale > 0, v_scale, 1.0)
    # Round half away from zero (torch.round rounds half to even: a tie may differ by one code).
    kx = k.to(tl.float32) / k_safe
    vx = v.to(tl.float32) / v_safe
    kq = tl.where(kx >= 0, tl.floor(kx + 0.5), -tl.floor(-kx + 0.5))
    vq = tl.where(vx >= 0, tl.floor(vx + 0.5), -tl.floor(-vx + 0.5))
    kq = tl.minimum(tl.maximum(kq, -127.0), 127.0)
    vq = tl.minimum(tl.maximum(vq, -127.0), 127.0)
    row = b * stride_qb + h * stride_qh + slot * stride_qc
    tl.store(KQ + row + offs_d, kq.to(tl.int8), mask=d_ok)
    tl.store(VQ + row + offs_d, vq.to(tl.int8), mask=d_ok)
    s_off = b * stride_sb + h * stride_sh + slot
    tl.store(KS + s_off, k_scale)
    tl.store(VS + s_off, v_scale)
    tl.store(SLOT_POS + b * stride_pb + h * stride_ph + slot, tl.where(pos < 0, -1, pos).to(tl.int32))
    ring = tl.where(pos < n_sink, pos, n_sink + (((pos - n_sink) % W) + W) % W)
    keep = (offs_d * 0 + pos) >= 0  # a padding token (negative position) skips the full-precision tier
    frow = b * stride_fb + h * stride_fh + ring * stride_fc
    tl.store(FK + frow + offs_d, k.to(FK.dtype.element_ty), mask=d_ok & keep)
    tl.store(FV + frow + offs_d, v.to(FV.dtype.element_ty), mask=d_ok & keep)
    tl.store(FP_POS + b * stride_fpb + h * stride_fph + ring + offs_d * 0, (offs_d * 0 + pos).to(tl.int32), mask=(offs_d == 0) & keep)


# ----------------------------------------------------------------------------- host side

_QDTYPES = tuple(t for t in (torch.int8, getattr(torch, "float8_e4m3fn", None)) if t is not None)


def _check(q, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, q_pos, limit):
    if q.dim() != 3:
        raise ValueError(f"decode_attention_kvq: q must be [B, Hq, D], got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if k_q.dim() != 4 or v_q.shape != k_q.shape or k_q.shape[0] != B or k_q.shape[3] != D:
        raise ValueError(f"decode_attention_kvq: k_q/v_q must both be [B, Hkv, C, D] with B={B}, D={D}; got {tuple(k_q.shape)} and {tuple(v_q.shape)}")
    _, Hkv, C, _ = k_q.shape
    if k_q.dtype not in _QDTYPES or v_q.dtype != k_q.dtype:
        raise ValueError(f"decode_attention_kvq: k_q/v_q dtype {k_q.dtype}/{v_q.dtype}; allowed: both int8 or both float8_e4m3fn")
    if Hq % Hkv:
        raise ValueError(f"decode_attention_kvq: Hq={Hq} is not a multiple of Hkv={Hkv}; allowed: MHA, GQA or MQA head counts")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if tuple(t.shape) != (B, Hkv, C) or t.dtype != torch.float32:
            raise ValueError(f"decode_attention_kvq: {name} must be float32 [B, Hkv, C] = {(B, Hkv, C)}, got {t.dtype} {tuple(t.shape)}")
    if tuple(slot_pos.shape) != (B, Hkv, C) or slot_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention_kvq: slot_pos must be int32/int64 [B, Hkv, C] = {(B, Hkv, C)}, got {slot_pos.dtype} {tuple(slot_pos.shape)}")
    if fp_k.dim() != 4 or fp_v.shape != fp_k.shape or tuple(fp_k.shape[:2]) != (B, Hkv) or fp_k.shape[3] != D:
        raise ValueError(f"decode_attention_kvq: fp_k/fp_v must both be [B, Hkv, F, D] = [{B}, {Hkv}, F, {D}], got {tuple(fp_k.shape)} and {tuple(fp_v.shape)}")
    if fp_k.dtype != q.dtype or fp_v.dtype != q.dtype:
        raise ValueError(f"decode_attention_kvq: fp_k/fp_v dtype {fp_k.dtype}/{fp_v.dtype} must equal q's {q.dtype}")
    F = fp_k.shape[2]
    if tuple(fp_pos.shape) != (B, Hkv, F) or fp_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention_kvq: fp_pos must be int32/int64 [B, Hkv, F] = {(B, Hkv, F)}, got {fp_pos.dtype} {tuple(fp_pos.shape)}")
    for name, t in (("q_pos", q_pos), ("limit", limit)):
        if tuple(t.shape) != (B,):
            raise ValueError(f"decode_attention_kvq: {name} must be [B] = [{B}], got {tuple(t.shape)}")
    return B, Hq, Hkv, C, F, D


def _launch_config(q: torch.Tensor, B: int, Hkv: int, C: int) -> dict:
    if q.is_cuda:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        block_n, max_splits = (64, 16) if q.shape[-1] > 64 else (128, 32)
        return {"BLOCK_N": block_n, "splits": num_splits_heuristic(B * Hkv, C, block_n, sms, max_splits), "num_warps": 4, "num_stages": 3}
    # Interpreter (CPU): small blocks, a few splits so the combine path is exercised.
    return {"BLOCK_N": 16, "splits": max(1, min(3, triton.cdiv(C, 16))), "num_warps": 4, "num_stages": 1}


def decode_attention_kvq(q, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, q_pos, limit, *, n_sink: int, scale: float | None = None, splits: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Decode attention over both tiers (module doc). Returns out [B, Hq, D] in q's dtype."""
    B, Hq, Hkv, C, F, D = _check(q, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, q_pos, limit)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    for name, t in (("q", q), ("k_q", k_q), ("v_q", v_q), ("fp_k", fp_k), ("fp_v", fp_v), ("k_scale", k_scale), ("v_scale", v_scale), ("slot_pos", slot_pos), ("fp_pos", fp_pos)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode_attention_kvq: the last dimension of {name} must be contiguous")
    if k_scale.stride() != v_scale.stride():
        raise ValueError("decode_attention_kvq: k_scale and v_scale must have the same strides")
    cfg = _launch_config(q, B, Hkv, C)
    BLOCK_N = block_n or cfg["BLOCK_N"]
    n_splits = splits or cfg["splits"]
    per_split = triton.cdiv(triton.cdiv(C, n_splits), BLOCK_N) * BLOCK_N
    n_splits = triton.cdiv(C, per_split)
    group = Hq // Hkv
    BLOCK_G = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    BLOCK_D = max(16, triton.next_power_of_2(D))
    dev = q.device
    rows = B * Hq * (n_splits + 1)
    o_part = torch.empty(rows * D, device=dev, dtype=torch.float32)
    m_part = torch.empty(rows, device=dev, dtype=torch.float32)
    l_part = torch.empty(rows, device=dev, dtype=torch.float32)
    out = torch.empty((B, Hq, D), device=dev, dtype=q.dtype)
    _kvq_split_kernel[(B * Hkv, n_splits + 1)](
        q, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, q_pos.to(torch.int64).contiguous(), limit.to(torch.int64).contiguous(),
        o_part, m_part, l_part,
        scale * LOG2E, int(n_sink),
        q.stride(0), q.stride(1),
        k_q.stride(0), k_q.stride(1), k_q.stride(2),
        v_q.stride(0), v_q.stride(1), v_q.stride(2),
        k_scale.stride(0), k_scale.stride(1),
        slot_pos.stride(0), slot_pos.stride(1),
        fp_k.stride(0), fp_k.stride(1), fp_k.stride(2),
        fp_v.stride(0), fp_v.stride(1), fp_v.stride(2),
        fp_pos.stride(0), fp_pos.stride(1),
        C, F, Hkv, n_splits, per_split,
        GROUP=group, BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, D=D, BLOCK_D=BLOCK_D,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    _decode_combine_kernel[(B * Hkv,)](
        o_part, m_part, l_part, dummy, dummy, out,
        out.stride(0), out.stride(1),
        Hkv, n_splits + 1,
        GROUP=group, BLOCK_G=BLOCK_G, BLOCK_S=max(2, triton.next_power_of_2(n_splits + 1)), D=D, BLOCK_D=BLOCK_D,
        TRACK=False, num_warps=4,
    )
    return out


def decode_attention_kvq_ref(q, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, q_pos, limit, *, n_sink: int, scale: float | None = None):
    """The definition in float32 PyTorch: dequantize, apply the tier rule, softmax. Same
    arguments and result as decode_attention_kvq."""
    B, Hq, Hkv, C, F, D = _check(q, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, q_pos, limit)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lim = limit.view(B, 1, 1)
    qp = q_pos.view(B, 1, 1)
    main_vis = (slot_pos >= n_sink) & (slot_pos < lim) & (slot_pos <= qp)
    side_vis = (fp_pos >= 0) & ((fp_pos < n_sink) | (fp_pos >= lim)) & (fp_pos <= qp)
    keys = torch.cat([k_q.float() * k_scale[..., None], fp_k.float()], dim=2)
    vals = torch.cat([v_q.float() * v_scale[..., None], fp_v.float()], dim=2)
    visible = torch.cat([main_vis, side_vis], dim=2)
    group = Hq // Hkv
    logits = torch.einsum("bhgd,bhcd->bhgc", q.float().view(B, Hkv, group, D), keys) * scale
    probs = torch.softmax(logits.masked_fill(~visible[:, :, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgc,bhcd->bhgd", probs, vals).reshape(B, Hq, D).to(q.dtype)


def kvq_write_token(k, v, positions, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, *, n_sink: int) -> None:
    """Decode-step write of an int8 store in one launch (in place): k, v [B, Hkv, 1, D],
    positions [B, 1]. The definition is runtime/kv_quant_op.write_step (per-token int8 path);
    the one difference is rounding of exact .5 ties (away from zero here, to even there)."""
    B, Hkv, T, D = k.shape
    if T != 1 or k_q.dtype != torch.int8:
        raise ValueError(f"kvq_write_token: one int8 decode token per sequence; got T={T}, store dtype {k_q.dtype}")
    C, F = k_q.shape[2], fp_k.shape[2]
    for name, t in (("k", k), ("v", v), ("k_q", k_q), ("v_q", v_q), ("fp_k", fp_k), ("fp_v", fp_v)):
        if t.stride(-1) != 1:
            raise ValueError(f"kvq_write_token: the last dimension of {name} must be contiguous")
    if k_q.stride() != v_q.stride() or k_scale.stride() != v_scale.stride() or fp_k.stride() != fp_v.stride():
        raise ValueError("kvq_write_token: k and v buffers must share strides")
    pos = positions[:, 0].to(torch.int64).contiguous()
    _kvq_write_kernel[(B * Hkv,)](
        k, v, pos, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_q.stride(0), k_q.stride(1), k_q.stride(2), k_scale.stride(0), k_scale.stride(1),
        slot_pos.stride(0), slot_pos.stride(1),
        fp_k.stride(0), fp_k.stride(1), fp_k.stride(2), fp_pos.stride(0), fp_pos.stride(1),
        C, F - n_sink, Hkv, int(n_sink),
        D=D, BLOCK_D=triton.next_power_of_2(D), num_warps=1,
    )
