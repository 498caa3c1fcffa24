"""What the weight-only linears (gemv_int8.py, gemv_int4.py) share: program tiles, the
split-K store of a GEMV's rows, and the host side around the launches (rows of x, the
split-K output, the GEMM's row block and dot precision).

Both GEMVs split K across programs when N / BLOCK_N programs cannot fill the GPU; the
splits atomically add fp32 partials into a zeroed output, which is cast back to x's
dtype after the launch. Without a split the kernel stores x's dtype directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def program_tile(axis: tl.constexpr, BLOCK: tl.constexpr, size):
    """This program's BLOCK indices along grid `axis`, and which of them are below `size`."""
    idx = tl.program_id(axis) * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < size


@triton.jit
def store_gemv_rows(Y, B, y, n, n_ok, pid_k, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Y[n] = y (+ B[n]): the bias is added by the first K split only, and split partials
    are summed with atomics (fp32 Y) instead of stored."""
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(Y + n, y.to(Y.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(Y + n, y, mask=n_ok)


# ----------------------------------------------------------------------------- host side


def split_k_heuristic(n_blocks: int, step_blocks: int, sm_count: int) -> int:
    """K splits so that about 2 programs run per SM; 1 when the N blocks already fill the GPU."""
    if n_blocks >= 2 * sm_count:
        return 1
    return max(1, min(triton.cdiv(2 * sm_count, n_blocks), step_blocks, 16))


def even_splits(total: int, splits: int, block: int) -> tuple[int, int]:
    """(per_split, splits): `total` steps cut into at most `splits` ranges of whole blocks."""
    per_split = triton.cdiv(triton.cdiv(total, splits), block) * block
    return per_split, triton.cdiv(total, per_split)


def rows_of(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] -> [M, K] with a unit stride along K, as the kernels read it."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def gemv_output(x2: torch.Tensor, n: int, splits: int) -> torch.Tensor:
    """Y [1, N]: x's dtype for one split, a zeroed fp32 sum for the atomics of several."""
    if splits == 1:
        return torch.empty((1, n), device=x2.device, dtype=x2.dtype)
    return torch.zeros((1, n), device=x2.device, dtype=torch.float32)


def gemm_block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def gemm_dot_precision(x2: torch.Tensor) -> str:
    """float32 activations: exact fp32 dots (dequantized weights are exact in any float dtype)."""
    return "ieee" if x2.dtype == torch.float32 else "tf32"
