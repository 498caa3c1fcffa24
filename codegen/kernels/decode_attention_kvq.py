"""Decode attention over the two-tier quantized KV store of passes/kv_quantize/op.py, and
the fused decode-step write into it.

    decode_attention_kvq(...)         decode_attention with tier 0 = codes, tier 1 = the
                                      full-precision buffer, split by a window
    decode_attention_kvq_ref(...)     the same over decode_attention_ref, the definition
    _kvq_write_kernel / kvq_write_token   one launch per decode step writes both tiers

Shapes (one query token per sequence):

    q                [B, Hq, D]        queries (RoPE applied)
    k_q, v_q         [B, Hkv, C, D]    quantized tier, int8 or float8_e4m3fn
    k_scale, v_scale [B, Hkv, C] f32   per-token scales: x ~ q * scale
    slot_pos         [B, Hkv, C] int32 position per slot, -1 empty
    fp_k, fp_v       [B, Hkv, F, D]    full-precision tier (sinks + recent ring), q's dtype
    fp_pos           [B, Hkv, F] int32
    q_pos, limit     [B] int           the query's position; the first position read from
                                       the full-precision tier (passes/kv_quantize/op.qlimit)
    n_sink           int               positions below it are read from the full-precision tier

A quantized slot is visible iff n_sink <= pos < limit and 0 <= pos <= q_pos; a
full-precision slot iff pos >= 0, (pos < n_sink or pos >= limit) and pos <= q_pos.
Returns [B, Hq, D]. The attention itself is codegen/kernels/decode_attention.py's split
kernel (its dequantising load, second tier and window): one loop serves every store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimfx.codegen.kernels.decode_attention import decode_attention, decode_attention_ref


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


def decode_attention_kvq(q, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, q_pos, limit, *, n_sink: int, scale: float | None = None, splits: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Decode attention over both tiers (module doc). Returns out [B, Hq, D] in q's dtype."""
    return decode_attention(
        q, k_q, v_q, slot_pos, q_pos, scale=scale, k_scale=k_scale, v_scale=v_scale,
        second=(fp_k, fp_v, fp_pos), window=(n_sink, limit),
        splits=splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
    )


def decode_attention_kvq_ref(q, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, q_pos, limit, *, n_sink: int, scale: float | None = None):
    """The definition in float32 PyTorch (decode_attention_ref with the same tiers and window).
    Same arguments and result as decode_attention_kvq."""
    return decode_attention_ref(q, k_q, v_q, slot_pos, q_pos, scale=scale, k_scale=k_scale, v_scale=v_scale, second=(fp_k, fp_v, fp_pos), window=(n_sink, limit))


def kvq_write_token(k, v, positions, k_q, v_q, k_scale, v_scale, slot_pos, fp_k, fp_v, fp_pos, *, n_sink: int) -> None:
    """Decode-step write of an int8 store in one launch (in place): k, v [B, Hkv, 1, D],
    positions [B, 1]. The definition is passes/kv_quantize/op.write_step (per-token int8 path);
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
