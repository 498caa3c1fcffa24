"""Matmul groups: GEMM/GEMV templates with a fused epilogue, vs eager (Triton interpreter).

Shapes are tiny and never multiples of the blocks. Inputs: x ~ randn, weights ~ randn /
sqrt(K), so products are O(1) and the tolerances mean the same at every K.
Tolerances (compiled vs eager): the product accumulates in fp32 in another order than
the CPU BLAS, then is rounded to its dtype (as eager does), so a half-precision product
may differ by one ulp before the epilogue sees it:
    float32: atol = rtol = 1e-4     float16: 1e-2     bfloat16: 6e-2
(a cast epilogue is compared at the looser of its input and output dtypes).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimfx.codegen import compile_graph
from slimfx.codegen.autotune import (GEMM_DOT, GEMM_GEMV, GEMM_LIBRARY, GEMV_MAX_M, NOMINAL_SMS, DiskCache, Tuner,
                                     gemm_heuristic, gemm_space)
from slimfx.codegen.partition import matmul_parts

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _weight(n, k, dtype, gen):
    return (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype)


def _targets(group) -> set:
    return {str(n.target) for n in group.nodes}


def _matmul_groups(compiled):
    return [g for g in compiled.slimfx_codegen.partition.groups if g.kind == "matmul"]


# ----------------------------------------------------------------------------- random epilogues

EPILOGUES = {  # (product, residual, up projection, dtype) -> output
    "none": lambda y, r, u, dt: y,
    "silu": lambda y, r, u, dt: F.silu(y),
    "gelu": lambda y, r, u, dt: F.gelu(y),
    "residual": lambda y, r, u, dt: y + r,
    "cast": lambda y, r, u, dt: y.to(torch.float16 if dt == torch.float32 else torch.float32),
    "swiglu": lambda y, r, u, dt: F.silu(y) * u,
    "scale_relu_residual": lambda y, r, u, dt: torch.relu(y * 0.5 + r),
}
# An op that appears in the matmul group when the epilogue fused (the product is always there).
EPILOGUE_OP = {"silu": "aten.sigmoid.default", "gelu": "aten.erf.default", "residual": "aten.add.Tensor",
               "cast": "aten._to_copy.default", "swiglu": "aten.sigmoid.default", "scale_relu_residual": "aten.relu.default"}


def linear_program(epilogue: str, bias: bool, dtype: torch.dtype):
    def fn(x, w, b, r, w2):
        y = F.linear(x, w, b if bias else None)
        u = F.linear(x, w2) if epilogue == "swiglu" else None
        return EPILOGUES[epilogue](y, r, u, dtype)

    return fn


@st.composite
def linear_cases(draw):
    m = draw(st.integers(1, 9))
    lead = draw(st.sampled_from([(m,), (1, m)]))  # 2-D input, or [B, T, K] like a model's linear
    k, n = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return lead, k, n, dtype, draw(st.sampled_from(sorted(EPILOGUES))), draw(st.booleans())


@settings(max_examples=int(os.environ.get("SLIMFX_HYPOTHESIS_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=linear_cases(), seed=st.integers(0, 2**16))
def test_random_linear_epilogues_match_eager(interpreter, monkeypatch, case, seed):
    lead, k, n, dtype, epilogue, bias = case
    monkeypatch.setenv("SLIMFX_MATMUL", "all")  # a matmul without epilogue runs the template too
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=gen).to(dtype)
    w, w2 = _weight(n, k, dtype, gen), _weight(n, k, dtype, gen)
    b, r = torch.randn(n, generator=gen).to(dtype), torch.randn(*lead, n, generator=gen).to(dtype)
    fn = linear_program(epilogue, bias, dtype)
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w, b, r, w2])
    expected, got = fn(x, w, b, r, w2), _first(compiled(x, w, b, r, w2))
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tol = max(TOL[dtype], TOL[expected.dtype])
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    groups = _matmul_groups(compiled)
    assert groups and all(g.source is not None for g in compiled.slimfx_codegen.groups)
    if epilogue != "none":
        assert any(EPILOGUE_OP[epilogue] in _targets(g) for g in groups), [g.describe() for g in groups]


# ----------------------------------------------------------------------------- every config


def _addmm_silu_residual(x, w, b, r):
    return F.silu(F.linear(x, w, b)) + r


SPLIT_K_CONFIGS = [  # the spaces only split long K; these force it at test sizes (uneven splits)
    {"impl": GEMM_GEMV, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 4, "num_stages": 1},
    {"impl": GEMM_DOT, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_every_gemm_config_matches_eager(interpreter, dtype, m):
    """Library call, GEMV and tl.dot templates, with and without split-K: same result."""
    gen = torch.Generator().manual_seed(m)
    k, n = 37, 45
    x = torch.randn(m, k, generator=gen).to(dtype)
    w, b, r = _weight(n, k, dtype, gen), torch.randn(n, generator=gen).to(dtype), torch.randn(m, n, generator=gen).to(dtype)
    compiled = compile_graph(torch.fx.symbolic_trace(_addmm_silu_residual), [x, w, b, r])
    [group] = _matmul_groups(compiled)
    [host] = [g for g in compiled.slimfx_codegen.groups if g.group is group]
    inputs = compiled.slimfx_codegen.group_inputs(group, [x, w, b, r])
    expected = _addmm_silu_residual(x, w, b, r)
    configs = gemm_space(m, n, k) + SPLIT_K_CONFIGS + [gemm_heuristic(m, n, k, interpreter=True)]
    for config in configs:
        got = host._kernel_fn()(*inputs, config=config)[0]
        torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype], msg=lambda s: f"{config}: {s}")


# ----------------------------------------------------------------------------- partition structure


def test_partition_puts_bias_activation_and_residual_in_the_matmul_group(interpreter):
    def fn(x, w, b, r):
        return F.gelu(F.linear(x, w, b)) * 2.0 + r

    x, w, b, r = torch.randn(1, 5, 24), torch.randn(40, 24) / 5, torch.randn(40), torch.randn(1, 5, 40)
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w, b, r])
    groups = compiled.slimfx_codegen.partition.groups
    assert [g.kind for g in groups] == ["matmul"]
    [group] = groups
    mm, _, epilogue = matmul_parts(group)
    assert str(mm.target) == "aten.addmm.default"  # the bias add is the product's own epilogue
    assert {"aten.erf.default", "aten.mul.Tensor", "aten.add.Tensor"} <= {str(n.target) for n in epilogue}
    assert len(group.outputs) == 1  # written once: the final value, not the product
    torch.testing.assert_close(_first(compiled(x, w, b, r)), fn(x, w, b, r), atol=1e-4, rtol=1e-4)


def test_matmul_mode_off_keeps_the_pointwise_fallback(interpreter, monkeypatch):
    monkeypatch.setenv("SLIMFX_MATMUL", "off")

    def fn(x, w, r):
        return F.silu(x @ w) + r

    x, w, r = torch.randn(5, 24), torch.randn(24, 40) / 5, torch.randn(5, 40)
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w, r])
    assert [g.kind for g in compiled.slimfx_codegen.partition.groups] == ["pointwise"]
    torch.testing.assert_close(_first(compiled(x, w, r)), fn(x, w, r), atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("SLIMFX_MATMUL", "sometimes")
    with pytest.raises(ValueError, match="matmul mode 'sometimes' unknown; allowed: auto, all, fused, off"):
        compile_graph(torch.fx.symbolic_trace(fn), [x, w, r])


def test_swiglu_product_fuses_into_the_gate_projection(interpreter):
    def fn(x, w1, w3):
        return F.silu(F.linear(x, w1)) * F.linear(x, w3)

    x, w1, w3 = torch.randn(1, 3, 16), torch.randn(24, 16) / 4, torch.randn(24, 16) / 4
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w1, w3])
    groups = compiled.slimfx_codegen.partition.groups
    assert [g.kind for g in groups] == ["matmul"]  # no separate SiLU * up kernel
    assert {"aten.sigmoid.default", "aten.mul.Tensor"} <= _targets(groups[0])
    # The up projection has no epilogue of its own: on CPU ("auto") it stays a library call.
    steps = compiled.slimfx_codegen.partition.steps
    assert sum(1 for s in steps if getattr(s, "target", None) is torch.ops.aten.mm.default) == 1
    torch.testing.assert_close(_first(compiled(x, w1, w3)), fn(x, w1, w3), atol=1e-4, rtol=1e-4)


def test_an_epilogue_that_feeds_the_matmul_is_refused(interpreter):
    # p feeds the mm and is read by the epilogue's group: computing it after the K loop is impossible.
    def fn(x, w):
        p = torch.sigmoid(x)
        return (p @ w) * 2.0 + p

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w])
    for group in _matmul_groups(compiled):
        mm, _, epilogue = matmul_parts(group)
        assert mm.args[0] not in epilogue
    torch.testing.assert_close(_first(compiled(x, w)), fn(x, w), atol=1e-5, rtol=1e-5)


def test_views_of_the_product_read_outside_stay_views(interpreter):
    def fn(x, w):
        y = F.linear(x, w)  # mm -> _unsafe_view [1, 3, 24]
        return y, F.silu(y), y.view(1, 3, 4, 6).transpose(1, 2)

    x, w = torch.randn(1, 3, 16), torch.randn(24, 16) / 4
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w])
    [group] = _matmul_groups(compiled)
    mm, views, _ = matmul_parts(group)
    assert mm in group.outputs and not set(views) & set(group.outputs)
    for got, expected in zip(compiled(x, w), fn(x, w)):
        assert got.shape == expected.shape and got.stride() == expected.stride()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_in_place_write_after_the_matmul(interpreter):
    def fn(x, w, buf, idx):
        y = x @ w
        z = torch.relu(y) + 1.0
        buf.index_copy_(0, idx, y)
        return z, buf * 2.0

    x, w, idx = torch.randn(2, 8), torch.randn(8, 6), torch.tensor([3, 0])
    buf_a = torch.randn(4, 6)
    buf_b = buf_a.clone()
    compiled = compile_graph(torch.fx.symbolic_trace(fn), [x, w, buf_a.clone(), idx])
    for got, expected in zip(compiled(x, w, buf_a, idx), fn(x, w, buf_b, idx)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf_a, buf_b)
    assert _matmul_groups(compiled)


def test_cpu_without_interpreter_is_bit_identical(no_interpreter):
    x, w, b, r = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(24, 16, dtype=torch.bfloat16), torch.randn(24, dtype=torch.bfloat16), torch.randn(3, 24, dtype=torch.bfloat16)
    compiled = compile_graph(torch.fx.symbolic_trace(_addmm_silu_residual), [x, w, b, r])
    assert _matmul_groups(compiled)
    assert torch.equal(_first(compiled(x, w, b, r)), _addmm_silu_residual(x, w, b, r))
    assert not (no_interpreter / "kernels").exists()  # the group ran its own ATen nodes


def test_symbolic_rows_stay_one_kernel(interpreter, codegen_backend):
    import re

    def fn(x, w, b):
        return F.silu(F.linear(x, w, b)) * x[..., :1]

    w, b = torch.randn(20, 12) / 4, torch.randn(20)
    compiled = torch.compile(fn, backend=codegen_backend, dynamic=True)
    for rows in (3, 5, 9):
        x = torch.randn(1, rows, 12)
        torch.testing.assert_close(compiled(x, w, b), fn(x, w, b), atol=1e-5, rtol=1e-5)
    [result] = codegen_backend.results  # no recompile per length
    [group] = [g for g in result.groups if g.group.kind == "matmul"]
    params = re.search(r"_epilogue\((.*)\):", group.source).group(1)
    assert re.search(r"\bs\d+\b", params), params  # the symbolic size is a kernel argument


# ----------------------------------------------------------------------------- a tiny Llama


@pytest.mark.parametrize("mode", ["auto", "all"])
def test_tiny_llama_with_matmul_groups_matches_eager(interpreter, codegen_backend, monkeypatch, mode):
    from slimfx.runtime.models import tiny_model

    monkeypatch.setenv("SLIMFX_MATMUL", mode)
    model = tiny_model("llama_gqa")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend=codegen_backend)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    [result] = codegen_backend.results
    matmuls = [g for g in result.partition.groups if g.kind == "matmul"]
    swiglu = [g for g in matmuls if "aten.sigmoid.default" in _targets(g)]
    assert len(swiglu) == 2  # SiLU(gate) * up in a projection's epilogue, per layer
    # "all": every projection and the LM head; q, k, v of a layer share one multi_matmul
    # group, the rest (o, gate, up, down) are a matmul group each.
    multi = [g for g in result.partition.groups if g.kind == "multi_matmul"]
    assert len(matmuls) == (2 * 4 + 1 if mode == "all" else 2)
    assert len(multi) == (2 if mode == "all" else 0)
    assert all(g.source is not None for g in result.groups)


# ----------------------------------------------------------------------------- autotuner


@pytest.mark.parametrize("m,n,k", [(1, 576, 576), (1, 8192, 2048), (4, 1536, 576), (16, 4096, 4096), (300, 2048, 2048), (7, 5, 3)])
def test_gemm_space_is_consistent(m, n, k):
    space = gemm_space(m, n, k)
    assert space[0]["impl"] == GEMM_LIBRARY and len(space) == len({tuple(sorted(c.items())) for c in space})
    assert all(isinstance(v, int) for c in space for v in c.values())  # cacheable
    templates = space[1:]
    assert all(c["BLOCK_N"] >= 4 and c["BLOCK_K"] >= 16 and c["SPLIT_K"] >= 1 for c in templates)
    assert all(c["BLOCK_M"] >= 16 for c in templates if c["impl"] == GEMM_DOT)  # tl.dot's minimum
    assert any(c["impl"] == GEMM_GEMV for c in templates) == (m <= GEMV_MAX_M)
    for c in templates:
        if c["SPLIT_K"] > 1:  # only where output tiles leave SMs idle, every split gets K blocks
            tiles = (m if c["impl"] == GEMM_GEMV else -(-m // c["BLOCK_M"])) * -(-n // c["BLOCK_N"])
            assert tiles < 2 * NOMINAL_SMS and c["SPLIT_K"] <= -(-k // c["BLOCK_K"])
    if (m, n, k) == (1, 576, 576):  # SmolLM2's decode GEMV: 36 programs of 16 rows without a split
        assert any(c["SPLIT_K"] > 1 for c in templates)
    for interpreter in (True, False):
        h = gemm_heuristic(m, n, k, interpreter=interpreter)
        assert h["impl"] in (GEMM_DOT, GEMM_GEMV)  # nothing measured: the template's own code


def _fake_timer(winner):
    def timer(launch_fn, config):
        launch_fn(config)
        return 1.0 if config["impl"] == winner else 2.0 + config.get("BLOCK_N", 0) / 1000

    return timer


@pytest.mark.parametrize("winner", [GEMM_LIBRARY, GEMM_GEMV])
def test_tuner_measures_template_against_library_and_caches(tmp_path, winner):
    launched = []
    tuner = Tuner(DiskCache(tmp_path), timer=_fake_timer(winner))
    config = tuner.tuned("h" * 24, "gemm", (1, 576, 576), "bfloat16/bfloat16", "FakeGPU", launched.append)
    assert config["impl"] == winner
    assert tuner.timed == len(gemm_space(1, 576, 576)) and launched  # every config ran
    again = Tuner(DiskCache(tmp_path), timer=_fake_timer(winner))
    assert again.tuned("h" * 24, "gemm", (1, 576, 576), "bfloat16/bfloat16", "FakeGPU", launched.append) == config
    assert again.timed == 0  # read from disk


def _qkv(x, wq, wk, wv):
    """Three projections of one hidden state (the attention's Q, K, V), as HF writes them."""
    h = x * 0.5
    return F.linear(h, wq), F.linear(h, wk), F.linear(h, wv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 9])  # GEMV kernel up to GEMV_MAX_M rows, torch.mm above
def test_sibling_projections_become_one_multi_matmul_group(interpreter, monkeypatch, dtype, rows):
    monkeypatch.setenv("SLIMFX_MATMUL", "all")
    g = torch.Generator().manual_seed(rows)
    k = 37
    x = torch.randn(1, rows, k, generator=g).to(dtype)
    ws = [(torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype) for n in (24, 9, 9)]
    compiled = compile_graph(torch.fx.symbolic_trace(_qkv), [x, *ws])
    result = compiled.slimfx_codegen
    [multi] = [grp for grp in result.partition.groups if grp.kind == "multi_matmul"]
    assert len(multi.outputs) == 3 and all(str(n.target) == "aten.mm.default" for n in multi.outputs)
    assert all(grp.source is not None for grp in result.groups)
    tol = TOL[dtype]
    for got, want in zip(compiled(x, *ws), _qkv(x, *ws)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("config", [{"BLOCK_N": 4, "BLOCK_K": 16}, {"BLOCK_N": 16, "BLOCK_K": 64}, {"BLOCK_N": 64, "BLOCK_K": 32}])
def test_multi_gemv_every_tile_matches_mm(interpreter, config):
    """Every tile shape of the kernel, two and three operands, K not a multiple of the block,
    a strided (transposed-weight) B and a row-strided A."""
    from slimfx.codegen.kernels.multi_gemv import multi_matmul, multi_matmul_ref

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 50, generator=g)[:, :45]
    for sizes in ((30, 7), (33, 8, 17)):
        bs = [torch.randn(n, 45, generator=g).t() for n in sizes]
        outs = [torch.empty(2, n) for n in sizes]
        multi_matmul(a, bs, outs, config={**config, "num_warps": 4, "num_stages": 1})
        for got, want in zip(outs, multi_matmul_ref(a, bs)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_multi_matmul_rejects_mismatched_operands():
    from slimfx.codegen.kernels.multi_gemv import multi_matmul

    a = torch.randn(1, 8)
    with pytest.raises(ValueError, match=r"b \[K=8, N\]"):
        multi_matmul(a, [torch.randn(8, 4), torch.randn(7, 4)], [torch.empty(1, 4), torch.empty(1, 4)])
    with pytest.raises(ValueError, match="2 to 3 operands"):
        multi_matmul(a, [torch.randn(8, 4)], [torch.empty(1, 4)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need CUDA")
def test_multi_gemv_on_cuda_every_tuned_config(monkeypatch, tmp_path):
    """Every config of the autotuner's multi_gemv space, bf16, Llama-3.2-1B's QKV shapes."""
    from slimfx.codegen.autotune import config_space
    from slimfx.codegen.kernels.multi_gemv import multi_matmul, multi_matmul_ref

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
    bs = [(torch.randn(n, 2048, device="cuda", generator=g) / 45).to(torch.bfloat16).t() for n in (2048, 512, 512)]
    want = multi_matmul_ref(a.float(), [b.float() for b in bs])
    for config in config_space("multi_gemv", (1, 3072, 2048)):
        outs = [torch.empty(1, b.shape[1], device="cuda", dtype=torch.bfloat16) for b in bs]
        multi_matmul(a, bs, outs, config=config)
        for got, ref in zip(outs, want):
            torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
