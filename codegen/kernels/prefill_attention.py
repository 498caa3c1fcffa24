"""Prefill attention: many query tokens against keys that carry explicit positions.

Triplet (DESIGN.md decision 5):

    _prefill_kernel          (@triton.jit) flash-attention forward, position-masked
    prefill_attention(...)   host wrapper
    prefill_attention_ref()  plain PyTorch, the definition

Shapes:

    q      [B, Hq, T, D]     the chunk's queries (RoPE applied with true positions)
    q_pos  [B, T] int        query positions; < 0 marks a padding query (output 0)
    k, v   [B, Hkv, N, D]    keys/values: the store's slots
    k_pos  [B, Hkv, N] int   key positions; < 0 marks an empty slot or a padding token
    extra  optional (k2, v2 [B, Hkv, N2, D], k2_pos [B, N2]): the chunk's own keys,
           attended after the store's where they are (no concatenated copy)

A key is visible to a query iff 0 <= k_pos <= q_pos, and with a sliding `window` W
also k_pos > q_pos - W (the W most recent positions, the query's own included, as HF's
sliding-window layers read). The mask is made from positions, not from slot order, so
causality, left padding and empty or evicted slots all come out of one rule and no mask
tensor is materialised.
returns out [B, Hq, T, D] in q's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from slimfx.codegen.kernels import dot_precision

LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _attend_keys(q, qpos, q_last, m_i, l_i, acc, k_base, v_base, p_base, stride_kn, stride_vn, N,
                 offs_n, offs_d, d_ok, window, BLOCK_N: tl.constexpr, WINDOWED: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with the N keys at k_base / v_base whose
    positions are at p_base (a key is visible to a query iff 0 <= k_pos <= q_pos)."""
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < N
        kpos = tl.load(p_base + n, mask=n_ok, other=-1)
        # Skip key blocks no query of this block can see (empty slots, keys after the
        # block's last query): during a chunked prefill most of the store is one or the other.
        if tl.sum(((kpos >= 0) & (kpos <= q_last)).to(tl.int32), axis=0) > 0:
            k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION, out_dtype=tl.float32)
            visible = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
            if WINDOWED:
                visible = visible & (kpos[None, :] > qpos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION, out_dtype=tl.float32)
            m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(
    Q, K, V, QPOS, KPOS, K2, V2, KPOS2, OUT,
    qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_k2b, stride_k2h, stride_k2n,
    stride_v2b, stride_v2h, stride_v2n,
    stride_ob, stride_oh, stride_ot,
    stride_qpb, stride_kpb, stride_kph, stride_kp2b, stride_kp2h,
    T, N, N2, HQ, window,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOWED: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hkv = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(K.dtype.element_ty)
    qpos = tl.load(QPOS + b * stride_qpb + offs_m, mask=m_ok, other=-1)
    q_last = tl.max(qpos, axis=0)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The store's keys, then (N2 > 0) the chunk's own keys, read where they are: no copy
    # of the store is made to append the chunk.
    m_i, l_i, acc = _attend_keys(q, qpos, q_last, m_i, l_i, acc,
                                 K + b * stride_kb + hkv * stride_kh, V + b * stride_vb + hkv * stride_vh,
                                 KPOS + b * stride_kpb + hkv * stride_kph, stride_kn, stride_vn, N,
                                 offs_n, offs_d, d_ok, window, BLOCK_N, WINDOWED, PRECISION)
    m_i, l_i, acc = _attend_keys(q, qpos, q_last, m_i, l_i, acc,
                                 K2 + b * stride_k2b + hkv * stride_k2h, V2 + b * stride_v2b + hkv * stride_v2h,
                                 KPOS2 + b * stride_kp2b + hkv * stride_kp2h, stride_k2n, stride_v2n, N2,
                                 offs_n, offs_d, d_ok, window, BLOCK_N, WINDOWED, PRECISION)
    out = acc * tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)[:, None]
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _check(q, q_pos, k, v, k_pos):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"prefill_attention: q must be [B, Hq, T, D] and k, v [B, Hkv, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    Bk, Hkv, N, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"prefill_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if Hq % Hkv:
        raise ValueError(f"prefill_attention: Hq={Hq} is not a multiple of Hkv={Hkv}; allowed: MHA, GQA or MQA head counts")
    if tuple(q_pos.shape) != (B, T):
        raise ValueError(f"prefill_attention: q_pos must be [B, T] = {(B, T)}, got {tuple(q_pos.shape)}")
    if tuple(k_pos.shape) != (B, Hkv, N):
        raise ValueError(f"prefill_attention: k_pos must be [B, Hkv, N] = {(B, Hkv, N)}, got {tuple(k_pos.shape)}")
    return B, Hq, Hkv, T, N, D


def _extra_keys(q, k, v, k_pos, extra):
    """The chunk's own keys (k2, v2, k2_pos) checked against the store's, or an empty set."""
    if extra is None:
        return k[:, :, :0], v[:, :, :0], k_pos[:, :, :0], (0, 0)
    k2, v2, k2_pos = extra
    B, Hkv, _, D = k.shape
    if k2.dim() != 4 or k2.shape[:2] != (B, Hkv) or k2.shape[3] != D or v2.shape != k2.shape:
        raise ValueError(f"prefill_attention: extra keys must be [B, Hkv, N2, D] = [{B}, {Hkv}, N2, {D}]; got {tuple(k2.shape)}, {tuple(v2.shape)}")
    if k2_pos.dim() != 2 or tuple(k2_pos.shape) != (B, k2.shape[2]):
        raise ValueError(f"prefill_attention: extra key positions must be [B, N2] = {(B, k2.shape[2])}, got {tuple(k2_pos.shape)}")
    if k2.stride(-1) != 1 or v2.stride(-1) != 1:
        raise ValueError("prefill_attention: the last (head_dim) dimension of the extra keys must be contiguous")
    k2_pos = k2_pos.to(torch.int64).contiguous()
    return k2, v2, k2_pos, (k2_pos.stride(0), 0)  # one position row per sequence, shared by its heads


def _check_window(window) -> int:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"prefill_attention: window {window!r}; allowed: None or an integer >= 1")
    return window or 0


def prefill_attention(q, q_pos, k, v, k_pos, *, extra=None, scale: float | None = None, window: int | None = None,
                      block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Position-masked attention of a chunk of queries (see module doc). Returns [B, Hq, T, D].

    extra: optional (k2 [B, Hkv, N2, D], v2, k2_pos [B, N2]): more keys, attended after
    k, v (the chunk's own keys, so the store need not be copied to append them).
    window: a sliding window of that many positions, or None."""
    B, Hq, Hkv, T, N, D = _check(q, q_pos, k, v, k_pos)
    window = _check_window(window)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("prefill_attention: the last (head_dim) dimension of q, k and v must be contiguous")
    q_pos = q_pos.to(torch.int64).contiguous()
    k_pos = k_pos.to(torch.int64).contiguous()
    k2, v2, k2_pos, k2_pos_strides = _extra_keys(q, k, v, k_pos, extra)
    if q.is_cuda:
        # H100, Llama-3.2-1B heads (D = 64), 512-query chunk over 4K-8K keys
        # (benchmarks/sweep_prefill_attention.py): 64 x 128 tiles are 15-18% faster than
        # 64 x 64. Wider heads keep 64-key blocks (shared memory per stage doubles).
        BLOCK_M, BLOCK_N, warps, stages = block_m or 64, block_n or (128 if D <= 64 else 64), num_warps or 4, num_stages or 2
    else:  # interpreter: small tiles
        BLOCK_M, BLOCK_N, warps, stages = block_m or 16, block_n or 16, num_warps or 4, num_stages or 1
    BLOCK_D = max(16, triton.next_power_of_2(D))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    grid = (triton.cdiv(T, BLOCK_M), B * Hq)
    _prefill_kernel[grid](
        q, k, v, q_pos, k_pos, k2, v2, k2_pos, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k2.stride(0), k2.stride(1), k2.stride(2),
        v2.stride(0), v2.stride(1), v2.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_pos.stride(0), k_pos.stride(0), k_pos.stride(1), *k2_pos_strides,
        T, N, k2.shape[2], Hq, window,
        GROUP=Hq // Hkv, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D, BLOCK_D=BLOCK_D, WINDOWED=window > 0,
        PRECISION=dot_precision(q),
        num_warps=warps, num_stages=stages,
    )
    return out


def prefill_attention_ref(q, q_pos, k, v, k_pos, *, extra=None, scale: float | None = None, window: int | None = None):
    """The definition in float32 PyTorch; same arguments and result as prefill_attention."""
    window = _check_window(window)
    if extra is not None:  # extra keys are keys appended after the store's
        k2, v2, k2_pos = extra
        _extra_keys(q, k, v, k_pos, extra)
        B, Hkv, N2 = k2.shape[0], k2.shape[1], k2.shape[2]
        k = torch.cat([k, k2.to(k.dtype)], dim=2)
        v = torch.cat([v, v2.to(v.dtype)], dim=2)
        k_pos = torch.cat([k_pos.to(torch.int64), k2_pos.to(torch.int64)[:, None, :].expand(B, Hkv, N2)], dim=2)
    B, Hq, Hkv, T, N, D = _check(q, q_pos, k, v, k_pos)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    group = Hq // Hkv
    qf = q.float().view(B, Hkv, group, T, D)
    logits = torch.einsum("bhgtd,bhnd->bhgtn", qf, k.float()) * scale
    qp = q_pos.view(B, 1, 1, T, 1)
    kp = k_pos.view(B, Hkv, 1, 1, N)
    visible = (kp >= 0) & (kp <= qp)
    if window:
        visible = visible & (kp > qp - window)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgtn,bhnd->bhgtd", probs, v.float()).reshape(B, Hq, T, D)
    return out.to(q.dtype)
