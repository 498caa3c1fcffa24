"""GEMM / GEMV templates with a fused epilogue, and the launcher their generated modules call.

A matmul group (codegen/partition.py) is `C = A @ B` with A [M, K], B [K, N] (for a
linear, B = W.t() of the stored weight W [N, K]: a view with strides (1, K), so the
K axis of B is the contiguous one; the kernels take all four strides at run time, any
layout works) followed by an epilogue: the pointwise ops that read C (bias, SiLU,
GELU, residual add, cast, SiLU(gate) * up). codegen/matmul_gen.py renders, per group:

    <name>_epilogue(acc, r, c, M, N, ...)     @triton.jit helper: loads the epilogue's
                                             inputs at rows r / columns c, computes,
                                             stores every output once
    <name>_gemv_kernel   (@triton.jit)  small M: one program per row and BLOCK_N columns;
                                        [BLOCK_K, BLOCK_N] fp32 partial products, summed
                                        over K once after the loop (no tensor cores: at
                                        decode a GEMV is a weight read, 2 flops per weight)
    <name>_dot_kernel    (@triton.jit)  tiled GEMM with tl.dot, any M (BLOCK_M >= 16)
    <name>_epilogue_kernel (@triton.jit) the epilogue alone over a finished product: for
                                        the library path (torch.mm, then this) and to sum
                                        split-K partials
    <name>(...)                          host wrapper -> run_matmul below
    reference: CompiledGroup.reference, the group's own ATen nodes

Split-K: with SPLIT_K > 1 each program sums one K range and stores fp32 partials to a
[SPLIT_K, M, N] workspace; the epilogue kernel adds them and runs the epilogue. Plain
stores, no atomics, so a launch can be repeated (the autotuner re-runs configs).

Numerics: products accumulate in fp32 (tl.dot with input_precision "ieee" for fp32
unless torch allows TF32, as cuBLAS); the product is rounded to the matmul's dtype
before the epilogue reads it, as eager rounds mm's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slimfx.codegen.kernels import dot_precision
from slimfx.codegen.autotune import GEMM_DOT, GEMM_GEMV, GEMM_LIBRARY, TUNER, next_pow2

TEMPLATE_VERSION = 2  # part of every kernel hash: bump when the skeletons below change

EPILOGUE = '''
@triton.jit
def {name}_epilogue(acc, r, c, M, N, {params}):
    rmask = r < M
    cmask = c < N
    mask = rmask & cmask
{body}
'''

# Lines the GEMV and the tl.dot kernel share, filled into their {holes} first: the
# split-K arguments, the program ids, this program's K range, and the end (the epilogue
# when one program covers all of K, else a store of its fp32 partials).
SHARED_LINES = {
    "split_k_args": "ws, M, N, K, K_PER_SPLIT, stride_am, stride_ak, stride_bk, stride_bn",
    "program_ids": '''\
    pid_m = tl.program_id(0){cast}
    pid_n = tl.program_id(1){cast}
    pid_k = tl.program_id(2)''',
    "k_range": '''\
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)''',
    "epilogue_or_partials": '''\
    if SPLIT_K == 1:
        {name}_epilogue(acc, r, c, M, N, {params})
    else:
        tl.store(ws + (pid_k * M + r) * N + c, acc, mask=(r < M) & (c < N))''',
}

GEMV_KERNEL = '''
@triton.jit
def {name}_gemv_kernel({params}, {split_k_args},
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
{program_ids}
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_row = {A} + pid_m * stride_am
    # Columns past N read column 0 (no mask in the loop); their results are not stored.
    b_cols = {B} + (rn % N)[None, :] * stride_bn
{k_range}
    acc = gemv_partial(a_row, stride_ak, b_cols, stride_bk, k_start, k_end, BLOCK_N, BLOCK_K, EVEN_K)[None, :]
    r = pid_m + tl.zeros((1, 1), dtype=tl.int32)
    c = rn[None, :]
{epilogue_or_partials}
'''

DOT_KERNEL = '''
@triton.jit
def {name}_dot_kernel({params}, {split_k_args},
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
{program_ids}
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge read row/column 0: loads need a mask only along K.
    a_rows = {A} + (rm % M)[:, None] * stride_am
    b_cols = {B} + (rn % N)[None, :] * stride_bn
{k_range}
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            a = tl.load(a_rows + k[None, :] * stride_ak)
            b = tl.load(b_cols + k[:, None] * stride_bk)
        else:
            a = tl.load(a_rows + k[None, :] * stride_ak, mask=k[None, :] < k_end, other=0.0)
            b = tl.load(b_cols + k[:, None] * stride_bk, mask=k[:, None] < k_end, other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong; bf16 -> fp32 is exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    r = rm[:, None]
    c = rn[None, :]
{epilogue_or_partials}
'''

EPILOGUE_KERNEL = '''
@triton.jit
def {name}_epilogue_kernel({params}, acc_ptr, M, N,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    r = (tl.program_id(0){cast} * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    c = (tl.program_id(1){cast} * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (r < M) & (c < N)
    acc = tl.load(acc_ptr + r * N + c, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(acc_ptr + (s * M + r) * N + c, mask=mask, other=0.0)
    {name}_epilogue(acc, r, c, M, N, {params})
'''


@triton.jit
def gemv_partial(a_row, stride_ak, b_cols, stride_bk, k_start, k_end,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 [BLOCK_N]: the sum over k in [k_start, k_end) of b_cols[k, :] * a_row[k].

    [BLOCK_K, BLOCK_N] partial products, reduced over K once after the loop (at decode a
    GEMV is a weight read with 2 flops per weight: no tensor cores). Called by the
    generated GEMV kernels (their modules import it) and by kernels/multi_gemv.py. Like
    the other fixed kernels it runs under the interpreter when TRITON_INTERPRET=1 was set
    before this module was imported (tests/conftest.py sets it on CPU)."""
    rk = tl.arange(0, BLOCK_K)
    part = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            x = tl.load(a_row + k * stride_ak)
            w = tl.load(b_cols + k[:, None] * stride_bk)
        else:
            x = tl.load(a_row + k * stride_ak, mask=k < k_end, other=0.0)
            w = tl.load(b_cols + k[:, None] * stride_bk, mask=k[:, None] < k_end, other=0.0)
        part += w.to(tl.float32) * x.to(tl.float32)[:, None]
    return tl.reduce(part, 0, tl.standard._sum_combine)


def render_kernels(name: str, params: list[str], a: str, b: str, body: list[str], *, int64: bool) -> str:
    """The four @triton.jit functions of one matmul group, as source text.

    params: the epilogue's pointer and size arguments (in0.., out0.., size symbols);
    a, b: which of them are the matmul's operands; body: the epilogue's lines (4-space
    indented, using acc [BM, BN] fp32 and index tensors r [BM, 1], c [1, BN]).
    """
    fields = {"name": name, "params": ", ".join(params), "A": a, "B": b, "cast": ".to(tl.int64)" if int64 else ""}
    shared = {hole: lines.format(**fields) for hole, lines in SHARED_LINES.items()}
    parts = [EPILOGUE.format(body="\n".join(body), **fields)]
    parts += [t.format(**fields, **shared) for t in (GEMV_KERNEL, DOT_KERNEL, EPILOGUE_KERNEL)]
    return "".join(parts).strip("\n")


# ----------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class MatmulKernels:
    """What a generated module hands to run_matmul."""

    kernel_hash: str
    dtype_key: str
    gemv: object
    dot: object
    epilogue: object
    has_epilogue: bool
    bias: int | None = None  # addmm: index of the bias in params (the epilogue function adds it)
    alpha: float = 1
    beta: float = 1


def _upcast_dot(a: torch.Tensor) -> bool:
    # Triton's CPU interpreter (3.9) returns garbage from a bf16 tl.dot (1e10 off on
    # 16x16 randn); fp32 is exact for bf16 values, so the CPU path upcasts. GPUs never do.
    return a.dtype == torch.bfloat16 and not a.is_cuda


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


def _run_epilogue(kernels: MatmulKernels, params: tuple, acc: torch.Tensor, m: int, n: int, split: int) -> None:
    block_m = min(next_pow2(m), 16)
    block_n = max(16, min(next_pow2(n), 2048 // block_m))
    grid = (_cdiv(m, block_m), _cdiv(n, block_n))
    kernels.epilogue[grid](*params, acc, m, n, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split, num_warps=4)


def _run_template(kernels: MatmulKernels, cfg: dict, a, b, params: tuple, m: int, n: int, k: int) -> None:
    split, block_k, block_n = cfg["SPLIT_K"], cfg["BLOCK_K"], cfg["BLOCK_N"]
    k_per_split = _cdiv(_cdiv(k, split), block_k) * block_k
    even_k = k % (block_k * split) == 0
    ws = torch.empty((split, m, n), dtype=torch.float32, device=a.device) if split > 1 else a
    common = (ws, m, n, k, k_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg["impl"] == GEMM_GEMV:
        grid = (m, _cdiv(n, block_n), split)
        kernels.gemv[grid](*params, *common, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, EVEN_K=even_k, **launch)
    else:
        block_m = cfg["BLOCK_M"]
        grid = (_cdiv(m, block_m), _cdiv(n, block_n), split)
        kernels.dot[grid](*params, *common, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                          EVEN_K=even_k, DOT_PRECISION=dot_precision(a), UPCAST=_upcast_dot(a), **launch)
    if split > 1:
        _run_epilogue(kernels, params, ws, m, n, split)


def launch_config(kernels: MatmulKernels, cfg: dict, a, b, params: tuple, mm_out) -> None:
    """Run the group once with `cfg` (a gemm config of autotune.gemm_space)."""
    m, k = a.shape
    n = b.shape[1]
    if cfg["impl"] == GEMM_LIBRARY:
        if kernels.has_epilogue:
            # The epilogue function adds addmm's bias too, so the library call is a plain mm.
            _run_epilogue(kernels, params, torch.mm(a, b), m, n, 1)
        elif kernels.bias is not None:  # the group's only output is the product itself
            torch.addmm(params[kernels.bias], a, b, beta=kernels.beta, alpha=kernels.alpha, out=mm_out)
        else:
            torch.mm(a, b, out=mm_out)
        return
    if cfg["impl"] not in (GEMM_DOT, GEMM_GEMV):
        raise ValueError(f"matmul template: unknown impl {cfg['impl']!r} in config {cfg}")
    _run_template(kernels, cfg, a, b, params, m, n, k)


def run_matmul(kernels: MatmulKernels, a, b, params: tuple, mm_out=None, config: dict | None = None) -> None:
    """The host side of a matmul group: `config` if given, else the autotuner's choice.

    a [M, K], b [K, N]: the operands (also somewhere in params); mm_out: the output
    tensor holding the product itself when the group has no epilogue.
    """
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return

    def launch(cfg):
        launch_config(kernels, cfg, a, b, params, mm_out)

    if config is not None:
        launch(config)
    else:
        TUNER.launch(kernels.kernel_hash, "gemm", (m, n, k), kernels.dtype_key, a.device, launch)
