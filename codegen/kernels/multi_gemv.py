"""Sibling matmuls in one launch: C_i = A @ B_i for up to three B_i sharing A.

The decode step's Q, K and V projections read the same normalized hidden state. As
three GEMVs they are three launches, and the K and V ones (Llama-3.2-1B: 512 x 2048)
are too small to keep the GPU's memory system busy. Here one grid covers the output
columns of all of them: program (m, t) computes BLOCK_N columns of row m of whichever
B_i tile t falls in. Nothing is copied or concatenated, so the weights stay the
user's tensors (no second copy of the QKV weights).

    multi_matmul(a, bs, outs, config=None)   a [M, K]; bs[i] [K, N_i]; outs[i] [M, N_i]

Small M (decode, M <= autotune.GEMV_MAX_M) runs the fused GEMV kernel below; larger M
(prefill) runs one torch.mm per operand, where the library's GEMM is the fast path.
Products accumulate in fp32 and are rounded once to the output dtype, as eager's mm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimfx.codegen.autotune import GEMV_MAX_M, TUNER
from slimfx.codegen.kernels.matmul_template import gemv_partial

MAX_OPERANDS = 3


@triton.jit
def _gemv_tile(a_row, stride_ak, b, stride_bk, stride_bn, out_row, tile, N, K,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N read column 0 (no mask in the loop); they are not stored.
    acc = gemv_partial(a_row, stride_ak, b + (rn % N)[None, :] * stride_bn, stride_bk, 0, K, BLOCK_N, BLOCK_K, EVEN_K)
    tl.store(out_row + rn, acc.to(out_row.dtype.element_ty), mask=rn < N)


@triton.jit
def _multi_gemv_kernel(
    a, b0, b1, b2, o0, o1, o2,
    N0, N1, N2, T0, T1, K,
    stride_am, stride_ak,
    sb0k, sb0n, sb1k, sb1n, sb2k, sb2n, so0, so1, so2,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    m = tl.program_id(0)
    t = tl.program_id(1)
    a_row = a + m * stride_am
    if t < T0:
        _gemv_tile(a_row, stride_ak, b0, sb0k, sb0n, o0 + m * so0, t, N0, K, BLOCK_N, BLOCK_K, EVEN_K)
    elif t < T0 + T1:
        _gemv_tile(a_row, stride_ak, b1, sb1k, sb1n, o1 + m * so1, t - T0, N1, K, BLOCK_N, BLOCK_K, EVEN_K)
    else:
        _gemv_tile(a_row, stride_ak, b2, sb2k, sb2n, o2 + m * so2, t - T0 - T1, N2, K, BLOCK_N, BLOCK_K, EVEN_K)


def _check(a, bs, outs) -> None:
    if not 2 <= len(bs) <= MAX_OPERANDS or len(outs) != len(bs):
        raise ValueError(f"multi_matmul: 2 to {MAX_OPERANDS} operands with one output each; got {len(bs)} and {len(outs)}")
    m, k = a.shape
    for b, out in zip(bs, outs):
        if b.dim() != 2 or b.shape[0] != k or out.shape != (m, b.shape[1]) or out.stride(1) != 1:
            raise ValueError(f"multi_matmul: a {tuple(a.shape)} needs b [K={k}, N] and a row-major out [M={m}, N]; "
                             f"got b {tuple(b.shape)}, out {tuple(out.shape)} strides {out.stride()}")


def _launch(a, bs, outs, cfg: dict) -> None:
    m, k = a.shape
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    padded_b, padded_o = list(bs) + [bs[-1]] * (MAX_OPERANDS - len(bs)), list(outs) + [outs[-1]] * (MAX_OPERANDS - len(outs))
    sizes = [b.shape[1] for b in bs] + [0] * (MAX_OPERANDS - len(bs))
    tiles = [triton.cdiv(n, block_n) for n in sizes]
    _multi_gemv_kernel[(m, sum(tiles))](
        a, *padded_b, *padded_o,
        *sizes, tiles[0], tiles[1], k,
        a.stride(0), a.stride(1),
        *(s for b in padded_b for s in (b.stride(0), b.stride(1))), *(o.stride(0) for o in padded_o),
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def multi_matmul(a, bs, outs, *, kernel_hash: str = "multi_gemv", config: dict | None = None) -> None:
    """outs[i] = a @ bs[i] (module doc); `config` (of autotune's "multi_gemv" space) skips tuning."""
    _check(a, bs, outs)
    m, k = a.shape
    if m == 0:
        return
    if m > GEMV_MAX_M:
        for b, out in zip(bs, outs):
            torch.mm(a, b, out=out)
        return

    def launch(cfg):
        _launch(a, bs, outs, cfg)

    if config is not None:
        launch(config)
        return
    n_total = sum(b.shape[1] for b in bs)
    dtype = str(a.dtype).replace("torch.", "")
    TUNER.launch(kernel_hash, "multi_gemv", (m, n_total, k), dtype, a.device, launch)


def multi_matmul_ref(a, bs):
    return [torch.mm(a, b) for b in bs]
