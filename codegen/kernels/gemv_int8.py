"""Weight-only int8 (or fp8 e4m3) linear: y = x @ (q * scale[:, None]).T + bias.

Triplet (DESIGN.md decision 5):

    _gemv_int8_kernel   (@triton.jit) M == 1: split-K GEMV, no tensor cores
    _gemm_int8_kernel   (@triton.jit) M > 1:  small-batch GEMM, tl.dot on the int8 tile
                                              converted to x's dtype (exact: |q| <= 127)
    gemv_int8(...)      host wrapper: checks, picks the launch, allocates, launches
    gemv_int8_ref(...)  plain PyTorch (dequantize + matmul), the definition

Shapes: x [..., K] (float32/float16/bfloat16); qweight [N, K] int8 (or float8_e4m3fn
on a GPU that converts it); scale [N] float32; bias [N] or None. Returns [..., N] in
x's dtype.

Why this shape of kernel: at batch 1 a linear reads each weight byte once and does
two flops with it, so time = weight bytes / bandwidth; int8 halves the bytes of
bf16. The per-channel scale factors out of the K sum, so the inner loop is a
convert + fma per weight and the scale is applied once per output. When N / BLOCK_N
programs cannot fill the GPU (k/v projections of small models: N = 512), the K axis
is split across programs that atomically add fp32 partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimfx.codegen.kernels.weight_only import (X_DTYPES, even_splits, gemm_block_m, gemm_dot_precision, gemv_output,
                                                program_tile, rows_of, split_k_heuristic, store_gemv_rows)


@triton.jit
def _gemv_int8_kernel(
    X, W, S, B, Y,
    N, K, K_PER_SPLIT, stride_wn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n, n_ok = program_tile(0, BLOCK_N, N)
    pid_k = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    # Accumulate [BLOCK_N, BLOCK_K] and reduce once at the end: one fma per weight in the loop.
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    w_rows = W + n[:, None] * stride_wn
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            x = tl.load(X + k)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = k < k_end
            x = tl.load(X + k, mask=k_ok, other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1) * tl.load(S + n, mask=n_ok, other=0.0)
    store_gemv_rows(Y, B, y, n, n_ok, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _gemm_int8_kernel(
    X, W, S, B, Y,
    M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m, m_ok = program_tile(0, BLOCK_M, M)
    n, n_ok = program_tile(1, BLOCK_N, N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + n[None, :] * stride_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION, out_dtype=tl.float32)
    acc = acc * tl.load(S + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- host side


def _weight_dtypes() -> tuple:
    fp8 = getattr(torch, "float8_e4m3fn", None)
    return (torch.int8,) + ((fp8,) if fp8 is not None else ())


def _check(x, qweight, scale, bias) -> tuple[int, int]:
    if x.dtype not in X_DTYPES:
        raise ValueError(f"gemv_int8: x must be float32/float16/bfloat16, got {x.dtype}")
    if qweight.dim() != 2 or qweight.dtype not in _weight_dtypes():
        raise ValueError(f"gemv_int8: qweight must be int8 or float8_e4m3fn [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    N, K = qweight.shape
    if x.shape[-1] != K:
        raise ValueError(f"gemv_int8: x's last dimension {x.shape[-1]} != in_features {K} of qweight {tuple(qweight.shape)}")
    if tuple(scale.shape) != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"gemv_int8: scale must be float32 [{N}], got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"gemv_int8: bias must be [{N}], got {tuple(bias.shape)}")
    return N, K


def _gemv_config(x: torch.Tensor, N: int, K: int) -> dict:
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        # The H100 sweep's best at 28672x4096 and 8192x2048 (benchmarks/sweep_quant_gemv.py,
        # results/quant_gemv_sweep2_h100.log; at 4096x4096 and 2048x2048 the best differs only in
        # stages or K tile). Narrow row blocks give enough programs to fill the GPU without
        # split-K, whose atomics need a zero fill and a cast kernel.
        block_n, block_k = 4, 1024
        split = split_k_heuristic(triton.cdiv(N, block_n), triton.cdiv(K, block_k), sms)
        return {"BLOCK_N": block_n, "BLOCK_K": block_k, "split_k": split, "num_warps": 4, "num_stages": 1}
    # Interpreter: small tiles; a split of 2 when K allows it so the atomic path is exercised.
    return {"BLOCK_N": 8, "BLOCK_K": 32, "split_k": 2 if K > 32 else 1, "num_warps": 1, "num_stages": 1}


def gemv_int8(x, qweight, scale, bias=None, *, split_k: int | None = None, block_n: int | None = None,
              block_k: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None):
    """y [..., N] = x [..., K] @ (qweight * scale[:, None]).T + bias, in x's dtype (module doc)."""
    N, K = _check(x, qweight, scale, bias)
    x2 = rows_of(x, K)
    if qweight.stride(-1) != 1:
        raise ValueError("gemv_int8: qweight's last (K) dimension must be contiguous")
    M = x2.shape[0]
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale
    if M == 1:
        y = _launch_gemv(x2, qweight, scale, bias_arg, has_bias, N, K, split_k, block_n, block_k, num_warps, num_stages)
    else:
        y = _launch_gemm(x2, qweight, scale, bias_arg, has_bias, M, N, K, block_n, block_k, num_warps)
    return y.view(*x.shape[:-1], N)


def _launch_gemv(x2, qweight, scale, bias_arg, has_bias, N, K, split_k, block_n, block_k, num_warps, num_stages=None):
    cfg = _gemv_config(x2, N, K)
    BLOCK_N, BLOCK_K = block_n or cfg["BLOCK_N"], block_k or cfg["BLOCK_K"]
    splits = split_k or cfg["split_k"]
    per_split, splits = even_splits(K, splits, BLOCK_K)
    even_k = K % per_split == 0
    y = gemv_output(x2, N, splits)
    _gemv_int8_kernel[(triton.cdiv(N, BLOCK_N), splits)](
        x2, qweight, scale, bias_arg, y,
        N, K, per_split, qweight.stride(0),
        HAS_BIAS=has_bias, SPLIT_K=splits, EVEN_K=even_k, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return y.to(x2.dtype)  # split-K summed in fp32


def _launch_gemm(x2, qweight, scale, bias_arg, has_bias, M, N, K, block_n, block_k, num_warps):
    BLOCK_M = gemm_block_m(M)
    if x2.is_cuda:
        BLOCK_N, BLOCK_K, warps = block_n or 64, block_k or 128, num_warps or 4
    else:
        BLOCK_N, BLOCK_K, warps = block_n or 16, block_k or 32, num_warps or 1
    y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    _gemm_int8_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        x2, qweight, scale, bias_arg, y,
        M, N, K, x2.stride(0), qweight.stride(0), y.stride(0),
        HAS_BIAS=has_bias, DOT_PRECISION=gemm_dot_precision(x2), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=warps,
    )
    return y


def gemv_int8_ref(x, qweight, scale, bias=None):
    """The definition: dequantize to float32, matmul, cast to x's dtype."""
    N, K = _check(x, qweight, scale, bias)
    w = qweight.float() * scale[:, None]
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
