"""Weight-only int4 (asymmetric, group-wise) linear:
y = x @ W_hat.T + bias, W_hat[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G].

Triplet (DESIGN.md decision 5):

    _gemv_int4_kernel   (@triton.jit) M == 1: split-K GEMV over [BLOCK_N, groups, G/2] byte tiles
    _gemm_int4_kernel   (@triton.jit) M > 1:  small-batch GEMM, one group per K step, tl.dot
    gemv_int4(...)      host wrapper: checks, picks the launch, allocates, launches
    gemv_int4_ref(...)  plain PyTorch (unpack, dequantize, matmul), the definition

Shapes: x [..., K] float32/float16/bfloat16; qweight uint8 [N, K // 2] (byte j of a
row: k = 2j low nibble, k = 2j + 1 high nibble; passes/quantize/formats.py); scale,
offset float16 [N, K // G]; G in 32, 64, 128; bias [N] or None. Returns [..., N].

Why this layout and loop: with the nibbles of one byte adjacent in K, a row's bytes
are contiguous, so tiles load with wide coalesced accesses and no transposition.
Instead of interleaving the nibbles back, the kernel splits x into its even and odd
elements (low nibbles meet x[0::2], high ones x[1::2]). Per group g the sum is
    sum_k W_hat[n, k] x[k] = scale[n, g] * (q . x)_g + offset[n, g] * sum(x_g),
so the inner loop is a mask/shift, a convert and an fma per weight; the scales are
applied once per group, not per weight (the naive per-weight dequantize is what makes
simple int4 kernels slow).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimfx.codegen.kernels.weight_only import (X_DTYPES, even_splits, gemm_block_m, gemm_dot_precision, gemv_output,
                                                program_tile, rows_of, split_k_heuristic, store_gemv_rows)


@triton.jit
def _gemv_int4_kernel(
    X, QW, S, O, B, Y,
    N, K, NG, G_PER_SPLIT, stride_qn, stride_sn,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # One program: BLOCK_N rows x G_PER_SPLIT groups, BLOCK_G groups per step.
    GH: tl.constexpr = G // 2
    n, n_ok = program_tile(0, BLOCK_N, N)
    pid_k = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, GH)
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    g_start = pid_k * G_PER_SPLIT
    g_end = tl.minimum(g_start + G_PER_SPLIT, NG)
    for g0 in range(g_start, g_end, BLOCK_G):
        g = g0 + offs_g
        g_ok = g < g_end
        byte = g[:, None] * GH + offs_j[None, :]  # [BLOCK_G, GH] byte index within a row
        xe = tl.load(X + 2 * byte, mask=g_ok[:, None], other=0.0).to(tl.float32)
        xo = tl.load(X + 2 * byte + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
        w = tl.load(QW + n[:, None, None] * stride_qn + byte[None, :, :],
                    mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
        lo = (w & 0xF).to(tl.float32)
        hi = (w >> 4).to(tl.float32)
        dot = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BLOCK_N, BLOCK_G]
        xsum = tl.sum(xe + xo, axis=1)  # [BLOCK_G]
        sg_mask = n_ok[:, None] & g_ok[None, :]
        s = tl.load(S + n[:, None] * stride_sn + g[None, :], mask=sg_mask, other=0.0).to(tl.float32)
        o = tl.load(O + n[:, None] * stride_sn + g[None, :], mask=sg_mask, other=0.0).to(tl.float32)
        acc += s * dot + o * xsum[None, :]
    store_gemv_rows(Y, B, tl.sum(acc, axis=1), n, n_ok, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _gemm_int4_kernel(
    X, QW, S, O, B, Y,
    M, N, NG, stride_xm, stride_qn, stride_sn, stride_ym,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    GH: tl.constexpr = G // 2
    m, m_ok = program_tile(0, BLOCK_M, M)
    n, n_ok = program_tile(1, BLOCK_N, N)
    offs_j = tl.arange(0, GH)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, NG):
        byte = g * GH + offs_j
        x_rows = X + m[:, None] * stride_xm + 2 * byte[None, :]
        xe = tl.load(x_rows, mask=m_ok[:, None], other=0.0)
        xo = tl.load(x_rows + 1, mask=m_ok[:, None], other=0.0)
        w = tl.load(QW + n[None, :] * stride_qn + byte[:, None], mask=n_ok[None, :], other=0)  # [GH, BLOCK_N]
        lo = (w & 0xF).to(xe.dtype)  # codes 0..15 are exact in every float dtype
        hi = (w >> 4).to(xe.dtype)
        d = tl.dot(xe, lo, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        d = tl.dot(xo, hi, d, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        xsum = tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1)  # [BLOCK_M]
        s = tl.load(S + n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        o = tl.load(O + n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += d * s[None, :] + xsum[:, None] * o[None, :]
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- host side

GROUP_SIZES = (32, 64, 128)


def _check(x, qweight, scale, offset, group_size, bias) -> tuple[int, int, int]:
    if x.dtype not in X_DTYPES:
        raise ValueError(f"gemv_int4: x must be float32/float16/bfloat16, got {x.dtype}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"gemv_int4: group_size {group_size}; allowed: {', '.join(map(str, GROUP_SIZES))}")
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(f"gemv_int4: qweight must be uint8 [N, K // 2], got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[-1] != K:
        raise ValueError(f"gemv_int4: x's last dimension {x.shape[-1]} != in_features {K} (2 x qweight's {qweight.shape[1]} bytes)")
    if K % group_size:
        raise ValueError(f"gemv_int4: in_features {K} is not a multiple of group_size {group_size}")
    NG = K // group_size
    for name, t in (("scale", scale), ("offset", offset)):
        if tuple(t.shape) != (N, NG) or t.dtype not in X_DTYPES:
            raise ValueError(f"gemv_int4: {name} must be float [N, K // G] = {(N, NG)}, got {t.dtype} {tuple(t.shape)}")
    if scale.stride() != offset.stride():
        raise ValueError("gemv_int4: scale and offset must have the same strides")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"gemv_int4: bias must be [{N}], got {tuple(bias.shape)}")
    return N, K, NG


def _gemv_config(x: torch.Tensor, N: int, NG: int, G: int) -> dict:
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        # From the H100 sweep (benchmarks/sweep_quant_gemv.py, results/quant_gemv_sweep2_h100.log).
        block_n = 8
        block_g = max(1, 512 // G)  # 512 weights (256 bytes) of a row per step
        split = split_k_heuristic(triton.cdiv(N, block_n), triton.cdiv(NG, block_g), sms)
        return {"BLOCK_N": block_n, "BLOCK_G": block_g, "split_k": split, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 8, "BLOCK_G": 2, "split_k": 2 if NG > 2 else 1, "num_warps": 1, "num_stages": 1}


def gemv_int4(x, qweight, scale, offset, group_size: int, bias=None, *, split_k: int | None = None,
              block_n: int | None = None, block_g: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None):
    """y [..., N] = x [..., K] @ W_hat.T + bias, in x's dtype (module doc)."""
    N, K, NG = _check(x, qweight, scale, offset, group_size, bias)
    x2 = rows_of(x, K)
    if qweight.stride(-1) != 1 or scale.stride(-1) != 1:
        raise ValueError("gemv_int4: qweight, scale and offset must be contiguous along their last dimension")
    M = x2.shape[0]
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale
    if M == 1:
        y = _launch_gemv(x2, qweight, scale, offset, bias_arg, has_bias, group_size, N, NG, split_k, block_n, block_g, num_warps, num_stages)
    else:
        y = _launch_gemm(x2, qweight, scale, offset, bias_arg, has_bias, group_size, M, N, NG, block_n, num_warps)
    return y.view(*x.shape[:-1], N)


def _launch_gemv(x2, qweight, scale, offset, bias_arg, has_bias, G, N, NG, split_k, block_n, block_g, num_warps, num_stages=None):
    cfg = _gemv_config(x2, N, NG, G)
    BLOCK_N, BLOCK_G = block_n or cfg["BLOCK_N"], block_g or cfg["BLOCK_G"]
    splits = split_k or cfg["split_k"]
    per_split, splits = even_splits(NG, splits, BLOCK_G)  # groups per split
    y = gemv_output(x2, N, splits)
    _gemv_int4_kernel[(triton.cdiv(N, BLOCK_N), splits)](
        x2, qweight, scale, offset, bias_arg, y,
        N, NG * G, NG, per_split, qweight.stride(0), scale.stride(0),
        G=G, HAS_BIAS=has_bias, SPLIT_K=splits, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return y.to(x2.dtype)  # split-K summed in fp32


def _launch_gemm(x2, qweight, scale, offset, bias_arg, has_bias, G, M, N, NG, block_n, num_warps):
    BLOCK_M = gemm_block_m(M)
    BLOCK_N = block_n or (64 if x2.is_cuda else 16)
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    _gemm_int4_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        x2, qweight, scale, offset, bias_arg, y,
        M, N, NG, x2.stride(0), qweight.stride(0), scale.stride(0), y.stride(0),
        G=G, HAS_BIAS=has_bias, DOT_PRECISION=gemm_dot_precision(x2), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        num_warps=num_warps or (4 if x2.is_cuda else 1),
    )
    return y


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 codes [N, K] (inverse of the packing in
    passes/quantize/formats.py's quantize_int4: low nibble k = 2j, high nibble k = 2j + 1)."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).view(packed.shape[0], packed.shape[1] * 2)


def dequantize_int4(qweight, scale, offset, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """Packed int4 (module doc) -> W_hat [N, K]."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    qg = q.view(n, k // group_size, group_size)
    w = qg * scale.float()[..., None] + offset.float()[..., None]
    return w.view(n, k).to(dtype)


def gemv_int4_ref(x, qweight, scale, offset, group_size: int, bias=None):
    """The definition: unpack, dequantize to float32, matmul, cast to x's dtype."""
    _check(x, qweight, scale, offset, group_size, bias)
    w = dequantize_int4(qweight, scale, offset, group_size, torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
