"""Quantize/dequantize round trips per format: error bounds that follow from each format's
definition, packing, byte accounting, and the HQQ refinement never being worse than
round-to-nearest by its own measure."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimfx.codegen.kernels.gemv_int4 import unpack_int4
from slimfx.passes.quantize import formats as qf


def _weight(n, k, seed, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if heavy:  # a few large outliers, as real LLM weights have
        w += (torch.rand(n, k, generator=g) < 0.01) * torch.randn(n, k, generator=g)
    return w


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 90), seed=st.integers(0, 1000))
def test_int8_error_at_most_half_a_step(n, k, seed):
    w = _weight(n, k, seed)
    q = qf.quantize_int8(w)
    err = (q.dequantize() - w).abs()
    step = q.tensors["scale"][:, None]
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert q.tensors["qweight"].dtype == torch.int8 and q.nbytes() == qf.FormatSpec("int8").bytes_for(n, k)


@pytest.mark.parametrize("group", qf.GROUP_SIZES)
@pytest.mark.parametrize("hqq", [False, True])
def test_int4_error_bounded_by_step_and_fp16_storage(group, hqq):
    n, k = 19, 3 * group
    w = _weight(n, k, group, heavy=True)
    q = qf.quantize_int4(w, group, hqq=hqq)
    s = q.tensors["scale"].float().repeat_interleave(group, dim=1)
    o = q.tensors["offset"].float().repeat_interleave(group, dim=1)
    err = (q.dequantize() - w).abs()
    if not hqq:
        # Round to nearest inside [min, max]: half a step, plus what fp16 storage of
        # scale (times a code <= 15) and offset can add.
        bound = 0.5 * s + 15 * s * 2**-10 + o.abs() * 2**-10 + 1e-6
    else:
        # HQQ moves the zero, so codes can clamp: bounded by the group's full range.
        bound = 16 * s + o.abs() * 2**-10 + 1e-6
    assert (err <= bound).all()
    codes = unpack_int4(q.tensors["qweight"])
    assert codes.max() <= 15 and q.nbytes() == qf.FormatSpec("int4", group).bytes_for(n, k)


def test_hqq_never_worse_than_round_to_nearest_by_its_measure():
    for seed in range(5):
        w = _weight(32, 256, seed, heavy=True).view(32, 2, 128)
        scale, zero = qf._int4_minmax(w)

        def err(z):
            q = torch.round(w / scale + z).clamp(0, 15)
            return ((q - z) * scale - w).abs().mean().item()

        refined = qf.hqq_refine_zero(w, scale, zero)
        assert err(refined) <= err(zero) + 1e-9


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 8), half_k=st.integers(1, 40), seed=st.integers(0, 100))
def test_int4_packing_round_trips(n, half_k, seed):
    codes = torch.randint(0, 16, (n, 2 * half_k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert torch.equal(unpack_int4(packed), codes)


def test_fp8_relative_error_is_e4m3_rounding():
    w = _weight(23, 70, 3, heavy=True)
    q = qf.quantize_fp8(w)
    scale = q.tensors["scale"][:, None]
    err = (q.dequantize() - w).abs()
    # 3 mantissa bits: relative rounding <= 2^-4 for normals; subnormals step 2^-9 (x scale).
    assert (err <= w.abs() * 2**-4 + scale * 2**-9 + 1e-7).all()
    assert q.tensors["qweight"].dtype == torch.float8_e4m3fn


def test_bad_inputs_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"^format: got 'int3'; allowed: none, int8, int4_g32"):
        qf.parse_spec("int3")
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        qf.quantize_int4(torch.randn(4, 96), 128)
    with pytest.raises(ValueError, match="allowed: 32, 64, 128"):
        qf.quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="NaN or inf"):
        qf.quantize_int8(torch.tensor([[1.0, float("nan")]]))
    assert qf.parse_spec("int4_g64") == qf.FormatSpec("int4", 64)
