"""Quantized linear kernels against their references, on random data: odd shapes, every
int4 group size, M = 1 (split-K GEMV) and M > 1 (small-batch GEMM), with and without bias.

Without a GPU the kernels run under TRITON_INTERPRET=1 at small sizes (tests/conftest.py sets it); with a GPU, compiled. The GPU
numbers of record come from benchmarks/bench_quant_gemv.py."""

from __future__ import annotations

import pytest
import torch

# TRITON_INTERPRET is set by conftest.py before any kernel module is imported.
HAS_CUDA = torch.cuda.is_available()

import slimfx.codegen.kernels.gemv_int4 as k4
import slimfx.codegen.kernels.gemv_int8 as k8
from slimfx.passes.quantize import formats as qf

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]
# (M, N, K): GEMV and GEMM, N not a multiple of the block, K not a multiple of BLOCK_K.
SHAPES = [(1, 37, 96), (1, 9, 320), (3, 21, 64), (17, 13, 192)]


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _inputs(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    return w.to(DEVICE), x, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_kernel_matches_reference(shape, bias, dtype):
    m, n, k = shape
    w, x, b = _inputs(m, n, k, dtype, sum(shape))
    q = qf.quantize_int8(w)
    args = (x, q.tensors["qweight"], q.tensors["scale"], b if bias else None)
    out, ref = k8.gemv_int8(*args), k8.gemv_int8_ref(*args)
    assert out.shape == (m, n) and out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("group", qf.GROUP_SIZES)
@pytest.mark.parametrize("shape", [(1, 37, 3), (1, 6, 5), (4, 19, 2), (18, 7, 3)], ids=lambda s: "x".join(map(str, s)))
def test_int4_kernel_matches_reference(shape, group):
    m, n, groups = shape  # K = groups x group: every group size, odd group counts
    dtype = DTYPES[-1] if HAS_CUDA else torch.float32
    w, x, b = _inputs(m, n, groups * group, dtype, m * n + group)
    t = qf.quantize_int4(w, group).tensors
    args = (x, t["qweight"], t["scale"], t["offset"], group, b if m % 2 else None)
    out, ref = k4.gemv_int4(*args), k4.gemv_int4_ref(*args)
    assert out.shape == (m, n) and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


def test_split_k_paths_agree():
    w, x, _ = _inputs(1, 11, 256, torch.float32, 7)
    q = qf.quantize_int8(w)
    one = k8.gemv_int8(x, q.tensors["qweight"], q.tensors["scale"], split_k=1)
    four = k8.gemv_int8(x, q.tensors["qweight"], q.tensors["scale"], split_k=4)
    assert rel_err(one, four) < 1e-5
    t = qf.quantize_int4(w, 32).tensors
    one = k4.gemv_int4(x, t["qweight"], t["scale"], t["offset"], 32, split_k=1)
    four = k4.gemv_int4(x, t["qweight"], t["scale"], t["offset"], 32, split_k=4)
    assert rel_err(one, four) < 1e-5


def test_leading_dims_are_kept():
    w, _, _ = _inputs(1, 5, 64, torch.float32, 1)
    x = torch.randn(2, 1, 64).to(DEVICE)
    q = qf.quantize_int8(w)
    assert k8.gemv_int8(x, q.tensors["qweight"], q.tensors["scale"]).shape == (2, 1, 5)


def test_bad_inputs_are_one_line_errors():
    q = qf.quantize_int8(torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"^gemv_int8: x's last dimension 16 != in_features 32"):
        k8.gemv_int8(torch.randn(1, 16), q.tensors["qweight"], q.tensors["scale"])
    with pytest.raises(ValueError, match=r"^gemv_int8: scale must be float32 \[4\]"):
        k8.gemv_int8(torch.randn(1, 32), q.tensors["qweight"], q.tensors["scale"].half())
    t = qf.quantize_int4(torch.randn(4, 64), 32).tensors
    with pytest.raises(ValueError, match=r"^gemv_int4: group_size 48; allowed: 32, 64, 128"):
        k4.gemv_int4(torch.randn(1, 64), t["qweight"], t["scale"], t["offset"], 48)
    with pytest.raises(ValueError, match=r"^gemv_int4: scale must be float \[N, K // G\] = \(4, 1\)"):
        k4.gemv_int4(torch.randn(1, 64), t["qweight"], t["scale"], t["offset"], 64)
